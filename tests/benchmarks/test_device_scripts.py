"""benchmarks/device/gpu_checks.sh: the one-call-per-mode GPU checks. The GPU modes cannot run
here; the script's plumbing (mode check, imports from src/, logs into $OUT) can."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "device" / "gpu_checks.sh"


def _run(mode: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "SITE": str(out / "site")}
    env.pop("PYTHONPATH", None)  # as on a fresh machine: the script must not need it set
    return subprocess.run(
        ["bash", str(SCRIPT), mode], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_env_mode_imports_the_package_from_src_and_logs_to_out(tmp_path):
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
