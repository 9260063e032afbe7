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
from streamtotal.errors import StreamtotalError

COMMANDS = (demo_cmd, simulate_cmd, ingest_cmd, train_cmd, embed_cmd, denoise_cmd, sample_cmd, elbo_cmd, predict_cmd,
            map_cmd, de_cmd, evaluate_cmd, import_scvi_cmd, config_cmd)


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
    """Runs the command line; returns (and exits with) its status: 0 ok, 2 bad input or config."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (StreamtotalError, LoaderError) as e:
        print(f"streamtotal {args.command}: error: {e}", file=sys.stderr)
        if __name__ == "__main__" or argv is None:
            sys.exit(2)
        return 2
    return 0


if __name__ == "__main__":
    main()
