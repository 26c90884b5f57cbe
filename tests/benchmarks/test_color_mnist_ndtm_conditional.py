"""benchmarks/color_mnist_ndtm_conditional.py: the schedule for NDTM on the conditional model is
chosen on training digits only, by the stated rule, and a small run writes every row."""

from __future__ import annotations

import json

import pytest
import torch

from fiber_plugins.color_mnist_bench import references
from fiber_plugins.data import color_mnist as cm
from fiber_plugins.samplers import GuidanceSchedule

from .test_color_mnist_study import _script


@pytest.fixture(scope="module")
def script():
    return _script("color_mnist_ndtm_conditional")


def test_parse_schedule(script):
    c = script.Candidate
    assert script.parse_schedule("constant:0.3") == c(GuidanceSchedule("constant", 0.3))
    interval = GuidanceSchedule("interval", 1.0, high=0.5)
    assert script.parse_schedule("interval:1:0.5") == c(interval)
    assert script.parse_schedule("interval:1:0.5@10") == c(interval, 10)
    ndtm = script.NDTMConfig(num_steps=25, inner_steps=3)
    assert script.parse_schedule("interval:1:0.5@10").config(ndtm).inner_steps == 10
    assert script.parse_schedule("interval:1:0.5").config(ndtm).inner_steps == 3
    assert script.parse_schedule("interval:1:0.5").config(ndtm).guidance == interval
    assert script.describe(c(interval, 10)) == "interval 1 at noise levels <= 0.5, N = 10"
    for bad in ("ramp:1", "interval:1", "interval:1:0.5@0", "interval:1:0.5@x", "constant:-1"):
        with pytest.raises(SystemExit, match="interval:STRENGTH:HIGH"):
            script.parse_schedule(bad)


def _digits(x: torch.Tensor) -> set[bytes]:
    g = cm.decolorize(x)
    return {bytes((gi > 0.5).flatten().numpy()) for gi in g}


def test_tuning_digits_are_training_digits_not_the_held_out_ones():
    tune = references(32, 100, split="train")
    held_out = references(16, 0)
    g_train, _ = cm.load_digits("train")
    g_test, _ = cm.load_digits("test")
    assert _digits(tune) <= {bytes((g > 0.5).flatten().numpy()) for g in g_train}
    assert not _digits(tune) & _digits(held_out)
    assert _digits(held_out) <= {bytes((g > 0.5).flatten().numpy()) for g in g_test}


def _fake_sets(values):
    """A stand-in for sample_sets that returns the next (median, KL) pair of ``values``."""
    it = iter(values)

    def sample_sets(sampler, refs, n, seeds):
        median, kl = next(it)
        row = {"seed": seeds[0], "median_fiber_loss": median, "mean_fiber_loss": median}
        return [{**row, "kl": kl, "w1": 0.0, "failed": 0}], [], 0.1

    return sample_sets


def _args(script, **kw):
    class A:
        tune_references, tune_seed, samples, steps, inner_steps = 2, 100, 1, 2, 1
        tuning_from = None

    for k, v in kw.items():
        setattr(A, k, v)
    return A


def test_tune_picks_the_lowest_kl_among_schedules_within_the_fidelity_bound(script, monkeypatch):
    n = len(script.SCHEDULES)
    # (a) has median 1e-3, so the bound is 1e-2; the lowest KL overall (0.05) is not eligible.
    values = [(1e-3, 0.2)] + [(5e-3, 0.4)] * n
    values[1] = (2e-2, 0.05)  # first schedule: too far from the fiber
    values[3] = (9e-3, 0.15)  # third schedule: eligible, the lowest eligible KL
    monkeypatch.setattr(script, "sample_sets", _fake_sets(values))
    monkeypatch.setattr(script, "_make_sampler", lambda *a, **k: None)
    monkeypatch.setattr(script, "NDTMSampler", lambda *a, **k: None)
    ndtm = script.NDTMConfig(num_steps=2, inner_steps=1)
    chosen, table = script.tune(None, None, None, ndtm, _args(script))
    assert chosen == script.SCHEDULES[2]
    assert [r["eligible"] for r in table] == [None, False] + [True] * (n - 1)
    assert table[3]["schedule"] == script.describe(script.SCHEDULES[2])

    monkeypatch.setattr(script, "sample_sets", _fake_sets([(1e-3, 0.2)] + [(1.0, 0.1)] * n))
    with pytest.raises(SystemExit, match="no schedule reached"):
        script.tune(None, None, None, ndtm, _args(script))


