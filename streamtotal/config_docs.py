"""Field docstrings of config dataclasses, read from their source, for ``streamtotal config`` and the README.

The dataclasses are the schema; this keeps the reference from drifting away from it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap

from streamtotal.config import RunConfig
from streamtotal.config_io import _toml_value, to_dict


def field_docs(cls: type) -> dict[str, str]:
    """``{field name: docstring}`` for a dataclass whose fields are followed by string literals."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def default_config_toml() -> str:
    """The default run config as TOML, every key preceded by its documentation as a comment."""
    config = RunConfig()
    lines = ["# streamtotal run config: every key, its default and what it means.", ""]
    for section in ("data", "model", "train"):
        obj = getattr(config, section)
        docs = field_docs(type(obj))
        lines.append(f"[{section}]")
        for f in dataclasses.fields(obj):
            value = to_dict(obj)[f.name]
            for doc_line in textwrap.wrap(docs.get(f.name, ""), 100):
                lines.append(f"# {doc_line}")
            lines.append(f"# {f.name} = (unset)" if value is None else f"{f.name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def markdown_reference() -> str:
    """The config reference as Markdown tables (one per section)."""
    config = RunConfig()
    out = []
    for section in ("data", "model", "train"):
        obj = getattr(config, section)
        docs = field_docs(type(obj))
        out += [f"### `[{section}]`", "", "| key | default | meaning |", "| --- | --- | --- |"]
        for f in dataclasses.fields(obj):
            value = to_dict(obj)[f.name]
            shown = "unset" if value is None else _toml_value(value)
            out.append(f"| `{f.name}` | `{shown}` | {docs.get(f.name, '')} |")
        out.append("")
    return "\n".join(out)
