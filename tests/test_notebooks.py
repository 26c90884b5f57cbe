"""The three example notebooks run top to bottom (each under 2 minutes on a CPU)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat not installed (extra 'dev')")
nbclient = pytest.importorskip("nbclient", reason="nbclient not installed (extra 'dev')")
pytest.importorskip("captum", reason="captum not installed (extra 'captum')")
pytest.importorskip("crp", reason="zennit-crp not installed (extra 'zennit')")
pytest.importorskip("vit_prisma", reason="vit-prisma not installed (extra 'prisma')")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize(
    "name", ["captum_companion", "sae_feature_inspection", "neuron_concept_validation"]
)
def test_notebook_runs(name, tmp_path):
    book = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    start = time.perf_counter()
    nbclient.NotebookClient(
        book, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    elapsed = time.perf_counter() - start
    images = sum(
        1
        for cell in book.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    )
    assert images >= 3, f"{name} should tell its story with pictures, found {images}"
    assert elapsed < 120, elapsed  # the README says under 2 minutes (26 s or less measured idle)
