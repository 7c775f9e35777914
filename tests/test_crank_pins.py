"""Pin factories, pin names and pin conflicts."""

import importlib.util
import logging
import os
import warnings

import pytest
from gpiozero import Device
from gpiozero.exc import PinFactoryFallback
from gpiozero.pins.mock import MockFactory

from appliance.crank.events import CrankQueue
from appliance.crank.pins import (
    check_device_access, check_pin_roles, make_pin_factory, normalize_pin, pin_error,
)
from appliance.crank.source import open_crank
from appliance.errors import ConfigError, DevicePermissionError, PinError, PinFactoryError
from crankpins import PINS

@pytest.fixture
def environ():
    """Restore the variables the pin factory code reads or sets."""
    names = ("LG_WD", "GPIOZERO_PIN_FACTORY", "RUNTIME_DIRECTORY")
    saved = {name: os.environ.get(name) for name in names}
    for name in names:
        os.environ.pop(name, None)
    yield os.environ
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def missing(module):
    return importlib.util.find_spec(module) is None


# -- pin names --------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [17, "17", "GPIO17", "BCM17", "BOARD11", "J8:11", "WPI0", "gpio17", " bcm17 "])
def test_pin_spellings_normalise(spec):
    assert normalize_pin(spec) == "GPIO17"


@pytest.mark.parametrize("spec", ["BOARD1", "GND", "5V"])
def test_power_pin_rejected(spec):
    with pytest.raises(PinError, match="not a GPIO"):
        normalize_pin(spec)


@pytest.mark.parametrize("spec", ["GPIO99", "pin seventeen", 99, True, 17.0, None])
def test_unknown_pin_rejected(spec):
    with pytest.raises(PinError):
        normalize_pin(spec)


def test_pin_conflict_names_pin_and_roles():
    with pytest.raises(PinError) as caught:
        check_pin_roles({"pin_a": 17, "pin_b": "GPIO18", "pin_button": "BCM17"})
    message = str(caught.value)
    assert "GPIO17" in message
    assert "pin_a" in message
    assert "pin_button" in message


def test_pin_error_is_config_error():
    with pytest.raises(ConfigError):
        check_pin_roles({"pin_a": "GPIO17", "pin_b": "J8:11"})


def test_conflict_found_before_factory(environ):
    # lgpio is not installed here, so reaching the factory would raise PinFactoryError.
    with pytest.raises(PinError):
        open_crank(queue=CrankQueue(), pin_factory="lgpio", pin_a="GPIO17", pin_b="GPIO18",
                   pin_button=17)


def test_pin_in_use_names_pin(factory):
    first = open_crank(queue=CrankQueue(), factory=factory, **PINS)
    try:
        with pytest.raises(PinError) as caught:
            open_crank(queue=CrankQueue(), factory=factory, pin_a="GPIO22", pin_b="GPIO23",
                       pin_button="GPIO17")
    finally:
        first.close()
    assert "GPIO17" in str(caught.value)
    assert "pin_button" in str(caught.value)


def test_failed_open_releases_pins(factory):
    first = open_crank(queue=CrankQueue(), factory=factory, **PINS)
    with pytest.raises(PinError):
        open_crank(queue=CrankQueue(), factory=factory, pin_a="GPIO22", pin_b="GPIO23",
                   pin_button="GPIO27")
    first.close()
    second = open_crank(queue=CrankQueue(), factory=factory, pin_a="GPIO22", pin_b="GPIO23",
                        pin_button="GPIO24")
    second.close()


def test_fixed_pull_up_pin_with_pull_down(factory):
    # GPIO2 has a physical pull-up resistor on every Pi, so pull_up=false cannot work.
    with pytest.raises(PinError, match="GPIO2"):
        open_crank(queue=CrankQueue(), factory=factory, pin_a="GPIO2", pin_b="GPIO18",
                   pin_button="GPIO27", pull_up=False)


def test_lgpio_busy_message_becomes_pin_error():
    class LgpioError(Exception):  # lgpio.error: str() is the repr of lgpio's error text
        def __str__(self):
            return "'GPIO busy'"

    translated = pin_error(LgpioError(), pin="GPIO17", role="pin_a")
    assert isinstance(translated, PinError)
    assert "GPIO17 (pin_a) is busy: GPIO busy" in str(translated)


def test_permission_error_names_gpio_group():
    translated = pin_error(PermissionError(13, "Permission denied"), pin="GPIO17", role="pin_a")
    assert isinstance(translated, DevicePermissionError)
    assert "gpio group" in str(translated)


