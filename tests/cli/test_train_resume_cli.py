"""`fiber-plugins train prior --checkpoint DIR --resume`: a resume under another recipe, a
--checkpoint that is a file or a folder of other files, and one with nothing to resume are each
refused in one line with exit code 2, writing nothing; the same command resumes to bit-identical
weights."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from fiber_plugins.cli.main import main  # noqa: E402

BASE = ["train", "prior", "--steps", "2", "--batch-size", "4", "--device", "cpu"]


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fiber-plugins: error: ")
    return err


def test_a_resume_under_another_recipe_is_refused_and_the_same_one_is_bit_identical(
    tmp_path, capsys
):
    ck = tmp_path / "ck"
    assert main([*BASE, "--out", str(tmp_path / "tp4"), "--checkpoint", str(ck)]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    for extra, named in [
        (["--objective", "epsilon"], "objective: checkpoint 'flow', now 'epsilon'"),
        (["--seed", "5"], "seed: checkpoint 0, now 5"),
        (["--batch-size", "3"], "batch_size: checkpoint 4, now 3"),
        (["--steps", "3"], "steps: checkpoint 2, now 3"),
    ]:
        out = tmp_path / "X"
        argv = [*BASE, "--out", str(out), *extra, "--checkpoint", str(ck), "--resume"]
        assert main(argv) == 2
        err = _error(capsys)
        assert named in err and "cannot be resumed" in err
        assert not out.exists()
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before
    out = tmp_path / "X"
    assert main([*BASE, "--out", str(out), "--checkpoint", str(ck), "--resume"]) == 0
    a, b = _weights(tmp_path / "tp4"), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_path_that_is_a_file_or_another_folder_is_refused(tmp_path, capsys):
    png = tmp_path / "digit.png"
    png.write_bytes(b"png")
    run = tmp_path / "run"  # a finished sample run folder
    run.mkdir()
    (run / "run.json").write_text("{}")
    (run / "grid.png").write_bytes(b"png")
    for folder, resume, message in [
        (png, ["--resume"], f"checkpoint folder {str(png)!r} is a file; give a folder"),
        (png, [], f"checkpoint folder {str(png)!r} is a file; give a folder"),
        (run, ["--resume"], f"checkpoint folder {str(run)!r} holds files that are not a training"),
        (run, [], repr(str(run))),  # cmd_train's own check: refused too, the folder named
    ]:
        argv = [*BASE, "--out", str(tmp_path / "out"), "--checkpoint", str(folder), *resume]
        assert main(argv) == 2
        assert message in _error(capsys)
    assert not (tmp_path / "out").exists() and png.read_bytes() == b"png"
    assert sorted(p.name for p in run.iterdir()) == ["grid.png", "run.json"]


def test_resume_with_no_checkpoint_there_is_refused(tmp_path, capsys):
    """--resume means "continue from the --checkpoint folder" (its help): with no checkpoint
    there, there is nothing to continue, so it is refused rather than training afresh."""
    ck, out = tmp_path / "ck_none", tmp_path / "out"
    assert main([*BASE, "--out", str(out), "--checkpoint", str(ck), "--resume"]) == 2
    assert "nothing to resume" in _error(capsys)
    assert not ck.exists() and not out.exists()
