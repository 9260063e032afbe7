"""Which settings of a run config differ from a checkpoint's, said key by key (for refusing a resume)."""

from __future__ import annotations

from typing import Any


def config_differences(saved: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]],
                       ignore: dict[str, set[str]] | None = None) -> list[str]:
    """Every key whose value differs between two ``RunConfig.to_dict()`` results, in the form
    ``"model.n_latent: 10 in the checkpoint, 20 now"``, sorted by section and key.

    Args:
        saved: the checkpoint's config.
        now: the config of this invocation.
        ignore: per section, keys that may differ (they change neither the data order nor the optimisation).

    Returns:
        One line per differing key (empty when the configs agree). A key present on one side only (a setting
        added by a newer version) counts as a difference, shown as "unset" on the other side.
    """
    ignore = ignore or {}
    lines = []
    for section in sorted(set(saved) | set(now)):
        a, b = saved.get(section) or {}, now.get(section) or {}
        for key in sorted(set(a) | set(b)):
            if key in ignore.get(section, set()):
                continue
            before, after = a.get(key, _UNSET), b.get(key, _UNSET)
            if before != after:
                lines.append(f"{section}.{key}: {_show(before)} in the checkpoint, {_show(after)} now")
    return lines


_UNSET = object()


def _show(value: Any) -> str:
    # repr keeps strings quoted, so `'batch'` and `batch ` (a typo with a space) stay distinguishable.
    return "unset" if value is _UNSET else repr(value)
