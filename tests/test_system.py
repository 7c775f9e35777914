"""System test: systemd/crankllm.service under a real systemd, booted in a container.

tests/systemroot.py builds (and caches) a Debian 12 root with crankllm installed the
way the unit expects it, then boots it with systemd-nspawn. The service runs with the
mock pin factory and the dummy display, since a container has no GPIO or I2C.
A drop-in shortens the watchdog to 3 s and the restart delay to 1 s, so a watchdog
kill and the check for a restart loop each take seconds instead of half a minute.

Needs root, debootstrap and systemd-nspawn (Debian packages debootstrap and
systemd-container); the tests skip without them. Building the cached roots needs
the Debian mirror named in the APT sources, and PyPI unless pip's cache has every
wheel. The container itself has no network. Run it alone with `pytest -m system -rs`.
"""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest

import systemroot
from appliance.errors import EX_CONFIG
from appliance.service.transcript import read_transcript

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[1]
UNIT = "crankllm.service"
PROMPT = "Tell me about the crank."
CONTROL_PROMPT = "Describe the gears inside the box."
CONTROL_SOCKET = "/run/crankllm/control.sock"
CRANKLLM = systemroot.VENV + "/bin/crankllm"
TRANSCRIPTS = systemroot.STATE_DIR + "/transcripts"
BAD_DROPIN = systemroot.CONFIG_DIR + "/conf.d/99-bad.toml"

WATCHDOG_SEC = 3
RESTART_SEC = 1
DROPIN_NAME = "50-system-test.conf"
DROPIN = f"""\
# Shorter than the unit's 30 s watchdog and 5 s restart delay, so the test runs in seconds.
[Service]
WatchdogSec={WATCHDOG_SEC}
RestartSec={RESTART_SEC}
"""

# The unit's TimeoutStartSec=120, with a margin for systemctl itself.
START_TIMEOUT_S = 150
# Watchdog timeout, SIGABRT, restart delay and a new start.
WATCHDOG_RESTART_TIMEOUT_S = 60
# The unit's TimeoutStopSec=20, with a margin.
STOP_TIMEOUT_S = 40
# Three restart delays: long enough for a scheduled restart to show.
NO_RESTART_WINDOW_S = 3 * RESTART_SEC
POLL_INTERVAL_S = 0.2


def service_config(model_path: str) -> str:
    return f"""\
[model]
path = "{model_path}"
n_ctx = 256

[crank]
pin_factory = "mock"

[display]
driver = "dummy"

[prompts]
list = ["{PROMPT}"]
"""


class Service:
    """systemctl and journalctl for the crankllm unit inside the container."""

    def __init__(self, container: systemroot.Container):
        self.container = container

    def systemctl(self, *args: str, timeout: float = systemroot.COMMAND_TIMEOUT_S, check: bool = False):
        return self.container.run("systemctl", *args, timeout=timeout, check=check)

    def show(self, *properties: str) -> dict[str, str]:
        result = self.systemctl("show", UNIT, *(f"--property={name}" for name in properties), check=True)
        values = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        missing = set(properties) - set(values)
        assert not missing, f"systemctl show returned no {', '.join(sorted(missing))}: {result.stdout!r}"
        return values

    def journal(self, invocation_id: str | None = None) -> list[dict]:
        """Return the unit's journal entries, or only those of one run's process."""
        result = self.container.run("journalctl", "--unit", UNIT, "--output=json", "--no-pager")
        entries = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
        if invocation_id is not None:
            entries = [entry for entry in entries if entry.get("_SYSTEMD_INVOCATION_ID") == invocation_id]
        return entries

    def journal_text(self, lines: int = 60) -> str:
        result = self.container.run(
            "journalctl", "--unit", UNIT, "--output=short-monotonic", "--no-pager", f"--lines={lines}", check=False,
        )
        return result.stdout + result.stderr

    def wait_for(self, condition, timeout: float, description: str, *properties: str) -> dict[str, str]:
        """Poll ``show(*properties)`` until ``condition(values)`` is true, and fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            values = self.show(*properties)
            if condition(values):
                return values
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {description}; last {values}\n{self.journal_text()}")
            time.sleep(POLL_INTERVAL_S)

    def stays(self, condition, duration: float, description: str, *properties: str) -> dict[str, str]:
        """Poll ``show(*properties)`` for ``duration`` seconds, and fail as soon as ``condition(values)`` is false."""
        deadline = time.monotonic() + duration
        while True:
            values = self.show(*properties)
            assert condition(values), f"expected {description}, found {values}\n{self.journal_text()}"
            if time.monotonic() > deadline:
                return values
            time.sleep(POLL_INTERVAL_S)

    def ensure_active(self) -> dict[str, str]:
        """Start the service unless it is running, and return its MainPID, NRestarts and InvocationID."""
        if self.show("ActiveState")["ActiveState"] != "active":
            self.systemctl("reset-failed", UNIT)
            result = self.systemctl("start", UNIT, timeout=START_TIMEOUT_S)
            assert result.returncode == 0, f"systemctl start failed: {result.stderr}\n{self.journal_text()}"
        return self.show("ActiveState", "MainPID", "NRestarts", "InvocationID")


def newest_transcript(service: Service) -> Path:
    """Return the host path of the transcript written last, through the container's root."""
    files = sorted(service.container.path(TRANSCRIPTS).glob("*.txt"), key=lambda path: path.stat().st_mtime_ns)
    assert files, f"no transcript in {TRANSCRIPTS}"
    return files[-1]


