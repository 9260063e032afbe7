"""``streamtotal config``: print the default run config, documented, as a starting TOML file."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config",
        help="print the default run config (TOML, every key documented)",
        description="Prints every [data], [model] and [train] key with its default and meaning. Save it, edit it, "
        "and pass it to `streamtotal train --config FILE`. --markdown prints the reference tables of docs/config.md.",
    )
    p.add_argument("--markdown", action="store_true", help="Markdown tables instead of TOML")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from streamtotal.config_docs import default_config_toml, markdown_reference

    print(markdown_reference() if args.markdown else default_config_toml())
