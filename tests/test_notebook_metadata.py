"""Committed notebooks carry the metadata JupyterLab writes on opening them, so that opening
and closing a notebook leaves nothing to save."""

from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import start_new_kernel

from minidsv3.exercises.build import KERNELSPEC

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
COMMITTED = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")) + sorted(
    NOTEBOOKS.glob("exercises/**/*.ipynb"))


@pytest.fixture(scope="module")
def language_info():
    """What the project's python3 kernel reports, as JupyterLab asks for it on connecting."""
    manager, client = start_new_kernel(kernel_name="python3")
    try:
        return client.kernel_info(reply=True, timeout=60)["content"]["language_info"]
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def test_the_kernelspec_is_the_installed_one():
    spec = KernelSpecManager().get_kernel_spec(KERNELSPEC["name"])
    assert (spec.display_name, spec.language) == (KERNELSPEC["display_name"],
                                                  KERNELSPEC["language"])


@pytest.mark.parametrize("path", COMMITTED, ids=[p.name for p in COMMITTED])
def test_a_committed_notebook_has_the_metadata_jupyterlab_writes(path, language_info):
    meta = nbformat.read(path, as_version=4).metadata
    assert meta.kernelspec == KERNELSPEC
    # Python's version is the one machine-specific field: the notebook keeps the one it
    # was run with (JupyterLab rewrites it only where another Python runs the kernel).
    assert set(meta.language_info) == set(language_info)
    assert {k: v for k, v in meta.language_info.items() if k != "version"} == {
        k: v for k, v in language_info.items() if k != "version"}