def message(entry: dict) -> str:
    """Return an entry's MESSAGE as text. journalctl writes a non-UTF-8 message as a byte array."""
    value = entry.get("MESSAGE", "")
    if isinstance(value, list):
        return bytes(value).decode("utf-8", "replace")
    return value


def find_entry(entries: list[dict], text: str) -> dict | None:
    return next((entry for entry in entries if text in message(entry)), None)


@pytest.fixture(scope="module")
def service(request, tmp_path_factory):
    reason = systemroot.missing_prerequisites()
    if reason is not None:
        pytest.skip(f"system test skipped: {reason}")
    model = Path(request.getfixturevalue("default_model"))
    spec = systemroot.ServiceSpec(
        repo=REPO,
        model=model,
        config=service_config(f"{systemroot.MODELS_DIR}/{model.name}"),
        dropin_name=DROPIN_NAME,
        dropin=DROPIN,
    )
    with systemroot.service_root(spec) as root:
        with systemroot.booted(root, tmp_path_factory.mktemp("container")) as container:
            yield Service(container)


def test_boot_starts_enabled_service(service):
    values = service.show("UnitFileState", "ActiveState", "SubState", "NRestarts")

    assert values["UnitFileState"] == "enabled"
    # `systemctl is-system-running` returns "running" only when the boot jobs are done,
    # and for a Type=notify unit that includes waiting for READY=1.
    assert values["ActiveState"] == "active", service.journal_text()
    assert values["SubState"] == "running"
    assert values["NRestarts"] == "0"


def test_start_returns_after_ready(service):
    if service.show("ActiveState")["ActiveState"] != "inactive":
        service.systemctl("stop", UNIT, timeout=STOP_TIMEOUT_S, check=True)
    service.systemctl("reset-failed", UNIT)

    # For Type=notify, `systemctl start` waits for READY=1 (or a failure).
    result = service.systemctl("start", UNIT, timeout=START_TIMEOUT_S)
    assert result.returncode == 0, f"systemctl start failed: {result.stderr}\n{service.journal_text()}"

    values = service.show(
        "ActiveState", "SubState", "StatusText", "InvocationID",
        "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic",
    )
    assert values["ActiveState"] == "active"
    assert values["SubState"] == "running"
    # The daemon sends STATUS= in the same datagram as READY=1.
    assert values["StatusText"].startswith("ready: story 1, 0 tokens"), values["StatusText"]

    entries = service.journal(values["InvocationID"])
    loaded = find_entry(entries, "model loaded:")
    assert loaded is not None, service.journal_text()
    exec_start = int(values["ExecMainStartTimestampMonotonic"])
    active_enter = int(values["ActiveEnterTimestampMonotonic"])
    # The model-loaded line is written before the warm-up decode and READY=1, and the
    # journal and systemd both use CLOCK_MONOTONIC: the unit became active after the
    # model had loaded, not when the process started.
    assert exec_start < int(loaded["__MONOTONIC_TIMESTAMP"]) <= active_enter, service.journal_text()
    # NOTE: the daemon logs its "ready" line after sending READY=1, so the journal
    # usually shows it just after systemd's "Started" line. The line and READY=1 go
    # through different sockets (to journald and to systemd), so their order in the
    # journal is not guaranteed either way, and only the line's presence is checked.
    assert find_entry(entries, "ready: crank to generate") is not None, service.journal_text()


def test_journal_has_service_lines(service):
    values = service.ensure_active()
    entries = service.journal(values["InvocationID"])

    for text in ("starting; config files: /etc/crankllm/crankllm.toml", "model loaded:", "ready: crank to generate"):
        entry = find_entry(entries, text)
        assert entry is not None, f"no journal line with {text!r}\n{service.journal_text()}"
        assert entry["SYSLOG_IDENTIFIER"] == "crankllm"
        assert entry["_SYSTEMD_UNIT"] == UNIT
        assert entry["_PID"] == values["MainPID"]
        # journald turns the daemon's "<6>" prefix on stderr into PRIORITY=6 (info) and strips it.
        assert entry["PRIORITY"] == "6"
        assert not message(entry).startswith("<")


def test_watchdog_restarts_frozen_service(service):
    before = service.ensure_active()
    # The running story's file, created when the service became ready.
    story_file = newest_transcript(service)

    service.systemctl("kill", "--signal=SIGSTOP", UNIT, check=True)

    def restarted(values):
        return (
            int(values["NRestarts"]) > int(before["NRestarts"])
            and values["ActiveState"] == "active"
            and values["MainPID"] != before["MainPID"]
        )

    after = service.wait_for(
        restarted, WATCHDOG_RESTART_TIMEOUT_S, "a watchdog restart",
        "NRestarts", "ActiveState", "SubState", "MainPID", "InvocationID",
    )
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    assert after["SubState"] == "running"
    assert after["MainPID"] != "0"

    manager_lines = [
        entry for entry in service.journal()
        if entry.get("INVOCATION_ID") == before["InvocationID"] and entry.get("_PID") == "1"
    ]
    assert find_entry(manager_lines, "Watchdog timeout") is not None, service.journal_text()
    assert find_entry(service.journal(after["InvocationID"]), "ready: crank to generate") is not None

    # The SIGABRT left no footer, but what was written reads back.
    record = read_transcript(str(story_file))
    assert not record.complete
    assert record.header["prompt"] == PROMPT


