"""examples/notebook.ipynb runs from top to bottom on the tiny fixture: every code cell without an error, each with
output (the streamed answers printed as they come)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_notebook_runs_every_cell(monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="the notebook test needs the test extra (nbclient)")
    nbclient = pytest.importorskip("nbclient", reason="the notebook test needs the test extra (nbclient)")
    pytest.importorskip("ipykernel", reason="the notebook test needs the test extra (ipykernel)")

    import phi3v_ort

    # the kernel imports the phi3v_ort under test (not another install), from the notebook's own folder
    package_root = str(Path(phi3v_ort.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([package_root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    notebook = nbformat.read(ROOT / "examples" / "notebook.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT / "examples")}})
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert len(code) >= 7
    for cell in code:
        assert cell.outputs, f"no output from:\n{cell.source}"
        assert all(out.output_type != "error" for out in cell.outputs), cell.outputs
    streamed = "".join(out.get("text", "") for cell in code[1:2] for out in cell.outputs if out.output_type == "stream")
    assert "prompt tokens" in streamed and "tokens/s" in streamed
    assert "KV cache reused: True" in "".join(out.get("text", "") for out in code[5].outputs)
