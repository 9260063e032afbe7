"""Training in a notebook leaves the process as it was: the user's global random generators, and stdout."""

import random

import numpy as np
import torch

from streamtotal import TOTALVI

from .conftest import FAST, TINY


def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_train_leaves_the_global_random_generators_alone(adata, capsys):
    TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression", batch_key="batch")
    model = TOTALVI(adata, **TINY)
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    expected = _draws()
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    model.train(max_epochs=1, **FAST)
    assert _draws() == expected  # as if train() had not run (it seeds the generators from train.seed inside)
    assert capsys.readouterr().out == ""  # the library logs; it prints nothing
