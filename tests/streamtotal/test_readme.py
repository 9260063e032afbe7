import re
from pathlib import Path

from streamtotal.config_docs import default_config_toml, markdown_reference
from streamtotal.config import RunConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_config_reference_matches_the_dataclasses():
    text = README.read_text()
    found = re.search(r"<!-- config-reference:start -->\n(.*)\n<!-- config-reference:end -->", text, re.S)
    assert found, "README lost its config reference markers"
    assert found.group(1).strip() == markdown_reference().strip(), "run `streamtotal config --markdown` into README"


def test_readme_opens_with_the_demo_and_test_commands():
    blocks = re.findall(r"```bash\n(.*?)\n```", README.read_text(), re.S)
    assert "streamtotal demo" in blocks[0] and "pytest" in blocks[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert blocks[1].strip() in ci, ".ci/run must run the README's test command verbatim"


def test_default_config_toml_parses_back_to_the_defaults(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(default_config_toml())
    assert RunConfig.from_toml(path) == RunConfig()
