"""Bad plans, targets, devices and plan files: `plan expand`, `run --dry-run` and `run` each refuse
them with one line and exit status 2, before anything is written (docs/scaling.md, Plans)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fiber_plugins.cli.main import main
from fiber_plugins.errors import UserValueError
from fiber_plugins.jobs import Plan
from tests.jobs.test_plans import small_plan

COMMANDS = {
    "expand": lambda plan, out: ["plan", "expand", plan],
    "dry-run": lambda plan, out: ["run", plan, "--dry-run"],
    "run": lambda plan, out: ["run", plan, "--out", out],
}


def refused(capsys, argv: list[str]) -> str:
    """Run the CLI: exit status 2, nothing on stdout, one line on stderr (returned)."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("fiber-plugins: error: "), err
    return err


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize(
    "edit, message",
    [
        ({"guidance = 1.0": "guidance = nan"}, "[sampler] guidance must be a finite number >= 0, got nan"),
        ({"inner_steps = 1": "inner_steps = -1"}, "[sampler] inner_steps must be an integer >= 0, got -1"),
        ({"guidance = 1.0": "guidance = -3.0"}, "[sampler] guidance must be >= 0, got -3.0"),
        ({'method = "ndtm"': 'method = "dps"', "inner_steps = 1": "", "guidance = 1.0": "guidance = inf"},
         "[sampler] guidance must be a finite number >= 0, got inf"),
        # settings the method has no use for would be stored, hashed and change nothing
        ({'method = "ndtm"': 'method = "dps"'}, "[sampler] method 'dps' does not use inner_steps; leave it out"),
        ({'method = "ndtm"': 'method = "noise-opt"', "guidance = 1.0": "guidance = 2.0"},
         "[sampler] method 'noise-opt' does not use inner_steps, guidance; leave them out"),
        ({'path = "zoo:color-mnist-prior"': 'path = "zoo:color-mnist-prior"\ndtype = "fp8"'},
         "prior.dtype 'fp8'; choose one of ['fp32', 'bf16', 'fp16']"),
    ],
)  # fmt: skip
def test_sampler_settings_are_checked_when_the_plan_is_read(
    tmp_path, capsys, command, edit, message
):
    plan, store = small_plan(tmp_path, **edit), tmp_path / "store"
    err = refused(capsys, COMMANDS[command](str(plan), str(store)))
    assert f"plan {plan}: " in err and message in err
    assert not store.exists()


def test_sampler_settings_are_checked_in_python_too():
    data = {
        "subject": {"spec": "zoo:color-mnist-classifier"},
        "target": {"spec": "layer:features.8:0-3"},
        "prior": {"path": "zoo:color-mnist-prior"},
        "references": {"dataset": "color-mnist:test"},
        "sampler": {"guidance": float("nan")},
    }
    with pytest.raises(UserValueError, match=r"\[sampler\] guidance must be a finite number"):
        Plan.from_dict(data)
    data["sampler"] = {"guidance": 2}
    assert Plan.from_dict(data).sampler_config().guidance.strength == 2.0


def test_a_unit_outside_its_layer_leaves_no_store_and_the_fixed_plan_runs(tmp_path, capsys):
    """Channels 0-200 of a 128-channel layer: refused by all three commands, with no store left
    behind, so the corrected plan then runs into the same --out."""
    wide = small_plan(tmp_path, **{'"layer:features.8:0-3"': '"layer:features.8:0-200"'})
    wide = wide.rename(tmp_path / "wide.toml")
    store = tmp_path / "store"
    for command in COMMANDS.values():
        err = refused(capsys, command(str(wide), str(store)))
        assert "target 'layer:features.8:0-200': channel 128 is out of range" in err
        assert "size 128" in err and not store.exists()
    fixed = small_plan(tmp_path, **{'"layer:features.8:0-3"': '"layer:features.8:0-1"'})
    assert main(["run", str(fixed), "--out", str(store)]) == 0
    assert "1 chunks committed now" in capsys.readouterr().out


