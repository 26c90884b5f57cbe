"""benchmarks/device/gpu_checks.sh: the one-call-per-mode GPU checks. The GPU modes cannot run
here; the script's plumbing (mode check, imports from src/, logs into $OUT) can."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "device" / "gpu_checks.sh"


def _run(mode: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "SITE": str(out / "site")}
    env.pop("PYTHONPATH", None)  # as on a fresh machine: the script must not need it set
    return subprocess.run(
        ["bash", str(SCRIPT), mode], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_env_mode_imports_the_package_from_src_and_logs_to_out(tmp_path):
    # env mode imports timm to report its version
    pytest.importorskip("timm", reason="timm not installed (extra 'timm')")
    res = _run("env", tmp_path)
    assert res.returncode == 0, res.stderr
    log = (tmp_path / "env.log").read_text()
    assert "fiber_plugins 0.1.0" in log and "diffusers" in log


def test_tests_mode_runs_the_gpu_marked_tests(tmp_path):
    res = _run("tests", tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    log = (tmp_path / "tests.log").read_text()
    # without CUDA every gpu-marked test is collected and skipped; nothing fails or errors
    assert re.search(r"\b[1-9]\d* (skipped|passed)", log), log
    assert "failed" not in log and "error" not in log.lower() and "deselected" not in log, log


def test_unknown_mode_exits_2(tmp_path):
    res = _run("everything", tmp_path)
    assert res.returncode == 2
    assert "unknown MODE 'everything'" in res.stderr


def test_every_timing_mode_passes_arguments_the_harness_accepts():
    """Each timing mode's harness command (the GPU runs themselves cannot happen here) parses,
    names one workload, and tags its file so the modes do not overwrite each other's tables."""
    import importlib.util
    import shlex

    spec = importlib.util.spec_from_file_location("gpu_ndtm", ROOT / "benchmarks" / "gpu_ndtm.py")
    harness = importlib.util.module_from_spec(spec)
    sys.modules["gpu_ndtm"] = harness
    try:
        spec.loader.exec_module(harness)
        text = SCRIPT.read_text()
        four = re.search(r"\nFOUR=(\S+)", text).group(1)
        base = shlex.split(re.search(r'HARNESS=\("\$PY" benchmarks/gpu_ndtm.py (.*)\)', text)[1])
        base = [a.replace("$OUT", "/tmp/out") for a in base]
        tags = {}
        for mode, body in re.findall(r"\n    ([a-z0-9-]+)\)\n(.*?);;", text, re.S):
            if '"${HARNESS[@]}"' not in body:
                continue
            cmd = body.split('"${HARNESS[@]}"')[1].split("2>&1")[0].replace("\\\n", " ")
            cmd = cmd.replace('"$FOUR"', four).replace('"$LEFT"', "300")
            args = harness.parse_args([*base, *shlex.split(cmd)])
            assert args.steps == 50 and args.inner_steps == 4, mode
            if mode == "all":  # the one-call mode: both target workloads, every variant, budgeted
                assert args.workloads == ["adm256-resnet50", "dit-xl2-sdvae-resnet50"]
                assert args.variants_last and args.budget_s == 300 and args.batch_sweep
                assert args.variants[-1] == "compile-blocks"  # the longest, so the last
            else:
                assert len(args.workloads) == 1, mode
            tags[mode] = args.tag
        assert set(tags) == {
            "all",
            "adm",
            "adm-variants",
            "adm-compile",
            "dit",
            "dit-compile",
            "dinov2",
        }
        assert len(set(tags.values())) == len(tags)  # one file per mode
    finally:
        sys.modules.pop("gpu_ndtm", None)
