"""The command reference of docs/cli.md, generated from the argument parser, so that it cannot drift from the
flags the commands take (tests/streamtotal/test_readme.py checks the file against it).

Regenerate: ``python -m streamtotal.cli.cli_docs``, pasted between the markers of docs/cli.md."""

from __future__ import annotations

import argparse
import os


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps subcommands only here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def markdown_commands() -> str:
    """One section per command: its description and its usage line, in the order ``streamtotal -h`` lists them."""
    from streamtotal.cli.main import build_parser

    # argparse wraps usage at the terminal's width: fix it while formatting, so the docs do not depend on it
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "110"
    try:
        parts = []
        for name, sub in _subparsers(build_parser()).items():
            usage = sub.format_usage().strip().replace("usage: ", "", 1)
            parts.append(f"### `streamtotal {name}`\n\n{(sub.description or '').strip()}\n\n```\n{usage}\n```\n")
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved
    return "\n".join(parts)


if __name__ == "__main__":  # python -m streamtotal.cli.cli_docs: the block between docs/cli.md's markers
    print(markdown_commands())
