"""Assemble the appliance from a config and run it: `crankllm run` and the simulator share this."""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass

from appliance import __version__
from appliance.crank.events import CrankQueue
from appliance.crank.source import open_crank
from appliance.display import open_display
from appliance.service.control import ControlServer
from appliance.service.daemon import Daemon, Reload
from appliance.service.notify import Notifier
from appliance.service.serial_console import SerialConsole
from appliance.service.transcript import TranscriptWriter

log = logging.getLogger(__name__)


def runtime_directory(env=os.environ) -> str | None:
    """Return systemd's RuntimeDirectory for the unit, if it set one."""
    value = env.get("RUNTIME_DIRECTORY")
    return value.split(":")[0] if value else None


def display_options(section, **overrides) -> dict:
    """Map the [display] section onto open_display's keyword arguments."""
    options = {key: getattr(section, key) for key in section}
    options.update(overrides)
    return options


@dataclass
class Appliance:
    """The assembled parts; close() releases them in reverse order of opening."""

    daemon: Daemon
    queue: CrankQueue
    crank: object
    display: object
    control: ControlServer | None = None
    console: SerialConsole | None = None

    def close(self) -> None:
        self.queue.close()
        self.daemon.join()
        # The mirrors close after the worker, so they still receive the last story_ended.
        try:
            if self.console is not None:
                self.console.close()
            if self.control is not None:
                self.control.close()
            if self.crank is not None:
                self.crank.close()
        finally:
            if self.display is not None:
                self.display.close()


def assemble(
    config,
    *,
    notifier: Notifier | None = None,
    pin_factory=None,
    display_overrides: dict | None = None,
    transcripts_dir: str | None = None,
    prepare_missing_model: bool = False,
    config_loader=None,
    mirrors=None,
    control_socket: str | None = None,
) -> Appliance:
    """Open the display, the crank input and the transcript store, then start the daemon.

    ``control_socket`` is the path for the control socket, or None for none.

    Raises what failed (ConfigError, ModelError, DevicePermissionError, ...) after
    closing what was already opened.
    """
    crank_config = config.crank
    queue = CrankQueue(
        max_backlog=crank_config.max_backlog,
        detents_per_token=crank_config.detents_per_token,
        tokens_per_detent=crank_config.tokens_per_detent,
        reverse=crank_config.reverse,
    )
    display = None
    crank = None
    control = None
    console = None
    try:
        display = open_display(**display_options(config.display, **(display_overrides or {})))
        serial = config.serial
        crank = open_crank(
            queue=queue,
            source=crank_config.source,
            pin_factory=crank_config.pin_factory,
            gpiochip=crank_config.gpiochip,
            pin_a=crank_config.pin_a,
            pin_b=crank_config.pin_b,
            pin_button=crank_config.pin_button,
            pull_up=crank_config.pull_up,
            invert=crank_config.invert,
            transitions_per_detent=crank_config.transitions_per_detent,
            long_press=crank_config.long_press,
            button_bounce=crank_config.button_bounce,
            serial_port=serial.port,
            baudrate=serial.baudrate,
            max_line=serial.max_line,
            runtime_dir=runtime_directory(),
            factory=pin_factory,
        )
        transcripts = None
        if config.transcripts.enabled:
            transcripts = TranscriptWriter(
                transcripts_dir or config.effective_transcripts_dir,
                fsync_interval=config.transcripts.fsync_interval,
            )
        daemon = Daemon(
            config,
            queue=queue,
            display=display,
            notifier=notifier,
            transcripts=transcripts,
            mirrors=mirrors,
            prepare_missing_model=prepare_missing_model,
            config_loader=config_loader,
        )
        # Mirrors are added before the worker starts, because the worker iterates the list.
        if control_socket:
            control = ControlServer(
                control_socket, snapshot=daemon.snapshot, post=daemon.post, crank=queue.put_detent
            )
            control.start()
            daemon.mirrors.append(control)
        if serial.mode == "console":
            console = SerialConsole(serial.port, serial.baudrate, post=daemon.post, max_line=serial.max_line)
            console.start()
            daemon.mirrors.append(console)
        daemon.start()
    except BaseException:
        queue.close()
        if console is not None:
            console.close()
        if control is not None:
            control.close()
        if crank is not None:
            crank.close()
        if display is not None:
            display.close()
        raise
    return Appliance(
        daemon=daemon, queue=queue, crank=crank, display=display, control=control, console=console
    )


def run_service(config, *, config_loader) -> int:
    """Run until SIGTERM or SIGINT; SIGHUP reloads the configuration. Return the exit code.

    Signals are blocked in every thread and taken with sigwait() by the main thread,
    which only posts events into the queue, so no handler runs inside the worker.
    """
    handled = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    log.info("crankllm %s starting; config files: %s", __version__, ", ".join(config.files) or "none (built-in defaults)")
    appliance = assemble(
        config, config_loader=config_loader, control_socket=config.effective_control_socket
    )
    stopped = threading.Event()

    def wait_for_worker():
        appliance.daemon.join()
        stopped.set()
        # Wake the main thread's sigwait when the worker ends on its own.
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)

    threading.Thread(target=wait_for_worker, name="crankllm-watch", daemon=True).start()
    try:
        while not stopped.is_set():
            received = signal.sigwait(handled)
            if stopped.is_set():
                break
            if received == signal.SIGHUP:
                log.info("SIGHUP: reloading the configuration")
                appliance.daemon.post(Reload())
                continue
            log.info("%s: stopping", signal.Signals(received).name)
            appliance.daemon.stop()
            appliance.daemon.join()
            break
    finally:
        appliance.close()
    if appliance.daemon.exit_error is not None:
        return 70
    return 0
