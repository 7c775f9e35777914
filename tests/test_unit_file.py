"""Tests for systemd/crankllm.service: systemd-analyze verify and security, and its key settings.

systemd-analyze writes /run/systemd/systemd-units-load while it loads a unit, so both
commands run in a private mount namespace with a tmpfs over /run/systemd. That needs
root and unshare(1); the tests skip without them.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from appliance.errors import EX_CONFIG, EX_NOPERM

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "crankllm.service"
EXEC_START = "/opt/crankllm/venv/bin/crankllm"
MAX_EXPOSURE = 2.0
LEFTOVER = Path("/run/systemd/systemd-units-load")


def unit_settings(text: str) -> dict[str, list[tuple[str, str]]]:
    """Parse unit text into {section: [(key, value), ...]}, keeping repeated keys."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(section: str, key: str) -> list[str]:
    return [value for name, value in unit_settings(UNIT.read_text())[section] if name == key]


def needs_analyze():
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed (Debian package util-linux)")
    if os.geteuid() != 0:
        pytest.skip("a private mount namespace for systemd-analyze needs root")


def run_analyze(*args: str) -> subprocess.CompletedProcess:
    """Run systemd-analyze with a throwaway tmpfs over /run/systemd (or /run where that is missing)."""
    scratch = "/run/systemd" if os.path.isdir("/run/systemd") else "/run"
    command = [
        "unshare", "--mount", "--propagation", "private",
        "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec systemd-analyze "$@"', scratch, *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture
def runnable_unit(tmp_path):
    """A copy of the unit whose ExecStart names a program that exists, for verify."""
    text = UNIT.read_text().replace(f"ExecStart={EXEC_START} ", "ExecStart=/bin/true ")
    assert "ExecStart=/bin/true run" in text
    copy = tmp_path / "crankllm.service"
    copy.write_text(text)
    return copy


def test_verify_passes(runnable_unit):
    needs_analyze()
    result = run_analyze("verify", str(runnable_unit))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout == ""


def test_verify_only_misses_binary():
    needs_analyze()
    result = run_analyze("verify", str(UNIT))
    complaints = [line for line in result.stderr.splitlines() if line.strip()]
    assert complaints
    for line in complaints:
        assert EXEC_START in line, line


def test_security_exposure_is_low():
    needs_analyze()
    result = run_analyze("security", "--offline=true", str(UNIT))
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for crankllm\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE


def test_security_threshold():
    needs_analyze()
    # --threshold takes the exposure times ten and fails above it.
    result = run_analyze("security", "--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}", str(UNIT))
    assert result.returncode == 0, result.stdout


def test_analyze_leaves_no_file(runnable_unit):
    needs_analyze()
    existed = LEFTOVER.exists()
    run_analyze("verify", str(runnable_unit))
    assert LEFTOVER.exists() == existed


def test_restart_skips_config_and_permission_errors():
    statuses = set(values("Service", "RestartPreventExitStatus")[0].split())
    assert statuses == {str(EX_NOPERM), str(EX_CONFIG)}


def test_type_notify_with_watchdog():
    assert values("Service", "Type") == ["notify"]
    assert values("Service", "NotifyAccess") == ["main"]
    assert values("Service", "WatchdogSec") == ["30"]


def test_reload_sends_sighup():
    assert values("Service", "ExecReload") == ["/bin/kill -HUP $MAINPID"]


def test_runs_crankllm_as_own_user():
    assert values("Service", "ExecStart") == [f"{EXEC_START} run"]
    assert values("Service", "User") == ["crankllm"]
    assert values("Service", "Group") == ["crankllm"]


def test_device_access_is_listed():
    allowed = {value.split()[0] for value in values("Service", "DeviceAllow")}
    assert values("Service", "DevicePolicy") == ["closed"]
    for group in ("char-gpiochip", "char-i2c", "char-spi", "char-ttyS", "char-ttyAMA", "char-ttyUSB", "char-ttyACM"):
        assert group in allowed, group


def test_no_settings_newer_than_systemd_252():
    names = {name for name, _ in unit_settings(UNIT.read_text())["Service"]}
    assert "RestartSteps" not in names
    assert "RestartMaxDelaySec" not in names
