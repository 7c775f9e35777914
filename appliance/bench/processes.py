"""Benchmark phases that start processes: start to ready, idle CPU and peak memory.

Each round starts two fresh processes, one after the other, and times each from just
before the fork to the READY=1 datagram it sends to a notify socket that this module
binds, as systemd would:

- the daemon: `crankllm run --config FILE`;
- the reference: `python -c START_SCRIPT`, which imports llama_cpp, loads the model,
  decodes the same prompt with the same context settings and sends READY=1.

The last daemon is left running at rest for the idle and memory figures, then stopped
with SIGTERM as systemd stops it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from appliance.bench import procfs
from appliance.bench.bare import START_SCRIPT
from appliance.bench.errors import BenchError
from appliance.bench.plan import Plan

log = logging.getLogger(__name__)

# Variables a parent service manager may have set that must not reach the children.
_SERVICE_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                      "LISTEN_FDNAMES", "JOURNAL_STREAM", "CRANKLLM_CONFIG", "RUNTIME_DIRECTORY",
                      "STATE_DIRECTORY")
# How often a wait for READY=1 checks whether the process died instead.
_POLL_S = 0.05
# The watchdog that systemd/crankllm.service sets (WatchdogSec=30), so the daemon at
# rest wakes to ping it as it does on the appliance.
WATCHDOG_USEC = 30_000_000


@dataclass(frozen=True)
class ReferenceStart:
    """Arguments of the reference process: the model, the context settings and the formatted prompt."""

    model_path: str
    n_ctx: int
    n_batch: int
    n_threads: int
    use_extra_bufts: bool
    prompt_text: str
    special: bool

    def command(self) -> list[str]:
        return [sys.executable, "-c", START_SCRIPT, self.model_path, str(self.n_ctx), str(self.n_batch),
                str(self.n_threads), "1" if self.use_extra_bufts else "0", "1" if self.special else "0",
                self.prompt_text]


class _Started:
    """A child process and the notify socket it reports to."""

    def __init__(self, name: str, command: list[str], workdir: str, index: int, env: dict | None = None):
        self.name = name
        self.socket_path = os.path.join(workdir, f"notify-{name}-{index}.sock")
        self.log_path = os.path.join(workdir, f"{name}-{index}.log")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.socket.bind(self.socket_path)
        self.socket.settimeout(_POLL_S)
        child_env = {key: value for key, value in os.environ.items() if key not in _SERVICE_VARIABLES}
        child_env.update(env or {})
        child_env["NOTIFY_SOCKET"] = self.socket_path
        self._log = open(self.log_path, "wb")
        self.started = time.monotonic()
        try:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log,
                                            stderr=subprocess.STDOUT, env=child_env)
        except OSError:
            self.close()
            raise

    def wait_ready(self, timeout: float) -> float:
        """Return seconds from start to READY=1; raise BenchError if the process dies or times out."""
        deadline = self.started + timeout
        while True:
            try:
                message = self.socket.recv(4096)
            except TimeoutError:
                message = b""
            if b"READY=1" in message.split(b"\n"):
                return time.monotonic() - self.started
            if self.process.poll() is not None:
                raise BenchError(f"{self.name} exited with code {self.process.returncode} before READY=1; "
                                 f"its output:\n{self.output_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} sent no READY=1 within {timeout:.0f} s; its output:\n"
                                 f"{self.output_tail()}")

    def stop(self, timeout: float) -> int:
        """Send SIGTERM (if still running) and return the exit code; SIGKILL after ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not exit within %.0f s of SIGTERM; killing it", self.name, timeout)
            self.process.kill()
            code = self.process.wait()
        self.close()
        return code

    def wait_exit(self, timeout: float) -> int:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{self.name} did not exit within {timeout:.0f} s after READY=1") from None
        self.close()
        return code

    def close(self) -> None:
        self.socket.close()
        self._log.close()
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)

    def output(self) -> str:
        with open(self.log_path, "rb") as file:
            return file.read().decode("utf-8", errors="replace")

    def output_tail(self, lines: int = 20) -> str:
        return "\n".join(self.output().splitlines()[-lines:])


