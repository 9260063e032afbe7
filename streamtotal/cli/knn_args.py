"""The kNN label-transfer flags shared by ``streamtotal map --predict`` and ``streamtotal predict``."""

from __future__ import annotations

import argparse

from streamtotal.inference.knn_transfer import KnnConfig


def add_knn_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the ``--labels-key`` / ``--knn-*`` flags (a group of their own in ``-h``)."""
    d = KnnConfig()
    g = p.add_argument_group("kNN label transfer (totalVI references, which have no classifier)")
    g.add_argument("--labels-key", help="obs column of the reference stores holding the labels: transfer them by a "
                   "weighted vote of the k nearest labelled reference cells in the latent (scArches); the "
                   "unlabeled category never votes")
    g.add_argument("--knn-k", type=int, default=d.k, help=f"neighbours per cell (default {d.k})")
    g.add_argument("--knn-max-cells-per-label", type=int, default=d.max_cells_per_label,
                   help=f"reference cells sampled per label, bounding memory (default {d.max_cells_per_label})")
    g.add_argument("--knn-seed", type=int, default=d.seed, help=f"seed of that sample (default {d.seed})")
    g.add_argument("--reference-latent-key",
                   help="read the reference cells' latent from this obsm key of the reference stores (written by "
                   "`streamtotal embed` with the same encoder) instead of encoding them")


def knn_config_from_args(args: argparse.Namespace, reference_run: str | None = None) -> KnnConfig | None:
    """The KnnConfig the flags ask for; None without ``--labels-key`` (the totalANVI classifier predicts)."""
    if not args.labels_key:
        return None
    return KnnConfig(labels_key=args.labels_key, k=args.knn_k, max_cells_per_label=args.knn_max_cells_per_label,
                     seed=args.knn_seed, reference_run=reference_run, latent_key=args.reference_latent_key)
