"""The ``Registry``: what a model was trained on (genes, proteins, categories, study panels).

It is saved inside every checkpoint (as ``to_dict()``) and a query is aligned onto it, so a model never sees a
gene, protein or category code that means something different from what it learned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from loaders.errors import RegistryError

_FORMAT_VERSION = 1


def _as_names(values: Sequence[Any], what: str) -> tuple[str, ...]:
    names = tuple(str(v) for v in values)
    if len(set(names)) != len(names):
        uniq, counts = np.unique(np.asarray(names, dtype=str), return_counts=True)
        raise RegistryError(f"registry {what} must be unique; duplicated: {uniq[counts > 1][:10].tolist()}")
    return names


@dataclass(frozen=True, eq=False)
class Registry:
    """Genes, proteins, categories and per-study protein panels that a model was trained with.

    Codes used everywhere in the data layer are indexes into these lists: a batch code ``b`` means
    ``batch_categories[b]``, a label code ``c`` means ``label_categories[c]`` and -1 means unlabeled.
    """

    gene_names: tuple[str, ...]
    """Reference gene list; column ``g`` of every ``CiteBatch.rna`` is ``gene_names[g]``."""

    protein_names: tuple[str, ...]
    """Reference protein list; column ``t`` of every ``CiteBatch.protein`` is ``protein_names[t]``."""

    batch_categories: tuple[str, ...]
    """Batch covariate values in code order (``"study/value"`` when several studies, see ``batch_prefixed``)."""

    label_categories: tuple[str, ...]
    """Label values in code order, without the unlabeled category (which is code -1)."""

    unlabeled_category: str | None
    """The label value that means "no label" (code -1), or None when there is none."""

    study_names: tuple[str, ...]
    """Names of the studies (Sources), in the order their rows of ``study_protein_masks`` appear."""

    study_protein_masks: np.ndarray
    """``[n_studies, n_proteins] bool``: which reference proteins each study measured at all."""

    batch_key: str | None
    """Obs column holding the batch covariate, or None when each study is one batch."""

    labels_key: str | None
    """Obs column holding the cell labels, or None when there are none."""

    batch_prefixed: bool = False
    """Whether batch values were prefixed with the study name (several studies with a ``batch_key``).

    A query aligned onto this registry prefixes the same way, so a training study read again maps onto
    the same categories."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form JSON-safe metadata other parts of the project may attach; round-tripped untouched."""

    def __post_init__(self) -> None:
        # Frozen: normalise through object.__setattr__ so callers may pass lists or arrays.
        set_ = object.__setattr__
        set_(self, "gene_names", _as_names(self.gene_names, "gene_names"))
        set_(self, "protein_names", _as_names(self.protein_names, "protein_names"))
        set_(self, "batch_categories", _as_names(self.batch_categories, "batch_categories"))
        set_(self, "label_categories", _as_names(self.label_categories, "label_categories"))
        set_(self, "study_names", _as_names(self.study_names, "study_names"))
        if self.unlabeled_category is not None:
            set_(self, "unlabeled_category", str(self.unlabeled_category))
            if self.unlabeled_category in self.label_categories:
                raise RegistryError(
                    f"unlabeled_category {self.unlabeled_category!r} must not be one of the label_categories"
                )
        masks = np.array(self.study_protein_masks, dtype=bool, copy=True)
        if masks.shape != (len(self.study_names), len(self.protein_names)):
            raise RegistryError(
                f"study_protein_masks must have shape [{len(self.study_names)} studies, "
                f"{len(self.protein_names)} proteins]; got {np.shape(self.study_protein_masks)}"
            )
        masks.flags.writeable = False  # the registry is immutable; a shared array must not drift
        set_(self, "study_protein_masks", masks)

    @property
    def n_genes(self) -> int:
        """Number of reference genes."""
        return len(self.gene_names)

    @property
    def n_proteins(self) -> int:
        """Number of reference proteins."""
        return len(self.protein_names)

    @property
    def n_batch(self) -> int:
        """Number of batch categories."""
        return len(self.batch_categories)

    @property
    def n_labels(self) -> int:
        """Number of label categories, not counting the unlabeled one."""
        return len(self.label_categories)

    @property
    def n_studies(self) -> int:
        """Number of studies."""
        return len(self.study_names)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Registry):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # holds an array; equality is by value

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-safe dict (lists, str, bool, None) for checkpoints.

        Returns:
            A dict that ``Registry.from_dict`` turns back into an equal registry.
        """
        return {
            "version": _FORMAT_VERSION,
            "gene_names": list(self.gene_names),
            "protein_names": list(self.protein_names),
            "batch_categories": list(self.batch_categories),
            "label_categories": list(self.label_categories),
            "unlabeled_category": self.unlabeled_category,
            "study_names": list(self.study_names),
            "study_protein_masks": [[bool(v) for v in row] for row in self.study_protein_masks],
            "batch_key": self.batch_key,
            "labels_key": self.labels_key,
            "batch_prefixed": bool(self.batch_prefixed),
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Registry":
        """Rebuilds a registry saved with ``to_dict``.

        Args:
            data: the dict, e.g. read back from a checkpoint.

        Returns:
            The registry.

        Raises:
            RegistryError: a required key is missing, the version is newer than this code, or the content
                is inconsistent (duplicates, mask shape).
        """
        version = data.get("version", _FORMAT_VERSION)
        if version > _FORMAT_VERSION:
            raise RegistryError(
                f"registry format version {version} is newer than this code understands ({_FORMAT_VERSION}); "
                "upgrade streamtotal to load this checkpoint"
            )
        required = (
            "gene_names", "protein_names", "batch_categories", "label_categories", "study_names",
            "study_protein_masks",
        )
        missing = [k for k in required if k not in data]
        if missing:
            raise RegistryError(f"registry dict is missing keys {missing}; was it written by Registry.to_dict()?")
        shape = (len(data["study_names"]), len(data["protein_names"]))
        masks = np.asarray(data["study_protein_masks"], dtype=bool)
        if masks.size == 0 and 0 in shape:
            masks = masks.reshape(shape)  # JSON keeps no shape for empty lists ([] or [[], []])
        return cls(
            gene_names=data["gene_names"],
            protein_names=data["protein_names"],
            batch_categories=data["batch_categories"],
            label_categories=data["label_categories"],
            unlabeled_category=data.get("unlabeled_category"),
            study_names=data["study_names"],
            study_protein_masks=masks,
            batch_key=data.get("batch_key"),
            labels_key=data.get("labels_key"),
            batch_prefixed=bool(data.get("batch_prefixed", False)),
            extra=dict(data.get("extra", {})),
        )
