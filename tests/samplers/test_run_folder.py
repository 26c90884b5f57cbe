"""The run folder: rows written as they finish, interrupts (SIGINT, SIGTERM, SIGKILL) keep them,
resume completes them to the uninterrupted samples, overwrite rules, save/load round trip."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fiber_plugins as fp
from fiber_plugins.errors import RunInterrupted, UserError
from fiber_plugins.samplers import run_folder as rf

ROOT = Path(__file__).resolve().parents[2]


def _sampler(prior, subject, **kw):
    cfg = dict(num_steps=4, inner_steps=1, guidance=1.0, lr_start=0.2, lr_end=0.05)
    cfg.update(kw)
    return fp.NDTMSampler(prior, fp.FiberObjective(subject), **cfg)


def _refs():
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _index_is_consistent(run: Path) -> int:
    """Every index line names a whole file that exists; returns the number of lines."""
    folder = rf.RunFolder.open(run)
    for e in folder.index:
        assert (run / e["file"]).is_file(), e
    keys = [(e["reference"], e["sample"]) for e in folder.index]
    assert len(keys) == len(set(keys))
    return len(keys)


# ---------------------------------------------------------------------------- writing as it goes
def test_rows_are_written_per_batch_and_the_result_equals_the_folder(
    pixel_prior, subject, tmp_path
):
    commits = []
    orig = rf.RunFolder.commit

    def spy(self, rows, *a, **k):
        orig(self, rows, *a, **k)
        commits.append((list(rows), len(self.index), (self.path / rf.INDEX_FILE).is_file()))

    s = _sampler(pixel_prior, subject)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rf.RunFolder, "commit", spy)
        res = s.sample(references=_refs(), n=3, batch_size=2, out=tmp_path / "run", progress=False)
    assert [len(c[0]) for c in commits] == [2, 2, 2]
    assert [c[1] for c in commits] == [2, 4, 6]  # the index grows batch by batch
    run = tmp_path / "run"
    manifest = json.loads((run / rf.RUN_FILE).read_text())
    assert manifest["status"] == "complete" and manifest["rows_done"] == 6
    assert not (run / rf.SHARD_DIR).exists()  # merged into samples.safetensors at the end
    assert {"grid.png", "samples.safetensors", "metrics.json", "index.parquet"} <= {
        p.name for p in run.iterdir()
    }
    back = fp.FiberResult.load(run)
    assert torch.equal(back.images, res.images)
    assert torch.equal(back.fiber_loss, res.fiber_loss)
    assert torch.equal(back.loss_trace, res.loss_trace)
    assert torch.equal(back.targets, res.targets)
    assert torch.equal(back.references, res.references)
    assert back.config == json.loads(json.dumps(res.config, default=str))
    assert _index_is_consistent(run) == 6


def test_ctrl_c_in_process_keeps_finished_rows_and_resume_matches(pixel_prior, subject, tmp_path):
    s = _sampler(pixel_prior, subject)
    full = s.sample(references=_refs(), n=3, batch_size=2, progress=False)
    orig, calls = rf.RunFolder.commit, []

    def interrupt_after_two(self, *a, **k):
        orig(self, *a, **k)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    run = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rf.RunFolder, "commit", interrupt_after_two)
        with pytest.raises(RunInterrupted, match="4 of 6 rows") as info:
            s.sample(references=_refs(), n=3, batch_size=2, out=run, progress=False)
    assert info.value.done == 4 and info.value.total == 6
    assert json.loads((run / rf.RUN_FILE).read_text())["status"] == "interrupted"
    with pytest.warns(UserWarning, match="interrupted: 4 of 6 rows"):
        partial = fp.FiberResult.load(run)
    assert partial.failed.sum() == 2 and "interrupted" in partial.reason(1, 2)
    with pytest.raises(UserError, match="holds an earlier interrupted run"):
        s.sample(references=_refs(), n=3, batch_size=2, out=run, progress=False)
    done = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            rf.RunFolder,
            "commit",
            lambda self, rows, *a, **k: (done.extend(rows), orig(self, rows, *a, **k)),
        )
        resumed = s.sample(
            references=_refs(), n=3, batch_size=2, out=run, resume=True, progress=False
        )
    assert done == [(1, 1), (1, 2)]  # only the missing rows ran
    assert torch.equal(resumed.images, full.images)
    assert torch.equal(resumed.fiber_loss, full.fiber_loss)
    assert torch.equal(fp.FiberResult.load(run).images, full.images)


_CHILD = """
import signal, sys, time, torch
# Ctrl-C as in a terminal, even when the test runs in a background job (which ignores SIGINT)
signal.signal(signal.SIGINT, signal.default_int_handler)
import fiber_plugins as fp
from fiber_plugins.samplers import run_folder
from tests.conftest import make_subject