def test_tuning_from_an_earlier_run_measures_only_row_a_again(script, monkeypatch, tmp_path):
    """--tuning-from keeps the candidates' rows (they sample the conditional model alone) and
    re-picks against a new row (a): a bound that moves changes which candidates are eligible."""
    monkeypatch.setattr(script, "_make_sampler", lambda *a, **k: None)
    ndtm = script.NDTMConfig(num_steps=2, inner_steps=1)
    candidates = [
        {"schedule": script.describe(c), **c.to_dict(), "median_fiber_loss": m, "kl": kl,
         "w1": 0.0, "eligible": True}
        for c, (m, kl) in zip(script.SCHEDULES[:3], [(2e-3, 0.1), (5e-4, 0.3), (1e-4, 0.4)])
    ]  # fmt: skip
    a_row = {"schedule": "(a) NDTM (prior), the reference", "median_fiber_loss": 1e-3}
    settings = {"tune_references": 2, "tune_seed": 100, "num_samples": 1, "steps": 2,
                "inner_steps": 1}  # fmt: skip
    earlier = tmp_path / "results.json"
    earlier.write_text(json.dumps({"settings": settings, "tuning": [a_row, *candidates]}))
    # the new prior's (a) has median 1e-5: only the third candidate stays within 10x
    monkeypatch.setattr(script, "sample_sets", _fake_sets([(1e-5, 0.2)]))
    chosen, table = script.tune(None, None, None, ndtm, _args(script, tuning_from=earlier))
    assert chosen == script.SCHEDULES[2]
    assert [r["eligible"] for r in table] == [None, False, False, True]
    assert table[0]["median_fiber_loss"] == 1e-5 and all(r["carried"] for r in table[1:])
    # a table of other settings is refused, naming the difference
    earlier.write_text(json.dumps({"settings": {**settings, "steps": 25}, "tuning": [a_row]}))
    monkeypatch.setattr(script, "sample_sets", _fake_sets([(1e-5, 0.2)]))
    with pytest.raises(SystemExit, match="steps 25 \\(now 2\\)"):
        script.tune(None, None, None, ndtm, _args(script, tuning_from=earlier))


