"""Writing a simulated CITE-seq atlas to disk: an h5ad file (in memory, small data) or a Zarr store block by block."""

from __future__ import annotations

from pathlib import Path

from streamtotal.simulate import CiteSimulator


def write_simulation(sim: CiteSimulator, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Writes a simulation to ``out`` (.h5ad in memory; otherwise a Zarr store block by block).

    Raises:
        ConfigError: ``out`` exists and ``overwrite`` is False.
    """
    from tqdm.auto import tqdm

    from loaders.atomic_files import write_file_atomically
    from loaders.store_writer import ZarrStoreWriter
    from streamtotal.errors import ConfigError

    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it")
    if out.suffix == ".h5ad":
        return write_file_atomically(out, sim.to_anndata().write_h5ad)
    c = sim.config
    writer = ZarrStoreWriter(out, sim.gene_names, sim.protein_names, panel_key="batch", overwrite=overwrite,
                             source_file="streamtotal simulate", integer_counts=True)
    blocks = -(-c.n_cells // c.block_cells)
    for rna, protein, obs in tqdm(sim.blocks(), total=blocks, desc="simulate", unit="block", disable=not progress):
        writer.append(rna, protein, obs)
    writer.close()
    return out
