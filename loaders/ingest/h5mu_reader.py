"""Ingest reader for MuData ``.h5mu`` files: RNA from ``mod/<rna_modality>``, proteins from
``mod/<protein_modality>``; both must hold the same cells in the same order."""

from __future__ import annotations

import pandas as pd
from anndata.io import read_elem

from loaders.ingest.h5ad_reader import H5adReader


class H5muReader(H5adReader):
    """Block reader of an h5mu file (the h5ad reader with MuData layout resolution and obs)."""

    format_name = "h5mu"

    def obs(self) -> pd.DataFrame:
        """Returns the global obs plus the RNA modality's obs columns that the global obs lacks."""
        groups = self._layout.obs_groups
        obs = read_elem(groups[0])
        for group in groups[1:]:
            mod_obs = read_elem(group)
            extra = [c for c in mod_obs.columns if c not in obs.columns]
            if extra and len(mod_obs) == len(obs):
                obs = pd.concat([obs, mod_obs[extra].set_axis(obs.index)], axis=1)
        return obs
