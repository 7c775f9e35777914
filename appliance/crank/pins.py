"""gpiozero pin factories and pin names for the crank.

gpiozero picks a default pin factory by trying lgpio, rpigpio, pigpio and native in turn,
warning with PinFactoryFallback at each failure, and GPIOZERO_PIN_FACTORY can name
another one. A silent fallback on the appliance means a crank that half works (the
native factory has no edge callbacks worth the name), so this module builds exactly
the factory the config names and turns every failure into PinFactoryError. Devices get
the factory passed in explicitly, so neither the fallback chain nor the environment
variable is ever consulted.
"""

import errno
import logging
import os
import sys
from importlib.metadata import entry_points

from appliance.errors import DevicePermissionError, PinError, PinFactoryError

log = logging.getLogger(__name__)

FACTORY_NAMES = ("lgpio", "rpigpio", "pigpio", "native", "mock")

# Pin names are resolved against the 40-pin header, which every Raspberry Pi since the
# B+ shares (BCM numbers, BOARD/J8 physical numbers and WiringPi numbers). a02082 is a
# Pi 3B; it is only used when no factory is at hand to ask for its own board.
DEFAULT_REVISION = 0xA02082

GPIO_GROUP = "gpio"


def make_pin_factory(name: str, *, chip: int = 0, runtime_dir: str | os.PathLike | None = None):
    """Build the gpiozero pin factory ``name`` or raise PinFactoryError saying why not.

    ``chip`` selects /dev/gpiochipN for lgpio (a Pi 5 running an older kernel has the
    header on gpiochip4). ``runtime_dir`` becomes lgpio's working directory; without it
    systemd's $RUNTIME_DIRECTORY is used if set.
    """
    if name not in FACTORY_NAMES:
        raise PinFactoryError(
            f"unknown pin factory {name!r}; expected one of {', '.join(FACTORY_NAMES)}"
        )
    if isinstance(chip, bool) or not isinstance(chip, int) or chip < 0:
        raise PinFactoryError(f"invalid [crank] gpiochip {chip!r}; expected an integer >= 0")

    requested = os.environ.get("GPIOZERO_PIN_FACTORY")
    if requested and requested.lower() != name:
        log.warning(
            "GPIOZERO_PIN_FACTORY=%s is ignored; the crank uses the configured pin factory %s",
            requested, name,
        )
    if name != "lgpio" and chip != 0:
        log.warning("[crank] gpiochip=%d only applies to the lgpio pin factory, not %s", chip, name)

    if name == "lgpio":
        _prepare_lgpio_workdir(runtime_dir)

    factory_class = _load_factory_class(name)
    if name == "lgpio":
        return _open_lgpio(factory_class, chip)
    try:
        return factory_class()
    except Exception as exc:  # any failure of a third-party driver means "unusable"
        raise PinFactoryError(f"pin factory {name} failed to start: {_describe(exc)}") from exc


def normalize_pin(spec: int | str, *, board=None) -> str:
    """Return the gpiozero name ("GPIO17") of a pin given as 17, "17", "GPIO17", "BCM17", "BOARD11" ...

    ``board`` is a gpiozero BoardInfo (a factory's ``board_info``); the 40-pin header is
    assumed without one. Raises PinError for unknown pins and for power or ground pins.
    """
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise PinError(f"invalid pin {spec!r}; expected a GPIO number or a name like 'GPIO17'")
    key = spec.strip().upper() if isinstance(spec, str) else spec
    if board is None:
        board = _default_board()

    for _header, info in board.find_pin(key):
        if "gpio" not in info.interfaces:
            raise PinError(f"pin {spec!r} is {info.name}, not a GPIO; choose a GPIO pin")
        return info.name
    raise PinError(f"unknown pin {spec!r}; use a BCM GPIO number such as 17 or 'GPIO17'")


def check_pin_roles(roles: dict[str, int | str], *, board=None) -> dict[str, str]:
    """Normalise each role's pin and raise PinError if two roles name the same pin.

    ``roles`` maps a config key (pin_a, pin_b, pin_button) to its pin; the result maps
    the same keys to gpiozero names, so "GPIO17", "BCM17" and 17 collide as they should.
    """
    names = {}
    owner_of = {}
    for role, spec in roles.items():
        name = normalize_pin(spec, board=board)
        if name in owner_of:
            other = owner_of[name]
            raise PinError(
                f"pin {name} is given two roles: {other} = {roles[other]!r} and "
                f"{role} = {spec!r}; give each role its own pin"
            )
        owner_of[name] = role
        names[role] = name
    return names