def _reference_round(reference: ReferenceStart, workdir: str, index: int, plan: Plan) -> dict:
    child = _Started("reference", reference.command(), workdir, index)
    try:
        seconds = child.wait_ready(plan.process_timeout_s)
        code = child.wait_exit(plan.process_timeout_s)
    except BaseException:
        child.stop(5.0)
        raise
    if code != 0:
        raise BenchError(f"the reference process exited with code {code}; its output:\n{child.output_tail()}")
    hwm = None
    for line in child.output().splitlines():
        words = line.split()
        if words[:1] == ["tokens"] and "VmHWM" in words:
            hwm = int(words[words.index("VmHWM") + 1]) * 1024
    return {"seconds": seconds, "vm_hwm": hwm}


def _measure_idle(child: _Started, plan: Plan) -> dict:
    time.sleep(plan.idle_settle_s)
    pid = child.process.pid
    before = procfs.cpu_sample(pid)
    started = time.monotonic()
    time.sleep(plan.idle_s)
    after = procfs.cpu_sample(pid)
    wall = time.monotonic() - started
    stat_cpu = after.stat_s - before.stat_s
    precise = None
    if after.schedstat_s is not None and before.schedstat_s is not None:
        precise = after.schedstat_s - before.schedstat_s
    return {
        "wall_s": wall,
        "cpu_s": precise if precise is not None else stat_cpu,
        "cpu_source": "schedstat" if precise is not None else "stat",
        "stat_cpu_s": stat_cpu,
        "stat_resolution_s": 1 / procfs.CLOCK_TICKS,
        "context_switches": after.switches - before.switches,
        "threads": after.threads,
    }


def daemon_command(config_path: str) -> list[str]:
    """Return `crankllm run --config FILE`, the console script beside this Python if installed."""
    script = os.path.join(os.path.dirname(sys.executable), "crankllm")
    if os.access(script, os.X_OK):
        return [script, "run", "--config", config_path]
    return [sys.executable, "-m", "appliance", "run", "--config", config_path]


def measure_processes(config_path: str, reference: ReferenceStart, workdir: str, plan: Plan) -> dict:
    """Alternate reference and daemon starts; measure idle CPU and peak RSS of the last daemon."""
    command = daemon_command(config_path)
    rounds = []
    idle = memory = None
    exit_codes = []
    for index in range(plan.start_rounds):
        last = index == plan.start_rounds - 1
        reference_first = index % 2 == 0
        if reference_first:
            ref = _reference_round(reference, workdir, index, plan)
        child = _Started("daemon", command, workdir, index, env={"WATCHDOG_USEC": str(WATCHDOG_USEC)})
        try:
            seconds = child.wait_ready(plan.process_timeout_s)
            if last:
                log.info("idle: daemon pid %d at rest for %.0f s", child.process.pid, plan.idle_s)
                idle = _measure_idle(child, plan)
                memory = procfs.memory(child.process.pid)
                memory["threads"] = idle["threads"]
        finally:
            code = child.stop(plan.process_timeout_s)
        if code != 0:
            # The start was measured all the same; a stop that is not clean is reported, not fatal.
            log.warning("`crankllm run` exited with code %d after SIGTERM (0 is a clean stop); its output "
                        "ends:\n%s", code, child.output_tail(5))
        exit_codes.append(code)
        if not reference_first:
            ref = _reference_round(reference, workdir, index, plan)
        rounds.append({"daemon_s": seconds, "reference_s": ref["seconds"], "ratio": seconds / ref["seconds"],
                       "reference_vm_hwm": ref["vm_hwm"]})
        log.info("start to ready: round %d of %d: daemon %.2f s, reference %.2f s",
                 index + 1, plan.start_rounds, seconds, ref["seconds"])
    return {"rounds": rounds, "idle": idle | {"watchdog_usec": WATCHDOG_USEC}, "memory": memory,
            "daemon_exit_codes": exit_codes,
            "daemon_command": command}