def test_units_are_checked_at_the_priors_size_before_the_store_is_written(tmp_path, capsys):
    """A reference file the subject cannot take at its own size (1 x 1 pixels): `plan expand`
    cannot check the units, `run` checks them at the prior's image size, before the store."""
    from PIL import Image

    Image.new("RGB", (1, 1), (200, 30, 30)).save(tmp_path / "dot.png")
    plan = small_plan(
        tmp_path,
        **{'dataset = "color-mnist:test"': 'files = ["dot.png"]', "count = 2": "count = 1",
           '"layer:features.8:0-3"': '"layer:features.8:0-200"'},
    )  # fmt: skip
    assert main(["plan", "expand", str(plan)]) == 0
    capsys.readouterr()
    store = tmp_path / "store"
    err = refused(capsys, ["run", str(plan), "--out", str(store)])
    assert "channel 128 is out of range" in err and not store.exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        ({'path = "zoo:color-mnist-prior"': 'path = "no-such-prior"'}, "no-such-prior"),
        (
            {'path = "zoo:color-mnist-prior"': 'path = "zoo:color-mnist-classifier"'},
            "shipped model 'color-mnist-classifier' is not a prior",
        ),
        ({'pool = "color-mnist:train"': 'pool = "no-such-pool"'}, "no pool images"),
    ],
)
def test_a_run_that_fails_while_loading_leaves_no_store(tmp_path, capsys, edit, message):
    plan, store = small_plan(tmp_path, **edit), tmp_path / "store"
    assert message in refused(capsys, ["run", str(plan), "--out", str(store)])
    assert not store.exists()


@pytest.mark.parametrize("dry", [False, True])
def test_an_unknown_device_is_one_line(tmp_path, capsys, dry):
    plan, store = small_plan(tmp_path), tmp_path / "store"
    tail = ["--dry-run"] if dry else ["--out", str(store)]
    err = refused(capsys, ["run", str(plan), "--device", "tpu9", *tail])
    assert "unknown device 'tpu9'; use auto, cpu, cuda, cuda:N or mps" in err
    assert not store.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is absent")
def test_cuda_without_cuda_is_one_line(tmp_path, capsys):
    plan, store = small_plan(tmp_path), tmp_path / "store"
    err = refused(capsys, ["run", str(plan), "--out", str(store), "--device", "cuda"])
    assert "device 'cuda': CUDA is not available here" in err and not store.exists()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_plan_file_that_is_an_image_or_a_folder_is_one_line(tmp_path, capsys, command):
    png = tmp_path / "digit.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    folder = tmp_path / "emptydir"
    folder.mkdir()
    store = tmp_path / "store"
    err = refused(capsys, COMMANDS[command](str(png), str(store)))
    assert f"plan file '{png}' is not a text TOML or JSON plan file" in err
    err = refused(capsys, COMMANDS[command](str(folder), str(store)))
    assert f"plan file '{folder}' is a folder" in err
    assert not store.exists()


def test_a_json_plan_holds_the_same_tables(tmp_path, capsys):
    """The normalised plan (as a store's store.json holds it) is a plan file of its own."""
    path = tmp_path / "plan.json"
    for method in ("ndtm", "dps", "noise-opt"):  # the defaults it holds for every method pass
        edit = {'method = "ndtm"': f'method = "{method}"'}
        if method != "ndtm":
            edit["inner_steps = 1"] = ""
        toml = Plan.load(small_plan(tmp_path, **edit))
        path.write_text(json.dumps(toml.settings))
        assert Plan.load(path).hash() == toml.hash()
    path.write_text("{not json")
    assert "is not valid JSON" in refused(capsys, ["plan", "expand", str(path)])
    path.write_text("[1, 2]")
    assert "must hold a JSON object" in refused(capsys, ["plan", "expand", str(path)])


