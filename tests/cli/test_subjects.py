"""Subject strings and their weights: one safe loader, one-line errors for every bad file."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from fiber_plugins.cli.main import main
from fiber_plugins.errors import MissingFileError, UserError, UserTypeError, UserValueError
from fiber_plugins.specs.subjects import load_subject

from ..conftest import TinySubject

SUBJECT = "module:tests.conftest:make_subject"


class NotATensor:
    """Any Python object: a safe load must refuse to build it."""


def _one_line(err) -> str:
    message = str(err.value)
    assert message and "\n" not in message, message
    return message


@pytest.fixture
def state():
    return TinySubject(seed=1).state_dict()


def test_safetensors_and_torch_state_dicts_load(tmp_path, state):
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "w.pt")  # nested, as trainers write
    for name in ("w.safetensors", "w.pt"):
        model, _ = load_subject(SUBJECT, str(tmp_path / name))
        for key, value in state.items():
            torch.testing.assert_close(model.state_dict()[key], value, msg=key)


def test_truncated_safetensors(tmp_path, state):
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserValueError) as err:
        load_subject(SUBJECT, str(path))
    message = _one_line(err)
    assert repr(str(path)) in message and "truncated or corrupt" in message
    assert "re-download/re-save it" in message


def test_truncated_torch_file(tmp_path, state):
    path = tmp_path / "w.pt"
    torch.save(state, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserValueError) as err:
        load_subject(SUBJECT, str(path))
    assert "truncated or corrupt" in _one_line(err)


@pytest.mark.parametrize("how", ["torch.save", "pickle.dumps"])
def test_pickle_with_objects_refused_without_weights_only_advice(tmp_path, state, how):
    path = tmp_path / "w.pt"
    checkpoint = {"state_dict": state, "config": NotATensor()}
    if how == "torch.save":
        torch.save(checkpoint, path)
    else:
        path.write_bytes(pickle.dumps(checkpoint, protocol=2))  # torch's own protocol
    with pytest.raises(UserValueError) as err:
        load_subject(SUBJECT, str(path))
    message = _one_line(err)
    assert "pickled Python objects" in message and "not loaded" in message
    assert "safetensors.torch.save_file" in message
    assert "weights_only=False" not in message


def test_unknown_suffix(tmp_path):
    path = tmp_path / "w.txt"
    path.write_text("weights")
    with pytest.raises(UserValueError) as err:
        load_subject(SUBJECT, str(path))
    message = _one_line(err)
    assert "suffix '.txt'" in message and ".safetensors" in message


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(MissingFileError) as err:
        load_subject(SUBJECT, str(tmp_path / "nope.safetensors"))
    assert "does not exist" in _one_line(err)
    with pytest.raises(UserValueError) as err:
        load_subject(SUBJECT, str(tmp_path))
    assert "is a folder" in _one_line(err)


def test_state_dict_that_does_not_fit(tmp_path, state):
    wrong_shape = {**state, "fc.weight": torch.zeros(3, 32)}
    save_file(wrong_shape, str(tmp_path / "shape.safetensors"))
    with pytest.raises(UserValueError) as err:
        load_subject(SUBJECT, str(tmp_path / "shape.safetensors"))
    message = _one_line(err)
    assert "do not match" in message and "fc.weight: (3, 32) vs (6, 32)" in message
    save_file({f"module.{k}": v for k, v in state.items()}, str(tmp_path / "dp.safetensors"))
    with pytest.raises(UserValueError) as err:
        load_subject(SUBJECT, str(tmp_path / "dp.safetensors"))
    message = _one_line(err)
    assert "missing key" in message and "'module.'" in message


def test_torch_file_without_a_state_dict(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "t.pt")
    with pytest.raises(UserTypeError) as err:
        load_subject(SUBJECT, str(tmp_path / "t.pt"))
    assert "holds a Tensor, not a state dict" in _one_line(err)


def test_zoo_subject_refuses_weights(tmp_path, state):
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(UserValueError) as err:
        load_subject("zoo:color-mnist-classifier", str(tmp_path / "w.safetensors"))
    assert "zoo models carry their own weights; drop --weights" in _one_line(err)


def test_cli_weights_errors_exit_2(tmp_path, capsys, state):
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    (tmp_path / "w.txt").write_text("weights")
    save_file(state, str(tmp_path / "w.safetensors"))
    cases = [
        (["--subject", SUBJECT, "--weights", str(tmp_path / "w.txt")], "suffix '.txt'"),
        (
            [
                "--subject",
                "zoo:color-mnist-classifier",
                "--weights",
                str(tmp_path / "w.safetensors"),
            ],
            "drop --weights",
        ),
    ]
    for extra, message in cases:
        ref = str(tmp_path / "x.png")
        argv = ["sample", *extra, "--prior", str(tmp_path / "no-prior"), "--reference", ref]
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_every_failure_is_a_user_error(tmp_path):
    """No third-party exception crosses the boundary for a bad weights file."""
    for name, data in [("a.safetensors", b"\x00" * 3), ("b.pt", b"garbage"), ("c.ckpt", b"")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError) as err:
            load_subject(SUBJECT, str(tmp_path / name))
        _one_line(err)


def test_timm_subject_without_weights_warns_and_with_weights_loads_them(tmp_path):
    """``timm:NAME`` never downloads: without --weights the model is random, which a user must
    be told (as for OpenCLIP); with them, they are what the model holds."""
    import warnings

    timm = pytest.importorskip("timm")
    with pytest.warns(UserWarning, match=r"timm model 'test_vit' has no weights: .*--weights"):
        model, pre = load_subject("timm:test_vit")
    assert pre is not None and not model.training
    reference = timm.create_model("test_vit", pretrained=False)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded, _ = load_subject("timm:test_vit", weights=str(path))
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