def pin_error(exc: BaseException, *, pin: str, role: str) -> Exception:
    """Translate an error raised while claiming ``pin`` into PinError or DevicePermissionError.

    lgpio reports a line held by another process as lgpio.error('GPIO busy'); gpiozero
    reports a pin already used in this process as GPIOPinInUse. Errors that are not
    about the pin are returned unchanged, for the caller to re-raise.
    """
    from gpiozero.exc import GPIOPinInUse, PinError as GpiozeroPinError

    text = _describe(exc)
    if isinstance(exc, PermissionError):
        return DevicePermissionError(
            f"no permission to claim {pin} ({role}): {text}; add the service user to "
            f"the {GPIO_GROUP} group"
        )
    if isinstance(exc, GPIOPinInUse) or "busy" in text.lower() or "in use" in text.lower():
        return PinError(
            f"{pin} ({role}) is busy: {text}; stop the other program or device using it, "
            f"or choose another pin"
        )
    if isinstance(exc, GpiozeroPinError):
        return PinError(f"{pin} ({role}) cannot be used: {text}; choose another pin")
    return exc


def check_device_access(path: str) -> None:
    """Open ``path`` read-write once, raising DevicePermissionError or PinFactoryError on failure."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise PinFactoryError(
            f"GPIO device {path} not found; set [crank] gpiochip to a chip listed in /dev"
        ) from exc
    except PermissionError as exc:
        raise DevicePermissionError(
            f"no permission to open {path}; add the service user to the {GPIO_GROUP} "
            f"group (usermod -aG {GPIO_GROUP} USER) or grant it in the unit"
        ) from exc
    except OSError as exc:
        raise PinFactoryError(f"cannot open GPIO device {path}: {exc.strerror}") from exc
    os.close(fd)


def _load_factory_class(name: str):
    # gpiozero registers its factories under this entry-point group; loading one
    # imports its driver module, which is where a missing library shows up.
    for entry in entry_points(group="gpiozero_pin_factories"):
        if entry.name == name:
            try:
                return entry.load()
            except Exception as exc:  # ImportError, or a driver failing at import time
                if name == "lgpio" and isinstance(exc, OSError):
                    # Importing lgpio creates its notification FIFO (see _prepare_lgpio_workdir).
                    hint = "set RuntimeDirectory= in the unit or LG_WD to a writable directory"
                else:
                    hint = "install its driver or choose another [crank] pin_factory"
                raise PinFactoryError(
                    f"pin factory {name} is not usable: {_describe(exc)}; {hint}"
                ) from exc
    raise PinFactoryError(f"pin factory {name} is not registered by the installed gpiozero")


def _open_lgpio(factory_class, chip: int):
    device = f"/dev/gpiochip{chip}"
    check_device_access(device)
    try:
        return factory_class(chip=chip)
    except Exception as exc:  # lgpio.error carries only lgpio's error text
        raise PinFactoryError(f"pin factory lgpio failed to open {device}: {_describe(exc)}") from exc


def _prepare_lgpio_workdir(runtime_dir) -> None:
    # lgpio creates a FIFO named .lgd-nfyN for its edge notifications when the lgpio
    # module is imported. The C library builds the path from $LG_WD, else the current
    # directory, and then chdir()s the whole process there (lguGetWorkDir in lg's
    # lgUtil.c; LG_WD is defined in lgpio.h). With ProtectSystem=strict the current
    # directory is read-only and the import fails, so point LG_WD at the runtime
    # directory before gpiozero imports lgpio.
    workdir = os.fspath(runtime_dir) if runtime_dir is not None else None
    if workdir is None:
        # systemd sets RUNTIME_DIRECTORY (colon-separated if there are several).
        runtime = os.environ.get("RUNTIME_DIRECTORY")
        workdir = runtime.split(":")[0] if runtime else None
    if workdir is None:
        return

    if not os.path.isdir(workdir):
        raise PinFactoryError(
            f"lgpio working directory {workdir} not found; create it or set RuntimeDirectory="
        )
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise PinFactoryError(
            f"lgpio working directory {workdir} is not writable by this user; "
            f"lgpio creates its notification FIFO there"
        )
    if "lgpio" in sys.modules and os.environ.get("LG_WD") != workdir:
        # NOTE: lgpio reads LG_WD once, when first imported; a process that imported
        # it earlier keeps the old directory. Only the daemon imports it, so this is
        # a warning for embedding callers rather than an error.
        log.warning("lgpio was imported before LG_WD was set to %s; it keeps its old directory", workdir)
    os.environ["LG_WD"] = workdir


def _default_board():
    from gpiozero.pins.pi import PiBoardInfo

    return PiBoardInfo.from_revision(DEFAULT_REVISION)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]  # lgpio.error's str() is the repr of its message
    if isinstance(exc, OSError) and exc.errno is not None and not text:
        text = os.strerror(exc.errno) or errno.errorcode.get(exc.errno, "")
    return text or type(exc).__name__
