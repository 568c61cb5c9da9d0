"""notebooks/training.ipynb executes top to bottom (slow: it compiles a train step, checks the
Pallas-kernel gradients in interpret mode, and trains a short run) and its loss falls."""

import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "training.ipynb"
STEPS = 60  # the notebook's default is 300; a short run is enough to see the loss fall


@pytest.mark.slow
def test_training_notebook_executes_and_loss_falls(monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("optax")
  pytest.importorskip("matplotlib")
  # The kernel subprocess inherits this environment ("python3" resolves to this interpreter).
  monkeypatch.setenv("PALLAX_TRAIN_STEPS", str(STEPS))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  client.execute()  # raises CellExecutionError if any cell fails (the final assert included)
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert f"{STEPS} steps" in outputs
  assert "gradients match" in outputs
  assert "LOSS FELL" in outputs