def test_small_run_writes_the_four_rows_and_the_tuning_table(script, tmp_path):
    threads = torch.get_num_threads()
    report = script.main(
        [
            "--references", "2", "--samples", "1", "--steps", "3", "--inner-steps", "1",
            "--sets", "2", "--tune-references", "2", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert torch.get_num_threads() == threads  # restored
    assert [r["method"][:3] for r in report["rows"]] == ["(a)", "(b)", "(c)", "(d)"]
    assert all(r["sets"] == 2 for r in report["rows"])
    assert report["rows"][2]["conditional_prior"] and report["rows"][3]["conditional_prior"]
    tuning = report["tuning"]
    assert len(tuning) == 1 + len(script.SCHEDULES)
    eligible = [r for r in tuning[1:] if r["eligible"]]
    best = min(eligible, key=lambda r: r["kl"])
    assert report["settings"]["row_d_guidance"] == best["guidance"]
    assert report["settings"]["row_d_inner_steps"] == (best["inner_steps"] or 1)
    for t in report["targets"].values():
        assert t["met"] == (t["value"] <= t["bound"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["tuning"] == tuning
    md = (tmp_path / "results.md").read_text()
    assert "How row (d)'s schedule was chosen" in md
    assert (tmp_path / "ndtm_conditional_interval_grid.png").exists()
    assert (tmp_path / "colour_histograms.png").stat().st_size > 10_000
    assert (tmp_path / "colour_drift.png").stat().st_size > 10_000
    for row in report["rows"][2:]:
        assert row["colour_drift_vs_b"]["mean_abs_change"] >= 0
        fate = row["branch_fate_vs_b"]
        # 3 channels x 2 references x 1 sample x 2 sets, less the samples failed in either run
        assert fate["colours"] <= 12 and fate["colours"] % 3 == 0
        if not (report["rows"][1]["failed"] or row["failed"]):
            assert fate["colours"] == 12
        repaired = fate["put_on_law_across_the_wrap"] + fate["put_on_law_same_side"]
        assert repaired + fate["still_off_law"] == fate["base_off_law"]
    assert "mean change away from the wrap" in md
    assert "| off the law in (b) |" in md


class _Run:
    def __init__(self, images, failed):
        self.images, self.failed = images, failed


def test_paired_drift_pairs_each_colour_with_its_twin(script):
    g = torch.zeros(2, 1, 32, 32)
    g[:, :, 10:20, 10:20] = 1.0
    b0 = torch.tensor([[0.45, 0.55, 0.2], [0.7, 0.48, 0.52]])
    moved = b0 + torch.sign(b0 - 0.5) * 0.05  # every colour pushed 0.05 away from the wrap
    base = _Run(cm.colorize(g, b0)[None], torch.zeros(1, 2, dtype=torch.bool))
    guided = _Run(cm.colorize(g, moved)[None], torch.tensor([[False, True]]))
    b, d = script.paired_drift([base], [guided])
    # the second sample failed in the guided run, so only the first sample's colours count
    assert torch.allclose(b, b0[0], atol=1e-6)
    assert torch.allclose(d, moved[0] - b0[0], atol=1e-6)
    s = script.drift_summary(b, d)
    assert s["mean_abs_change"] == pytest.approx(0.05, abs=1e-5)
    assert s["mean_change_away_from_wrap"] == pytest.approx(0.05, abs=1e-5)
    assert s["near_wrap_colours"] == 2  # 0.45 and 0.55
    b_same, d_same = script.paired_drift([base], [base])
    assert d_same.abs().max() == 0 and b_same.numel() == 6


def test_fixed_schedule_skips_the_tuning(script, tmp_path):
    report = script.main(
        [
            "--references", "1", "--samples", "1", "--steps", "2", "--inner-steps", "1",
            "--sets", "1", "--tune-references", "0", "--schedule", "interval:1:0.5@2",
            "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert report["tuning"] == []
    assert report["settings"]["row_d_guidance"]["high"] == 0.5
    assert report["settings"]["row_d_inner_steps"] == 2
    assert "N = 2" in report["rows"][3]["method"]
    assert "How row (d)" not in (tmp_path / "results.md").read_text()
    with pytest.raises(SystemExit, match="needs --schedule"):
        script.main(["--tune-references", "0", "--out", str(tmp_path)])


def test_branch_fate_counts_how_each_off_law_colour_was_repaired(script):
    g = torch.zeros(1, 1, 32, 32)
    g[:, :, 10:20, 10:20] = 1.0
    # four channels' colourings in (b): on the law at 0.3 (f = 0.8); off it at 0.48 with a dark
    # digit (f = 0.0, as for b just above 0.5), twice; on the law at 0.7 (f = 0.2)
    base_b = torch.tensor([[0.3, 0.48, 0.48], [0.7, 0.3, 0.3]])
    base_f = torch.tensor([[0.8, 0.0, 0.0], [0.2, 0.8, 0.8]])
    # guided twins: 0.3 kept; one 0.48 moved to 0.52 (across the wrap, now on the law); the
    # other given a light digit (same side); 0.7 given a light digit (put off the law)
    new_b = torch.tensor([[0.3, 0.52, 0.48], [0.7, 0.3, 0.3]])
    new_f = torch.tensor([[0.8, 0.02, 0.98], [0.9, 0.8, 0.8]])
    base = _Run(
        cm.colorize(g.expand(2, -1, -1, -1), base_b, base_f)[None],
        torch.zeros(1, 2, dtype=torch.bool),
    )
    guided = _Run(
        cm.colorize(g.expand(2, -1, -1, -1), new_b, new_f)[None],
        torch.zeros(1, 2, dtype=torch.bool),
    )
    fate = script.branch_fate([base], [guided])
    assert fate == {
        "colours": 6,
        "base_off_law": 2,
        "put_on_law_across_the_wrap": 1,
        "put_on_law_same_side": 1,
        "still_off_law": 0,
        "put_off_law": 1,
    }
    assert script.branch_fate([base], [base])["still_off_law"] == 2
