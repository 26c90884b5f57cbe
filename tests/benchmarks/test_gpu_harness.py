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