orig = run_folder.RunFolder.commit
done = []
def slow_commit(self, *a, **k):  # after the second row, wait for the parent's signal
    orig(self, *a, **k)
    done.append(1)
    print("committed", flush=True)
    time.sleep(60 if len(done) == 2 else 0.1)  # the signal ends the wait; no race on busy CPUs
run_folder.RunFolder.commit = slow_commit
prior = fp.load_prior(sys.argv[1])
s = fp.NDTMSampler(prior, fp.FiberObjective(make_subject()), num_steps=4, inner_steps=1,
                   guidance=1.0, lr_start=0.2, lr_end=0.05)
refs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
s.sample(references=refs, n=3, batch_size=1, out=sys.argv[2], progress=False)
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_a_signal_after_two_rows_keeps_them_and_resume_gives_the_same_samples(
    sig, pixel_prior_dir, pixel_prior, subject, tmp_path
):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(pixel_prior_dir), str(run)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = 0
    for line in child.stdout:
        seen += line.strip() == "committed"
        if seen == 2:
            child.send_signal(getattr(signal, sig))
            break
    _, err = child.communicate(timeout=120)
    assert child.returncode != 0, err
    manifest = json.loads((run / rf.RUN_FILE).read_text())
    rows = _index_is_consistent(run)
    assert 2 <= rows < 6
    if sig == "SIGKILL":
        assert manifest["status"] == "running"  # nobody could write more; the index still holds
    else:
        assert manifest["status"] == "interrupted"
        assert f"{rows} of 6 rows are written" in err and "--resume" in err
    s = _sampler(pixel_prior, subject)
    resumed = s.sample(references=_refs(), n=3, batch_size=1, out=run, resume=True, progress=False)
    full = s.sample(references=_refs(), n=3, batch_size=1, progress=False)
    assert torch.equal(resumed.images, full.images)
    assert torch.equal(resumed.fiber_loss, full.fiber_loss)
    assert json.loads((run / rf.RUN_FILE).read_text())["status"] == "complete"


def _interrupted_after_one_batch(sampler, run: Path) -> Path:
    """``run``: a run of 2 references x 2 samples stopped (Ctrl-C) after its first batch of 2."""
    orig = rf.RunFolder.commit

    def stop_first(self, *a, **k):
        orig(self, *a, **k)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rf.RunFolder, "commit", stop_first)
        with pytest.raises(RunInterrupted):
            sampler.sample(references=_refs(), n=2, batch_size=2, out=run, progress=False)
    return run


def test_resume_refuses_other_settings_and_drops_orphan_shards(pixel_prior, subject, tmp_path):
    s = _sampler(pixel_prior, subject)
    run = _interrupted_after_one_batch(s, tmp_path / "run")
    orphan = run / rf.SHARD_DIR / "000099.safetensors"
    orphan.write_bytes(b"half a file from a killed run")
    with pytest.raises(UserError, match="differs from the run in seed"):
        s.sample(references=_refs(), n=2, seed=1, out=run, resume=True, progress=False)
    with pytest.raises(UserError, match="inputs"):
        s.sample(references=_refs() * 0.5, n=2, out=run, resume=True, progress=False)
    other = _sampler(pixel_prior, subject, num_steps=5)
    with pytest.raises(UserError, match="settings"):
        other.sample(references=_refs(), n=2, out=run, resume=True, progress=False)
    res = s.sample(references=_refs(), n=2, batch_size=2, out=run, resume=True, progress=False)
    assert not orphan.exists() and not res.failed.any()


