"""The notebooks execute top to bottom without an error (small settings: DLLM_NOTEBOOK_QUICK=1).

Part of the default run (CI executes every notebook). Quick mode keeps each to a few compiled
steps; the ablation notebook reads the committed results/ablation-burst JSON instead of running
the ladder. The committed notebooks carry the outputs of full (non-quick) runs.
"""

from __future__ import annotations

import os

import pytest

NOTEBOOKS_DIR = os.path.normpath(os.path.join(os.path.dirname(__file__), os.pardir, "notebooks"))
NOTEBOOKS = ("quickstart.ipynb", "logit_memory.ipynb", "ablation.ipynb", "sparse_heads.ipynb")

@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("matplotlib")
  pytest.importorskip("ipykernel")
  monkeypatch.setenv("DLLM_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(os.path.join(NOTEBOOKS_DIR, name), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                   resources={"metadata": {"path": NOTEBOOKS_DIR}})
  client.execute()  # raises CellExecutionError on the first failing cell
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors, errors
  assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
