"""environment.yml serves conda users from conda-forge: it lists what pyproject.toml needs."""

import re
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch"}  # PyPI name -> conda-forge name, where they differ


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].lower()


def test_environment_yml_lists_every_dependency_from_conda_forge():
    # The installed package's requirements: pyproject.toml's dependencies and its extras,
    # of which conda users get the core and "dev" ones (not "compare": transformers).
    needed = {_name(r) for r in metadata.requires("minidsv3")
              if "extra ==" not in r or re.search(r"extra == .dev.", r)}
    text = (ROOT / "environment.yml").read_text()
    listed = {_name(line.strip()[2:]) for line in text.splitlines()
              if line.startswith("  - ") and "conda-forge" not in line}
    assert "conda-forge" in text and "pip:" not in text  # pip installs nothing from the file
    missing = {CONDA_NAMES.get(n, n) for n in needed} - listed
    assert not missing, f"environment.yml lacks {sorted(missing)}"
    assert "pip install -e . --no-deps" in text