def test_a_run_from_before_a_setting_existed_resumes_at_its_earlier_value(
    pixel_prior, subject, tmp_path
):
    """NDTM's ``optimiser`` came later: a run folder whose fingerprint does not record it was
    sampled with Adam, so it resumes with Adam and is refused with SGD."""
    s = _sampler(pixel_prior, subject)
    run = _interrupted_after_one_batch(s, tmp_path / "run")
    manifest = json.loads((run / rf.RUN_FILE).read_text())
    del manifest["fingerprint"]["settings"]["optimiser"]  # as an earlier version wrote it
    (run / rf.RUN_FILE).write_text(json.dumps(manifest))
    sgd = _sampler(pixel_prior, subject, optimiser="sgd")
    with pytest.raises(UserError, match="optimiser: run 'adam', now 'sgd'"):
        sgd.sample(references=_refs(), n=2, out=run, resume=True, progress=False)
    res = s.sample(references=_refs(), n=2, batch_size=2, out=run, resume=True, progress=False)
    whole = s.sample(references=_refs(), n=2, batch_size=2, progress=False)
    assert torch.equal(res.images, whole.images) and not res.failed.any()


# ---------------------------------------------------------------------------- the folder rules
def test_out_dir_rules(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        rf.check_out_dir(f)
    with pytest.raises(UserError, match="is a file"):
        rf.check_out_dir(f / "sub")
    assert rf.check_out_dir(tmp_path / "new" / "deeper") == "new"
    (tmp_path / "empty").mkdir()
    assert rf.check_out_dir(tmp_path / "empty") == "new"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and holds no run"):
        rf.check_out_dir(other, overwrite=True)
    with pytest.raises(UserError, match="not both"):
        rf.check_out_dir(tmp_path / "x", overwrite=True, resume=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_out_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(UserError, match="not writable"):
            rf.check_out_dir(ro / "run")
    finally:
        ro.chmod(0o700)


def test_unwritable_out_dir_is_refused_before_sampling(pixel_prior, subject, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    s = _sampler(pixel_prior, subject)
    monkeypatch.setattr(s, "_sample", lambda *a, **k: calls.append(1))
    with pytest.raises(UserError, match="not writable"):
        s.sample(references=_refs(), n=1, out=tmp_path / "run", progress=False)
    assert calls == []


def test_save_refuses_an_earlier_run_and_overwrite_removes_all_of_it(
    pixel_prior, subject, tmp_path
):
    s = _sampler(pixel_prior, subject, num_steps=2)
    a = s.sample(references=_refs(), n=3, progress=False)
    b = s.sample(references=_refs()[:1], n=1, seed=5, progress=False)
    run = a.save(tmp_path / "run")
    (run / "evaluation.json").write_text("{}")
    (run / "report.html").write_text("<html></html>")
    before = (run / "samples.safetensors").read_bytes()
    with pytest.raises(UserError, match="holds an earlier complete run"):
        b.save(run)
    assert (run / "samples.safetensors").read_bytes() == before  # nothing changed
    b.save(run, overwrite=True)
    names = {p.name for p in run.iterdir()}
    assert "evaluation.json" not in names and "report.html" not in names
    back = fp.FiberResult.load(run)
    assert back.images.shape[:2] == (1, 1)
    assert torch.equal(back.images, b.images)


def test_save_load_round_trips_everything(pixel_prior, subject, tmp_path):
    s = _sampler(pixel_prior, subject, num_steps=2)
    res = s.sample(references=_refs(), n=2, progress=False)
    res.failed[1, 0] = True
    res.fiber_loss[1, 0] = float("nan")
    res.reasons = [[None, None], ["the guided state is not finite", None]]
    run = res.save(tmp_path / "run")
    back = fp.FiberResult.load(run)
    assert torch.equal(back.targets, res.targets)
    assert back.reasons == res.reasons
    assert back.reason(1, 0) == "the guided state is not finite"
    assert back.config["objective"] == json.loads(json.dumps(res.config["objective"]))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["samples"][2]["reason"] == "the guided state is not finite"
    # a re-save of the loaded result keeps the targets and reasons
    again = fp.FiberResult.load(back.save(tmp_path / "again"))
    assert torch.equal(again.targets, res.targets) and again.reasons == res.reasons
    # summed objectives: tuple targets survive too
    tup = fp.FiberResult(
        images=res.images,
        references=None,
        fiber_loss=res.fiber_loss,
        loss_trace=res.loss_trace,
        failed=res.failed,
        targets=(torch.zeros(2, 3), torch.ones(2, 5)),
    )
    back = fp.FiberResult.load(tup.save(tmp_path / "tuple"))
    assert isinstance(back.targets, tuple) and [t.shape[1] for t in back.targets] == [3, 5]


def test_report_reads_a_run_and_never_rewrites_it(pixel_prior, subject, tmp_path):
    pytest.importorskip("matplotlib")
    from fiber_plugins.reporting.report import write_report

    res = _sampler(pixel_prior, subject, num_steps=2).sample(
        references=_refs(), n=2, progress=False
    )
    run = res.save(tmp_path / "run")
    (run / "grid.png").unlink()
    kept = {p.name: p.read_bytes() for p in run.iterdir()}
    write_report(run)
    for name, data in kept.items():
        assert (run / name).read_bytes() == data, name
    assert (run / "grid.png").is_file() and (run / "report.html").is_file()
    assert torch.equal(fp.FiberResult.load(run).targets, res.targets)


def test_failure_reasons_reach_the_result(pixel_prior, subject, monkeypatch):
    class NaNAtReference(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            out = self.inner(x)
            return out * torch.nan if getattr(self, "poison", False) else out

    wrapped = NaNAtReference(subject).eval()
    s = fp.NDTMSampler(pixel_prior, fp.FiberObjective(wrapped), num_steps=2, inner_steps=1)
    from fiber_plugins.samplers import engine

    orig = engine.reference_targets

    def poisoned_targets(*a):  # phi is NaN while y* is computed, finite afterwards
        wrapped.poison = True
        try:
            return orig(*a)
        finally:
            wrapped.poison = False

    monkeypatch.setattr(engine, "reference_targets", poisoned_targets)
    res = s.sample(references=_refs(), n=2, progress=False)
    assert res.failed.all()
    assert "target" in res.reason(0, 1) and "NaN" in res.reason(0, 1)
    assert res.metrics()["samples"][0]["reason"] == res.reason(0, 0)


# ---------------------------------------------------------------------------- determinism
def test_seeds_are_per_row_and_batching_changes_only_round_off(pixel_prior, subject):
    """The documented rules (docs/samplers.md, Determinism): the same call is bit-identical; a
    row's noise does not depend on its batch; other batch sizes differ only by round-off."""
    s = _sampler(pixel_prior, subject, num_steps=5, inner_steps=2, eta=0.5)
    kw = dict(references=_refs(), n=3, seed=3, progress=False)
    a = s.sample(batch_size=2, **kw)
    assert torch.equal(a.images, s.sample(batch_size=2, **kw).images)
    # rows see the same initial noise whatever their batch
    from fiber_plugins._utils import randn_rows, row_generator

    alone = randn_rows([row_generator(3, 1, 2)], (3, 4), "cpu")
    among = randn_rows([row_generator(3, r, m) for r in range(2) for m in range(3)], (3, 4), "cpu")
    assert torch.equal(alone[0], among[5])
    for bs in (1, 6):
        b = s.sample(batch_size=bs, **kw)
        assert float((b.images - a.images).abs().max()) < 2e-3
        rel = (b.fiber_loss - a.fiber_loss).abs() / a.fiber_loss.abs()
        assert float(rel.max()) < 1e-2


def test_sample_fiber_one_call_from_a_prior_folder(pixel_prior_dir, pixel_prior, subject, tmp_path):
    objective = fp.FiberObjective(subject)
    kw = dict(references=_refs(), n=2, seed=1, progress=False)
    res = fp.sample_fiber(
        str(pixel_prior_dir), objective, out=tmp_path / "run", num_steps=3, inner_steps=1, **kw
    )
    same = _sampler(pixel_prior, subject, num_steps=3, inner_steps=1, lr_start=0.05, lr_end=0.01)
    assert torch.equal(res.images, same.sample(**kw).images)
    assert res.config["settings"]["num_steps"] == 3
    assert torch.equal(fp.FiberResult.load(tmp_path / "run").images, res.images)
    with pytest.raises(UserError, match="unknown NDTM settings"):
        fp.sample_fiber(pixel_prior, objective, n=1, steps=3, **{"references": _refs()})


def test_every_sampler_writes_its_own_config_entries_into_the_run(pixel_prior, subject, tmp_path):
    """NoiseOptSampler took no out= before, and its config["iterations"] never reached disk."""
    s = fp.NoiseOptSampler(
        pixel_prior, fp.FiberObjective(subject), num_steps=2, max_iters=2, threshold=None
    )
    res = s.sample(references=_refs(), n=1, out=tmp_path / "run", progress=False)
    assert res.config["iterations"] == [[2], [2]]
    assert fp.FiberResult.load(tmp_path / "run").config["iterations"] == [[2], [2]]


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_run_files_get_the_umasks_mode(tmp_path, umask, monkeypatch):
    """Atomic writes go through a temporary file (owner-only by mkstemp); the file they leave
    has the mode a plain open() gives under the user's umask (read at import), like the PNGs
    beside it."""
    monkeypatch.setattr(rf, "_UMASK", umask)
    old = os.umask(umask)
    try:
        rf.atomic_write(tmp_path / "metrics.json", lambda p: p.write_text("{}"))
        (tmp_path / "plain.txt").write_text("")
    finally:
        os.umask(old)
    mode = (tmp_path / "metrics.json").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask == (tmp_path / "plain.txt").stat().st_mode & 0o777


def test_an_out_folder_the_system_cannot_create_is_refused_before_loading(tmp_path):
    """A name too long, or a folder under a file system that creates nothing (/proc): one line
    at the check, not a traceback after the models have loaded; the probe leaves nothing."""
    cases = [tmp_path / ("a" * 300), tmp_path / "new" / ("b" * 300) / "run"]
    if Path("/proc/self").is_dir():
        cases.append(Path("/proc/fiber-plugins-run"))
    for path in cases:
        with pytest.raises(UserError, match=r"^cannot use output folder .*; give another folder$"):
            rf.check_out_dir(path)
    assert not (tmp_path / "new").exists()
    assert rf.check_out_dir(tmp_path / "x" / "y") == "new" and not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "status, can_resume, offers_resume",
    [("interrupted", True, True), ("running", True, True), ("complete", True, False),
     ("interrupted", False, False)],
)  # fmt: skip
def test_an_earlier_run_is_refused_offering_only_what_can_be_done(
    tmp_path, status, can_resume, offers_resume
):
    """A finished run has nothing to finish, and the demo cannot resume: the refusal offers
    --resume only for an unfinished run where the caller can resume."""
    (tmp_path / rf.RUN_FILE).write_text(
        json.dumps({"status": status, "rows_done": 3, "num_rows": 8})
    )
    with pytest.raises(UserError) as err:
        rf.check_out_dir(tmp_path, can_resume=can_resume)
    message = str(err.value)
    assert f"holds an earlier {status} run, 3 of 8 rows" in message
    assert "--overwrite (overwrite=True) to replace it" in message
    assert ("--resume" in message) is offers_resume