def test_unrelated_error_passed_through():
    error = RuntimeError("something else")
    assert pin_error(error, pin="GPIO17", role="pin_a") is error


# -- pin factories ----------------------------------------------------------------------

def test_mock_factory_built():
    assert isinstance(make_pin_factory("mock"), MockFactory)


def test_unknown_factory_rejected():
    with pytest.raises(PinFactoryError, match="unknown pin factory 'gpiod'"):
        make_pin_factory("gpiod")


@pytest.mark.skipif(not missing("lgpio"), reason="lgpio is installed")
def test_missing_lgpio_is_fatal(environ):
    with pytest.raises(PinFactoryError, match="lgpio") as caught:
        make_pin_factory("lgpio")
    assert isinstance(caught.value.__cause__, ImportError)


@pytest.mark.skipif(not missing("RPi"), reason="RPi.GPIO is installed")
def test_missing_rpigpio_is_fatal(environ):
    with pytest.raises(PinFactoryError, match="rpigpio"):
        make_pin_factory("rpigpio")


@pytest.mark.skipif(not missing("RPi"), reason="RPi.GPIO is installed")
def test_no_fallback_warnings(environ):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(PinFactoryError):
            make_pin_factory("rpigpio")
    assert not [w for w in caught if issubclass(w.category, PinFactoryFallback)]


@pytest.mark.skipif(not missing("RPi"), reason="RPi.GPIO is installed")
def test_environment_cannot_pick_another_factory(environ, caplog):
    environ["GPIOZERO_PIN_FACTORY"] = "mock"
    caplog.set_level(logging.WARNING, logger="appliance.crank.pins")
    with pytest.raises(PinFactoryError, match="rpigpio"):
        make_pin_factory("rpigpio")
    assert "GPIOZERO_PIN_FACTORY=mock is ignored" in caplog.text


def test_factory_failure_leaves_default_factory(environ, factory):
    with pytest.raises(PinFactoryError):
        open_crank(queue=CrankQueue(), pin_factory="rpigpio" if missing("RPi") else "gpiod", **PINS)
    assert Device.pin_factory is factory


def test_open_crank_without_factory_builds_configured_one(environ):
    crank = open_crank(queue=CrankQueue(), pin_factory="mock", **PINS)
    try:
        assert isinstance(crank.factory, MockFactory)
        assert crank.driver is not None
    finally:
        crank.close()


@pytest.mark.parametrize("chip", [-1, "0", True])
def test_invalid_gpiochip_rejected(chip):
    with pytest.raises(PinFactoryError, match="gpiochip"):
        make_pin_factory("lgpio", chip=chip)


# -- lgpio working directory and device ---------------------------------------------------

@pytest.mark.skipif(not missing("lgpio"), reason="lgpio is installed")
def test_lgpio_workdir_set_from_runtime_dir(environ, tmp_path):
    with pytest.raises(PinFactoryError):
        make_pin_factory("lgpio", runtime_dir=tmp_path)
    assert environ["LG_WD"] == str(tmp_path)


@pytest.mark.skipif(not missing("lgpio"), reason="lgpio is installed")
def test_lgpio_workdir_from_systemd_runtime_directory(environ, tmp_path):
    environ["RUNTIME_DIRECTORY"] = f"{tmp_path}:/run/other"
    with pytest.raises(PinFactoryError):
        make_pin_factory("lgpio")
    assert environ["LG_WD"] == str(tmp_path)


def test_lgpio_workdir_missing_rejected(environ, tmp_path):
    with pytest.raises(PinFactoryError, match="working directory .*gone"):
        make_pin_factory("lgpio", runtime_dir=tmp_path / "gone")
    assert "LG_WD" not in environ


def test_missing_gpiochip_device(tmp_path):
    with pytest.raises(PinFactoryError, match="gpiochip7 not found"):
        check_device_access(str(tmp_path / "gpiochip7"))


def test_gpiochip_without_permission(tmp_path):
    device = tmp_path / "gpiochip0"
    device.write_bytes(b"")
    device.chmod(0o600)
    if os.geteuid() != 0:
        os.chown(device, os.geteuid(), os.getegid())
        device.chmod(0o000)
        with pytest.raises(DevicePermissionError, match="gpio group"):
            check_device_access(str(device))
        return

    # As root every open succeeds, so check from a child running as the nobody user.
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            check_device_access(str(device))
        except DevicePermissionError as exc:
            code = 0 if "gpio group" in str(exc) and str(device) in str(exc) else 2
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