def test_a_foreign_out_folder_is_refused_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import fiber_plugins.jobs.run as run

    def no_work(*args, **kwargs):
        raise AssertionError("the subject was loaded before --out was checked")

    monkeypatch.setattr(run, "Work", no_work)
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "notes.txt").write_text("mine")
    err = refused(capsys, ["run", str(small_plan(tmp_path)), "--out", str(tmp_path / "store")])
    assert "holds no store (notes.txt)" in err
    (tmp_path / "file").write_text("")
    err = refused(capsys, ["run", str(small_plan(tmp_path)), "--out", str(tmp_path / "file")])
    assert "store" in err and "is a file; give a folder path" in err
    # under a file, or a name the system will not create: refused before loading too
    err = refused(
        capsys, ["run", str(small_plan(tmp_path)), "--out", str(tmp_path / "file" / "store")]
    )
    assert "cannot create store" in err and "is a file" in err
    err = refused(capsys, ["run", str(small_plan(tmp_path)), "--out", str(tmp_path / ("s" * 300))])
    assert "cannot use store" in err and not any(
        p.name.startswith("sss") for p in tmp_path.iterdir()
    )
    assert Path(tmp_path / "store" / "notes.txt").read_text() == "mine"


def test_run_device_reads_names_through_resolve_device(monkeypatch):
    """`--device` of `run`: resolve_device's one-line errors; `cuda` without an index is each
    process's own GPU (cuda:LOCAL_RANK), `cuda:N` is GPU N (CUDA faked: 4 GPUs)."""
    from fiber_plugins.jobs.run import run_device

    with pytest.raises(UserValueError, match="unknown device 'tpu9'"):
        run_device("tpu9", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert run_device(None, 5) == run_device("auto", 5) == run_device("cuda", 5) == "cuda:1"
    assert run_device("cuda:2", 5) == "cuda:2" and run_device("cpu", 5) == "cpu"
    with pytest.raises(UserValueError, match="has 4 CUDA device"):
        run_device("cuda:7", 0)


def test_a_reader_that_goes_away_is_no_traceback():
    """`fiber-plugins plan expand PLAN | head`: the pipe closes before the listing is written;
    the command ends quietly with 141 (128 + SIGPIPE), as a shell reports it."""
    import subprocess
    import sys
    from pathlib import Path

    plan = Path(__file__).resolve().parents[2] / "examples" / "plans" / "color-mnist-channels.toml"
    cmd = [sys.executable, "-m", "fiber_plugins.cli.main", "plan", "expand", str(plan)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the interpreter has even started: every write finds no reader
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err, err


def test_a_noise_opt_plans_dry_run_counts_its_own_iterations(tmp_path, capsys):
    """Noise optimisation runs NoiseOptConfig.max_iters iterations of a whole T-step decode;
    the dry run's passes count those (at most: it stops early at its threshold)."""
    from fiber_plugins.jobs.run import passes_per_sample
    from fiber_plugins.samplers.noise_opt import NoiseOptConfig

    edit = {'method = "ndtm"': 'method = "noise-opt"', "inner_steps = 1": "", "guidance = 1.0": ""}
    plan = small_plan(tmp_path, **edit)
    k, t = NoiseOptConfig().max_iters, 2
    assert passes_per_sample(Plan.load(plan)) == {
        "prior_fwd": t * k, "prior_bwd": t * k, "subject_fwd": k, "subject_bwd": k
    }  # fmt: skip
    assert main(["run", str(plan), "--dry-run"]) == 0
    assert f"{t * k} prior fwd" in capsys.readouterr().out


def test_an_empty_file_list_is_one_line(tmp_path, capsys):
    plan = small_plan(tmp_path, **{'dataset = "color-mnist:test"': "files = []"})
    for argv in (["plan", "expand", str(plan)], ["run", str(plan), "--dry-run"]):
        assert "references.files is empty" in refused(capsys, argv)
