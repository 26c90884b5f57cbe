"""CPU smoke test of the NDTM speed harness (benchmarks/gpu_ndtm.py) in tiny mode."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_ndtm.py"


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("gpu_ndtm", HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_ndtm"] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_ndtm", None)


def test_tiny_run_writes_table(harness, tmp_path):
    pytest.importorskip("timm", reason="timm not installed (extra 'timm')")
    out = harness.main(
        [
            "--tiny",
            "--device",
            "cpu",
            "--steps",
            "2",
            "--inner-steps",
            "1",
            "--batch-size",
            "2",
            "--floor-repeats",
            "1",
            "--out-dir",
            str(tmp_path),
        ]
    )
    records = out["records"]
    assert [r["workload"] for r in records] == sorted(
        harness.WORKLOADS, key=lambda n: (n.startswith("dit"), n)
    )
    for rec in records:
        assert set(rec["methods"]) == {"naive", "engine", "floor"}
        for name, m in rec["methods"].items():
            s = m["s_per_sample"]
            assert math.isfinite(s) and s > 0, (rec["workload"], name, s)
            assert m["TFLOP_per_sample"] > 0
        engine = rec["methods"]["engine"]
        assert engine["failed"] == 0
        assert engine["speedup_vs_naive"] > 0 and engine["x_floor"] > 0
        # same x_T, fp32 on CPU: the engine and the naive reference give the same image
        assert rec["naive_vs_engine_max_abs_diff"] < 1e-3

    # the printed rows: workloads x methods
    assert {(r[0], r[1]) for r in out["rows"]} == {
        (w, m) for w in harness.WORKLOADS for m in ("naive", "engine", "floor")
    }

    md, js = out["markdown_path"], out["json_path"]
    assert md.parent == tmp_path and md.name.startswith("cpu-tiny-") and md.suffix == ".md"
    text = md.read_text()
    assert "| workload | method |" in text
    for m in ("| naive |", "| engine |", "| floor |"):
        assert m in text
    assert json.loads(js.read_text())["records"][0]["methods"]["engine"]["s_per_sample"] > 0


def test_engine_variants(harness, tmp_path):
    """Every speed variant runs on the latent workload (DiT blocks and VAE decoder blocks
    compiled; aot_eager traces without generating code) and lands in the table."""
    pytest.importorskip("timm", reason="timm not installed (extra 'timm')")
    out = harness.main(
        ["--tiny", "--device", "cpu", "--workload", "dit-xl2-sdvae-resnet50", "-T", "2", "-N", "1"]
        + ["-B", "2", "--floor-repeats", "1", "--naive-samples", "0", "--variants", "all"]
        + ["--compile-backend", "aot_eager", "--out-dir", str(tmp_path)]
    )
    (rec,) = out["records"]
    variants = {f"engine[{v}]" for v in harness.VARIANTS}
    assert set(rec["methods"]) == {"engine", "floor"} | variants
    for v in variants:
        m = rec["methods"][v]
        assert m["failed"] == 0 and m["x_floor"] > 0 and math.isfinite(m["s_per_sample"])
    # on the CPU "auto" takes every row (here the 2 samples); the compile time is kept apart
    assert rec["methods"]["engine[auto-batch]"]["batch"] == 2
    assert rec["methods"]["engine[compile-blocks]"]["compile_and_warmup_s"] > 0
    assert rec["methods"]["engine[bf16-weights]"]["precision"] == "bf16 weights"
    text = out["markdown_path"].read_text()
    assert "| engine[compile-blocks] |" in text and "compile + warm-up" in text
    # one workload of three: its name tags the file, so one call per workload keeps each table
    assert out["markdown_path"].name.endswith("-dit-xl2-sdvae-resnet50.md")


def test_cli_rejects_unknown_workload(harness):
    with pytest.raises(SystemExit):
        harness.parse_args(["--workload", "nope"])
    with pytest.raises(SystemExit):
        harness.parse_args(["--variants", "bf16-weights,turbo"])
    assert harness.parse_args(["--device", "cpu"]).variants == []
    assert harness.parse_args(["--device", "cpu", "--variants", "all"]).variants == list(
        harness.VARIANTS
    )


def test_best_batch_is_the_smallest_within_tolerance_of_the_fastest(harness):
    sweep = [
        {"batch": 4, "inner_step_ms_per_image": 10.0},
        {"batch": 8, "inner_step_ms_per_image": 8.1},
        {"batch": 16, "inner_step_ms_per_image": 8.0},
        {"batch": 32, "error": "out of memory"},
    ]
    assert harness.best_batch(sweep) == 8
    assert harness.best_batch(sweep, tolerance=0.0) == 16
    assert harness.best_batch([{"batch": 4, "error": "out of memory"}]) is None


def test_budget_failures_and_combined_variants_are_recorded_and_saved(
    harness, tmp_path, monkeypatch
):
    """--variants-last with a budget: a variant that fails is recorded with its error and the
    run goes on; one that does not fit what is left is skipped with the reason; a combined
    variant applies both settings; the tables on disk hold every finished measurement."""
    pytest.importorskip("timm", reason="timm not installed (extra 'timm')")
    real = harness.run_variant

    def flaky(wl, args, device, cfg, target, variant):
        if variant == "checkpointing":
            raise RuntimeError("planted failure\nsecond line")
        return real(wl, args, device, cfg, target, variant)

    monkeypatch.setattr(harness, "run_variant", flaky)
    out = harness.main(
        ["--tiny", "--device", "cpu", "--workload", "adm256-resnet50", "-T", "2", "-N", "1"]
        + ["--floor-repeats", "1", "--naive-samples", "0", "--batch-sweep", "1,2"]
        + ["--variants", "channels-last+bf16-weights,checkpointing,compile-blocks"]
        + ["--variants-last", "--budget-s", "600", "--compile-estimate-s", "1e6"]
        + ["--out-dir", str(tmp_path)]
    )
    (rec,) = out["records"]
    assert rec["settings"]["batch_size"] == harness.best_batch(rec["batch_sweep"])
    assert [r["batch"] for r in rec["batch_sweep"]] == [1, 2]
    combo = rec["methods"]["engine[channels-last+bf16-weights]"]
    assert combo["precision"] == "bf16 weights" and combo["failed"] == 0
    assert rec["errors"] == {"engine[checkpointing]": "RuntimeError: planted failure"}
    assert "engine[checkpointing]" not in rec["methods"]
    assert "needs ~" in rec["skipped"]["engine[compile-blocks]"]
    on_disk = json.loads(out["json_path"].read_text())["records"][0]
    assert on_disk["errors"] == rec["errors"] and on_disk["skipped"] == rec["skipped"]
    text = out["markdown_path"].read_text()
    assert "FAILED, `RuntimeError: planted failure`" in text
    assert "engine[compile-blocks]: skipped" in text and "batch sweep" in text
    with pytest.raises(SystemExit):
        harness.parse_args(["--variants", "bf16-weights+turbo"])
    with pytest.raises(SystemExit):
        harness.parse_args(["--batch-sweep", "4,x"])
