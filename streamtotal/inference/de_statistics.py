"""The Bayesian "change" mode of differential expression, on posterior samples already drawn (pure numpy).

Given S1 posterior samples of a group's normalised expression and S2 of another's (rows = samples, columns =
features): pair them (``pair_indices``), take log2 fold changes (``lfc_samples``), and summarise per feature
(``change_statistics``): P(DE) = P(|LFC| > delta), the Bayes factor log(P(DE) / (1 - P(DE))), LFC mean, median
and standard deviation; ``fdr_calls`` then calls features at a target posterior expected FDR. Same semantics as
Boyeau et al. and scvi-tools' ``mode="change"`` (written from their description).
"""

from __future__ import annotations

import numpy as np

from streamtotal.errors import ConfigError

BAYES_EPS = 1e-8
"""Added inside both logarithms of the Bayes factor (as scvi-tools), so P(DE) = 0 or 1 gives a finite value."""


def pair_indices(
    n1: int, n2: int, rng: np.random.Generator, n_pairs: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Random pairs of sample indexes of two groups.

    Each group's samples are shuffled and cycled through, so every sample is used ``floor`` or ``ceil`` of
    ``n_pairs / n`` times (less variance than drawing with replacement).

    Args:
        n1: samples of group 1.
        n2: samples of group 2.
        rng: random source.
        n_pairs: pairs to make; None = ``max(n1, n2)``.

    Returns:
        ``(i, j)`` int64 arrays of length ``n_pairs``: sample ``i[k]`` of group 1 is paired with ``j[k]`` of group 2.
    """
    if n1 < 1 or n2 < 1:
        raise ConfigError(f"both groups need samples to pair; got {n1} and {n2}")
    m = max(n1, n2) if n_pairs is None else int(n_pairs)
    if m < 1:
        raise ConfigError(f"n_pairs must be >= 1; got {n_pairs!r}")

    def cycle(n: int) -> np.ndarray:
        reps = -(-m // n)
        return np.concatenate([rng.permutation(n) for _ in range(reps)])[:m].astype(np.int64)

    return cycle(n1), cycle(n2)


def lfc_samples(expr1: np.ndarray, expr2: np.ndarray, i: np.ndarray, j: np.ndarray, pseudocount: float) -> np.ndarray:
    """``[n_pairs, F]`` log2 fold changes ``log2(expr1[i] + pc) - log2(expr2[j] + pc)`` (float32)."""
    a = np.log2(expr1[i].astype(np.float64) + pseudocount)
    b = np.log2(expr2[j].astype(np.float64) + pseudocount)
    return (a - b).astype(np.float32)


def bayes_factor(proba_de: np.ndarray) -> np.ndarray:
    """log(P(DE) + eps) - log(1 - P(DE) + eps), eps = ``BAYES_EPS``: the log posterior odds of DE."""
    p = np.asarray(proba_de, dtype=np.float64)
    return np.log(p + BAYES_EPS) - np.log(1.0 - p + BAYES_EPS)


TEST_MODES = ("three", "two")


def change_statistics(lfc: np.ndarray, delta: float, *, test_mode: str = "three",
                      summary_lfc: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-feature summary of LFC samples ``[n_pairs, F]``, as scvi-tools' change mode computes it.

    Args:
        lfc: LFC samples with the comparison's pseudocount (what P(DE) is read from).
        delta: the change threshold.
        test_mode: "three" (scvi-tools' default): P(DE) = max(P(LFC >= delta), P(LFC <= -delta)), the probability
            of the more likely direction; "two": P(LFC >= delta) + P(LFC <= -delta) (= P(|LFC| >= delta)).
        summary_lfc: the samples ``lfc_mean`` / ``lfc_median`` / ``lfc_std`` describe; scvi-tools computes them
            with a 1000x smaller pseudocount, so that the pseudocount does not shrink the reported fold change.
            None = ``lfc``.

    Returns:
        ``proba_de``, ``proba_not_de``, ``bayes_factor``, ``lfc_mean``, ``lfc_median``, ``lfc_std``, each ``[F]``
        float64.

    Raises:
        ConfigError: a negative delta or an unknown test mode.
    """
    if not delta >= 0:
        raise ConfigError(f"delta must be >= 0; got {delta!r}")
    if test_mode not in TEST_MODES:
        raise ConfigError(f"test_mode must be one of {list(TEST_MODES)}; got {test_mode!r}")
    lfc = np.asarray(lfc)
    up = (lfc >= delta).mean(axis=0, dtype=np.float64)
    down = (lfc <= -delta).mean(axis=0, dtype=np.float64)
    p = np.maximum(up, down) if test_mode == "three" else up + down
    s = lfc if summary_lfc is None else np.asarray(summary_lfc)
    return {
        "proba_de": p, "proba_not_de": 1.0 - p, "bayes_factor": bayes_factor(p),
        "lfc_mean": s.mean(axis=0, dtype=np.float64), "lfc_median": np.median(s, axis=0).astype(np.float64),
        "lfc_std": s.std(axis=0, dtype=np.float64),
    }


def fdr_calls(proba_de: np.ndarray, target: float) -> np.ndarray:
    """Features called DE at a posterior expected FDR of ``target``.

    Features are ranked by P(DE) (descending); the called set is the longest prefix whose mean
    ``1 - P(DE)`` (its posterior expected false discovery proportion) is at most ``target``. The running mean
    of an ascending sequence is non-decreasing, so the prefix is where it first exceeds the target.

    Args:
        proba_de: ``[F]`` posterior probabilities of DE.
        target: the FDR level, in (0, 1).

    Returns:
        ``[F]`` bool, True = called DE.
    """
    if not 0.0 < target < 1.0:
        raise ConfigError(f"the FDR target must be in (0, 1); got {target!r}")
    p = np.asarray(proba_de, dtype=np.float64)
    order = np.argsort(-p, kind="stable")
    expected_fdr = np.cumsum(1.0 - p[order]) / np.arange(1, p.size + 1)
    n_called = int(np.searchsorted(expected_fdr, target, side="right"))
    called = np.zeros(p.size, dtype=bool)
    called[order[:n_called]] = True
    return called
