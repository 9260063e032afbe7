"""Saving and opening ``TOTALVI`` / ``TOTALANVI`` models: run directories (the ones the CLI writes and reads) and
scvi-tools model directories (``streamtotal import-scvi`` / ``export-scvi``)."""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

from loaders.atomic_files import write_directory_atomically
from loaders.object_store import refuse_url
from streamtotal.api import data_setup as ds
from streamtotal.api.train_options import device_name
from streamtotal.errors import ConfigError, RunDirError
from streamtotal.training.run_dir import load_trained

SAVED_ANNDATA = "adata.h5ad"
"""File name of the AnnData ``save(save_anndata=True)`` keeps next to the model (scvi-tools' name)."""
SAVED_MUDATA = "mdata.h5mu"
"""File name of the MuData ``save(save_anndata=True)`` keeps next to the model."""


class SaveLoadMixin:
    """``save`` / ``load`` / ``from_scvi_tools`` / ``to_scvi_tools`` of ``TOTALVI`` (which provides ``_attach``,
    ``_require_trained`` and the attributes set here)."""

    def save(self, dir_path: str | Path, prefix: str | None = None, overwrite: bool = False,
             save_anndata: bool = False, **kwargs: Any) -> Path:
        """Writes the run directory (config, registry, metrics, checkpoints, final model) to ``dir_path``: the
        directory ``streamtotal train --resume --out DIR`` continues and every CLI command reads.

        Args:
            dir_path: the directory (written whole under a temporary name, then renamed: all or nothing).
            prefix: unsupported (file names are fixed).
            overwrite: replace an existing ``dir_path``.
            save_anndata: also write the in-memory AnnData / MuData (``adata.h5ad`` / ``mdata.h5mu``).

        Returns:
            ``dir_path``.

        Raises:
            RunDirError: not trained, or ``dir_path`` exists and ``overwrite`` is False.
        """
        if prefix is not None or kwargs:
            raise ConfigError(f"save: prefix and {sorted(kwargs)} are not supported (the run directory's file "
                              "names are fixed)")
        self._require_trained()
        refuse_url(dir_path, "a saved model (run directory and data)", "save locally, then upload it")
        out = Path(dir_path)
        if out.exists() and out.resolve() == self.run_dir.resolve():
            return out  # already the run directory
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise RunDirError(f"{out} already exists and is not empty; pass overwrite=True to replace it")

        def write(staging: Path) -> None:
            shutil.copytree(self.run_dir, staging, dirs_exist_ok=True)
            if save_anndata and self.adata is not None:
                name = SAVED_MUDATA if ds.is_mudata(self.adata) else SAVED_ANNDATA
                writer = self.adata.write if ds.is_mudata(self.adata) else self.adata.write_h5ad
                writer(str(staging / name))

        return write_directory_atomically(out, write)

    @classmethod
    def load(cls, dir_path: str | Path, adata: Any = None, accelerator: str = "auto", device: Any = "auto",
             **kwargs: Any) -> "TOTALVI":
        """Opens a run directory written by ``save``, ``train`` or ``streamtotal train`` / ``map`` /
        ``import-scvi``.

        Args:
            dir_path: the run directory.
            adata: the data (AnnData / MuData set up like the model's, or store paths); None = the one saved with
                the model (``save_anndata``), else the run's own stores, else none (pass ``adata=`` to the
                downstream methods).
            accelerator, device: where inference runs.

        Returns:
            The trained model.

        Raises:
            RunDirError: no model in ``dir_path``. ConfigError: a totalVI run opened as TOTALANVI.
        """
        if kwargs:
            raise ConfigError(f"load: unknown arguments {sorted(kwargs)}")
        trained = load_trained(dir_path)
        if cls._label_classifier and trained.model.label_classifier is None:
            raise ConfigError(f"{dir_path} is a totalVI run (no label classifier); open it with TOTALVI.load, or "
                              "turn it into totalANVI with TOTALANVI.from_totalvi_model")
        model = cls.__new__(cls)
        model.config, model.run_dir, model._trained = trained.config, Path(dir_path), trained
        model._device = device_name(accelerator, device)
        model._progress, model._seed = True, 0
        model.adata, model.stores, model.setup, model._collection = None, (), None, None
        model._init_from, model._query, model._query_batch_key = None, None, None
        if adata is None:
            saved = next((Path(dir_path) / n for n in (SAVED_ANNDATA, SAVED_MUDATA) if (Path(dir_path) / n).exists()),
                         None)
            if saved is not None:
                adata = _read_saved(saved)
            elif trained.config.data.stores:
                adata = list(trained.config.data.stores)
        if adata is not None:
            model._attach(adata)
        return model

    @classmethod
    def from_scvi_tools(cls, path_or_model: Any, run_dir: str | Path | None = None, adata: Any = None, *,
                        overwrite: bool = False, batch_name: str | None = None) -> "TOTALVI":
        """A scvi-tools TOTALVI / TOTALANVI (its saved directory, or the model object) as a streamtotal model
        (``streamtotal import-scvi``).

        Args:
            path_or_model: the directory ``model.save(DIR)`` wrote, or a scvi-tools model (saved to a temporary
                directory first).
            run_dir: the run directory to create (None = a temporary one).
            adata: the data to attach (as ``load``).
            overwrite: replace an existing ``run_dir``.
            batch_name: for a model set up without ``batch_key``: the batch's name (see ``import_scvi_model``).

        Returns:
            The imported model.

        Raises:
            InteropError: the model cannot be imported faithfully.
        """
        from streamtotal.interop.scvi_import import import_scvi_model

        source, scratch = path_or_model, None
        if not isinstance(path_or_model, (str, os.PathLike)):
            scratch = tempfile.mkdtemp(prefix="streamtotal-scvi-")
            source = Path(scratch) / "model"
            path_or_model.save(str(source), overwrite=True)
        temporary = run_dir is None
        target = Path(tempfile.mkdtemp(prefix="streamtotal-run-")) / "run" if temporary else Path(run_dir)
        try:
            import_scvi_model(source, target, overwrite=overwrite, batch_name=batch_name)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        model = cls.load(target, adata=adata)
        if temporary:
            weakref.finalize(model, shutil.rmtree, str(target.parent), ignore_errors=True)
        return model

    def to_scvi_tools(self, dir_path: str | Path, overwrite: bool = False, **kwargs: Any) -> Path:
        """Writes the model as a directory scvi-tools' ``TOTALVI.load(dir_path, adata=adata)`` opens
        (``streamtotal export-scvi``).

        Args:
            dir_path: the scvi-tools model directory.
            overwrite: replace its ``model.pt``.
            **kwargs: ``export_scvi_model``'s ``batch_key`` and ``approximate_foreground``.

        Returns:
            ``dir_path``.

        Raises:
            InteropError: an option scvi-tools' TOTALVI cannot compute (named).
        """
        from streamtotal.interop.scvi_export import export_scvi_model

        export_scvi_model(self._require_trained(), dir_path, overwrite=overwrite, **kwargs)
        return Path(dir_path)


def _read_saved(path: Path) -> Any:
    if path.suffix == ".h5mu":
        import mudata

        return mudata.read_h5mu(str(path))
    import anndata

    return anndata.read_h5ad(str(path))
