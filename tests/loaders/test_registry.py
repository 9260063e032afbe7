"""Tests of loaders.registry: JSON round trip, checks, immutability."""

import dataclasses
import json

import numpy as np
import pytest

from loaders.errors import RegistryError
from loaders.registry import Registry


def _registry(**over):
    kw = dict(
        gene_names=["g1", "g2", "g3"], protein_names=["CD3", "CD4"], batch_categories=["A/x", "B/x"],
        label_categories=["B", "T"], unlabeled_category="unlabeled", study_names=["A", "B"],
        study_protein_masks=np.array([[True, True], [True, False]]), batch_key="batch", labels_key="ct",
        batch_prefixed=True,
    )
    kw.update(over)
    return Registry(**kw)


def test_json_round_trip_and_sizes():
    reg = _registry()
    back = Registry.from_dict(json.loads(json.dumps(reg.to_dict())))
    assert back == reg and back.to_dict() == reg.to_dict()
    assert (back.n_genes, back.n_proteins, back.n_batch, back.n_labels, back.n_studies) == (3, 2, 2, 2, 2)
    assert back.study_protein_masks.dtype == bool and back.study_protein_masks.tolist() == [[True, True], [True, False]]
    assert back != _registry(label_categories=["T", "B"])


def test_empty_protein_masks_round_trip():
    reg = _registry(protein_names=[], study_protein_masks=np.zeros((2, 0), bool))
    assert Registry.from_dict(json.loads(json.dumps(reg.to_dict()))) == reg


def test_immutable():
    reg = _registry()
    with pytest.raises(dataclasses.FrozenInstanceError):
        reg.gene_names = ("x",)
    with pytest.raises(ValueError):
        reg.study_protein_masks[0, 0] = False


def test_refuses_inconsistent_content():
    with pytest.raises(RegistryError, match=r"gene_names must be unique; duplicated: \['g1'\]"):
        _registry(gene_names=["g1", "g1"])
    with pytest.raises(RegistryError, match=r"shape \[2 studies, 2 proteins\]"):
        _registry(study_protein_masks=np.ones((1, 2), bool))
    with pytest.raises(RegistryError, match="must not be one of the label_categories"):
        _registry(unlabeled_category="T")
    data = _registry().to_dict()
    del data["gene_names"]
    with pytest.raises(RegistryError, match=r"missing keys \['gene_names'\]"):
        Registry.from_dict(data)
    with pytest.raises(RegistryError, match="newer"):
        Registry.from_dict({**_registry().to_dict(), "version": 99})
