"""Re-execute notebooks in full mode, in place, and scrub their metadata.

    python notebooks/execute.py                 # every walkthrough and exercise solution
    python notebooks/execute.py 02_mla.ipynb    # just these

This is how the committed outputs are made (`make notebooks`): full mode means
MINIDSV3_QUICK is unset, so training cells run their long versions. Metadata is
reduced to what JupyterLab itself writes (the kernelspec and the kernel's language_info),
so diffs show only real changes and opening a notebook marks nothing as modified.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from minidsv3.exercises.build import KERNELSPEC

HERE = Path(__file__).resolve().parent


def scrub(nb: nbformat.NotebookNode) -> None:
    """Keep outputs; drop execution timing, widget state and other per-run metadata.

    The kernelspec and the kernel's language_info (which nbclient has just written) stay:
    JupyterLab writes the same two on opening a notebook, so it finds nothing to change.
    """
    nb.metadata = nbformat.NotebookNode(
        kernelspec=KERNELSPEC, language_info=nb.metadata.language_info
    )
    count = 0
    for cell in nb.cells:
        cell.metadata = nbformat.NotebookNode()
        if cell.cell_type == "code":
            # nbval refuses cells that have outputs but no execution count: renumber 1, 2, ...
            count += 1
            cell.execution_count = count
            cell.outputs = merge_streams(cell.outputs)
            for output in cell.outputs:
                if "execution_count" in output:
                    output["execution_count"] = count


def merge_streams(outputs: list) -> list:
    """Join consecutive stdout (or stderr) blocks into one.

    The kernel flushes a long print in pieces whose boundaries depend on timing, so the same
    text would be stored as one block in one run and three in the next: noise in every diff.
    """
    merged = []
    for output in outputs:
        previous = merged[-1] if merged else None
        if (output.output_type == "stream" and previous is not None
                and previous.output_type == "stream" and previous.name == output.name):
            previous.text += output.text
        else:
            merged.append(output)
    return merged


def execute(path: Path, timeout: int) -> float:
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    scrub(nb)
    nbformat.write(nb, path)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="notebooks to run (default: all walkthroughs and solutions)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args(argv)
    if os.environ.get("MINIDSV3_QUICK") == "1":
        sys.exit("MINIDSV3_QUICK=1 is set: unset it, committed notebooks carry full-run outputs")
    paths = args.notebooks or sorted(HERE.glob("[0-9][0-9]_*.ipynb")) + sorted(
        (HERE / "exercises" / "solutions").glob("*.ipynb"))
    for path in paths:
        print(f"{path.name:45s} ", end="", flush=True)
        print(f"{execute(path.resolve(), args.timeout):7.1f} s", flush=True)


if __name__ == "__main__":
    main()
