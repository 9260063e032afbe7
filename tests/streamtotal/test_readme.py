"""The README is a front door that works: its commands run, its reference lives in docs/ and stays generated."""

import re
import shlex
from pathlib import Path

import pytest

from streamtotal.cli.main import main
from streamtotal.config import RunConfig
from streamtotal.config_docs import default_config_toml, markdown_reference

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
CONFIG_DOC = REPO / "docs" / "config.md"


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", README.read_text(), re.S)


def test_config_reference_in_docs_matches_the_dataclasses():
    text = CONFIG_DOC.read_text()
    found = re.search(r"<!-- config-reference:start -->\n(.*)\n<!-- config-reference:end -->", text, re.S)
    assert found, "docs/config.md lost its config reference markers"
    assert found.group(1).strip() == markdown_reference().strip(), "run `streamtotal config --markdown` into docs/config.md"


def test_readme_opens_with_the_demo_and_test_commands():
    blocks = _bash_blocks()
    assert "streamtotal demo" in blocks[0] and "pytest" in blocks[1]
    ci = (REPO / ".ci" / "run").read_text()
    assert blocks[1].strip() in ci, ".ci/run must run the README's test command verbatim"


def test_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for link in re.findall(r"\]\(((?:docs|benchmarks|deploy|examples)/[^)#]+)\)", text):
        assert (REPO / link).exists(), f"README links to {link}, which does not exist"


def test_default_config_toml_parses_back_to_the_defaults(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(default_config_toml())
    assert RunConfig.from_toml(path) == RunConfig()


def _quickstart_commands() -> list[list[str]]:
    block = next(b for b in _bash_blocks() if "streamtotal ingest" in b and "streamtotal train" in b)
    lines = [line.strip() for line in block.splitlines() if line.strip().startswith("streamtotal ")]
    return [shlex.split(line)[1:] for line in lines]


def test_every_command_of_the_cli_quickstart_runs(tmp_path, monkeypatch):
    """Runs the README's command-line quickstart as written, on small simulated files named as in the README.

    Only two things are added: one epoch for train and map (the README trains with the default epoch rule), and
    no progress bars."""
    from streamtotal.simulate import CiteSimulator, SimulationConfig

    monkeypatch.chdir(tmp_path)
    commands = _quickstart_commands()
    assert [c[0] for c in commands][:3] == ["ingest", "train", "embed"]
    inputs = {arg for c in commands for arg in c if arg.endswith(".h5ad") and c[0] == "ingest"}
    for i, name in enumerate(sorted(inputs)):
        sim = CiteSimulator(SimulationConfig(n_cells=300, n_genes=40, n_proteins=6, n_batches=2, seed=i))
        sim.to_anndata().write_h5ad(name)
    for query in {arg for c in commands if c[0] == "map" for arg in c[2:] if arg.endswith(".zarr")}:
        sim = CiteSimulator(SimulationConfig(n_cells=200, n_genes=40, n_proteins=6, n_batches=2, seed=7))
        sim.to_anndata().write_h5ad("query_input.h5ad")
        assert main(["ingest", "query_input.h5ad", "--out", query, "--batch-key", "batch", "--no-progress"]) == 0
    for args in commands:
        extra = ["--epochs", "1"] if args[0] in ("train", "map") else []
        status = main([*args, *extra, "--no-progress"])
        assert status == 0, f"README command failed: streamtotal {shlex.join(args)}"


def test_command_reference_in_docs_matches_the_parser():
    from streamtotal.cli.cli_docs import markdown_commands

    text = (REPO / "docs" / "cli.md").read_text()
    found = re.search(r"<!-- commands:start -->\n(.*)\n<!-- commands:end -->", text, re.S)
    assert found, "docs/cli.md lost its command reference markers"
    assert found.group(1).strip() == markdown_commands().strip(), "run `python -m streamtotal.cli.cli_docs` into docs/cli.md"
