"""A notebook finds the repository from the folder it runs in: its ``ROOT`` must lead there.

Notebooks that read the corpus or a training run define
``ROOT = Path("..") if Path.cwd().name == "notebooks" else Path(".")``: Jupyter and nbval
run a notebook in its own folder, and ``ROOT`` climbs from there to the repository. One
``..`` too few puts a second copy of the corpus inside ``notebooks/`` and misses ``runs/``.
"""

import re
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("**/*.ipynb"))
ROOT_RULE = re.compile(r'ROOT = Path\("([./]+)"\) if Path\.cwd\(\)\.name == "(\w+)"')


def root_rules(path):
    """(relative path, folder name) of every ROOT definition in the notebook's code."""
    nb = nbformat.read(path, as_version=4)
    return [m.groups() for cell in nb.cells if cell.cell_type == "code"
            for m in ROOT_RULE.finditer(cell.source)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[str(p.relative_to(REPO)) for p in NOTEBOOKS])
def test_root_leads_from_the_notebooks_folder_to_the_repository(path):
    for relative, folder in root_rules(path):
        assert path.parent.name == folder, f"{path.name}: ROOT is defined for a folder {folder!r}"
        assert (path.parent / relative).resolve() == REPO, (
            f"{path.name}: ROOT = {relative!r} from {path.parent.relative_to(REPO)} leads to "
            f"{(path.parent / relative).resolve()}, not the repository")


def test_the_rule_is_found_where_notebooks_use_it():
    # the check above is empty if the pattern stops matching: these notebooks read the corpus
    users = {p.name for p in NOTEBOOKS if root_rules(p)}
    assert {"06_train_toy_model.ipynb", "07_generate_and_speculate.ipynb",
            "key_10_fp8_training.ipynb"} <= users