def test_config_error_fails_without_restart(service):
    service.ensure_active()
    bad_file = service.container.path(BAD_DROPIN)
    bad_file.write_text("[model]\nno_such_key = 1\n", encoding="utf-8")
    bad_file.chmod(0o644)
    try:
        result = service.systemctl("restart", UNIT, timeout=START_TIMEOUT_S)
        assert result.returncode != 0, "systemctl restart succeeded with an invalid config"

        values = service.show(
            "ActiveState", "SubState", "Result", "ExecMainCode", "ExecMainStatus", "NRestarts", "InvocationID",
        )
        assert values["ActiveState"] == "failed", service.journal_text()
        # RestartPreventExitStatus=78: "failed" instead of "auto-restart", so no
        # restart is scheduled.
        assert values["SubState"] == "failed"
        assert values["Result"] == "exit-code"
        # CLD_EXITED: the process exited, and no signal killed it.
        assert values["ExecMainCode"] == "1"
        assert values["ExecMainStatus"] == str(EX_CONFIG)
        # systemd sets NRestarts to 0 when a start is requested by hand, and counts
        # only automatic restarts from there.
        assert values["NRestarts"] == "0"

        entries = service.journal(values["InvocationID"])
        error = find_entry(entries, "99-bad.toml: [model] no_such_key: unknown key")
        assert error is not None, service.journal_text()
        assert error["PRIORITY"] == "3"

        # Watch for longer than RestartSec: the unit stays failed and is not restarted.
        later = service.stays(
            lambda values: values["ActiveState"] == "failed" and values["NRestarts"] == "0",
            NO_RESTART_WINDOW_S, "a failed unit with no restarts", "ActiveState", "NRestarts",
        )
        assert later["NRestarts"] == "0"
    finally:
        bad_file.unlink(missing_ok=True)

    result = service.systemctl("restart", UNIT, timeout=START_TIMEOUT_S)
    assert result.returncode == 0, f"systemctl restart failed: {result.stderr}\n{service.journal_text()}"
    assert service.show("ActiveState")["ActiveState"] == "active"


def test_control_socket_answers_status(service):
    values = service.ensure_active()
    socket_path = service.container.path(CONTROL_SOCKET)

    assert socket_path.is_socket(), f"no control socket at {CONTROL_SOCKET}"
    info = socket_path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o660
    group_line = service.container.run("getent", "group", systemroot.SERVICE_USER).stdout
    assert info.st_gid == int(group_line.split(":")[2])

    result = service.container.run(CRANKLLM, "status")
    fields = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    assert fields.get("state", "").strip() == "ready", result.stdout
    assert fields.get("model", "").strip().startswith(systemroot.MODELS_DIR + "/"), result.stdout
    assert service.show("MainPID")["MainPID"] == values["MainPID"]


CRANK_DETENTS = 12


def test_stop_exits_cleanly_with_transcript_flushed(service):
    running = service.ensure_active()
    # Start a second story from the control socket, so that the stop ends a story
    # that began after start-up.
    service.container.run(CRANKLLM, "prompt", CONTROL_PROMPT)
    # Turn the crank through the control socket, the only way in from outside the
    # sandbox, and wait until the worker has handled every detent.
    service.container.run(CRANKLLM, "crank", str(CRANK_DETENTS))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = service.container.run(CRANKLLM, "status").stdout
        if "pending 0" in status and f"received {CRANK_DETENTS}," in status:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the crank detents were not handled in time:\n{status}")

    result = service.systemctl("stop", UNIT, timeout=STOP_TIMEOUT_S)
    assert result.returncode == 0, f"systemctl stop failed: {result.stderr}\n{service.journal_text()}"

    values = service.show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus", "InvocationID")
    # The values below describe the run that was stopped, not a reloaded unit.
    assert values["InvocationID"] == running["InvocationID"]
    assert values["ActiveState"] == "inactive"
    assert values["Result"] == "success", service.journal_text()
    assert values["ExecMainCode"] == "1"
    assert values["ExecMainStatus"] == "0"

    story_file = newest_transcript(service)
    record = read_transcript(str(story_file))
    assert record.complete, f"{story_file.name} has no footer"
    assert record.end_reason == "stop"
    # The model may end its text before the last detent, so fewer tokens are possible.
    assert 0 < record.tokens <= CRANK_DETENTS
    assert record.text.strip()
    assert record.header["story"] == 2
    assert record.header["prompt"] == CONTROL_PROMPT
    assert record.header["model"].startswith(systemroot.MODELS_DIR + "/")
