"""Entry point of the ``streamtotal`` command."""

from __future__ import annotations

import argparse
import sys

from loaders.errors import LoaderError
from streamtotal import __version__
from streamtotal.cli import config_cmd, de_cmd, demo_cmd, denoise_cmd, embed_cmd, ingest_cmd, simulate_cmd, train_cmd
from streamtotal.cli import predict_cmd
from streamtotal.cli import map_cmd
from streamtotal.cli import evaluate_cmd
from streamtotal.cli import elbo_cmd, sample_cmd
from streamtotal.cli import import_scvi_cmd
from streamtotal.cli import export_scvi_cmd
from streamtotal.cli import info_cmd
from streamtotal.cli.log_setup import configure_cli_logging
from streamtotal.cli.path_errors import path_error_message
from streamtotal.cli.pipe_safe_output import pipe_safe_output
from streamtotal.errors import StreamtotalError

COMMANDS = (demo_cmd, simulate_cmd, ingest_cmd, train_cmd, embed_cmd, denoise_cmd, sample_cmd, elbo_cmd, predict_cmd,
            map_cmd, de_cmd, evaluate_cmd, import_scvi_cmd, export_scvi_cmd, config_cmd, info_cmd)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="streamtotal",
        description="Out-of-core, streaming totalVI for atlas-scale CITE-seq. Run `streamtotal COMMAND -h` for help.",
    )
    parser.add_argument("--version", action="version", version=f"streamtotal {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns (and exits with) its status: 0 ok, 2 bad input or config.

    Bad input is our own errors and OS errors about a named path (``path_errors``): one line on stderr, exit 2.
    Any other exception is a bug and keeps its traceback. A reader of stdout that leaves early (``| head``) is no
    error: the work completes and the rest of the output is dropped (``pipe_safe_output``).
    """
    args = build_parser().parse_args(argv)
    configure_cli_logging()  # the library logs, never prints: its reports reach the terminal through this
    with pipe_safe_output():
        status = _run(args)
    if status and (__name__ == "__main__" or argv is None):
        sys.exit(status)
    return status


def _run(args: argparse.Namespace) -> int:
    try:
        args.run(args)
    except (StreamtotalError, LoaderError) as e:
        message = str(e)
    except OSError as e:
        message = path_error_message(e)
        if message is None:
            raise
    else:
        return 0
    print(f"streamtotal {args.command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    main()
