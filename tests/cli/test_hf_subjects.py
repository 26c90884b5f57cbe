"""``hf:FOLDER`` and ``open_clip:ARCH`` subjects on the command line: ``targets`` lists the named
outputs, ``--target output:NAME[:INDEX][:token=T][:normalize]`` names one, ``sample`` runs end to
end, and mistakes are one line with exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fiber_plugins.cli.main import main
from fiber_plugins.specs.subjects import load_subject
from fiber_plugins.specs.targets import objective_from_spec

pytest.importorskip("transformers", reason="transformers not installed (extra 'hf')")

from tests.adapters.test_hf import as_prior, photo, save_tiny  # noqa: E402


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("hf") / "vit", "vit")


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("hf") / "vit-classifier", "vit-classifier")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    pytest.importorskip("open_clip", reason="open_clip not installed (extra 'openclip')")
    from tests.adapters.test_open_clip import save_tiny_open_clip

    return save_tiny_open_clip(tmp_path_factory.mktemp("open_clip") / "tiny")


@pytest.fixture
def ref_png(tmp_path):
    path = tmp_path / "ref.png"
    Image.fromarray(photo(16)).save(path)
    return path


def _sample(subject, prior_dir, ref, out, *extra):
    return [
        "sample",
        "--subject",
        subject,
        "--prior",
        str(prior_dir),
        "--reference",
        str(ref),
        "-n",
        "2",
        "--steps",
        "2",
        "--inner-steps",
        "1",
        "--out",
        str(out),
        "--device",
        "cpu",
        *extra,
    ]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------- Hugging Face
def test_targets_lists_the_named_outputs(hf_folder, capsys):
    assert main(["targets", f"hf:{hf_folder}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "input (3, 32, 32)" in lines[0] and "output:NAME" in lines[0]
    rows = [line.split(None, 1) for line in lines[1:]]
    assert rows == [
        ["last_hidden_state", "(1, 17, 32)"],
        ["pooler_output", "(1, 32)"],
        ["hidden_states.0", "(1, 17, 32)"],
        ["hidden_states.1", "(1, 17, 32)"],
        ["hidden_states.2", "(1, 17, 32)"],
    ]


def test_sample_with_an_hf_subject(hf_folder, pixel_prior_dir, ref_png, tmp_path, capsys):
    """A 16-px prior, a 32-px ViT: the processor's resize to 32 x 32 is applied."""
    out = tmp_path / "run"
    args = _sample(
        f"hf:{hf_folder}", pixel_prior_dir, ref_png, out, "--target", "output:pooler_output"
    )
    assert main(args) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    objective = metrics["config"]["objective"]
    assert objective["adapter"] == "hf" and objective["output"] == "pooler_output"
    assert objective["preprocess"]["size"] == [32, 32] and (out / "grid.png").exists()


@pytest.mark.parametrize(
    "spec, output, token, index",
    [
        ("output:pooler_output", "pooler_output", None, None),
        ("output:last_hidden_state:token=mean:3", "last_hidden_state", "mean", 3),
        ("output:last_hidden_state:5:token=4", "last_hidden_state", 4, 5),
        ("output:hidden_states.1:token=all", "hidden_states.1", "all", None),
        ("output:hidden_states.-1:1+2", "hidden_states.-1", None, [1, 2]),
    ],
)
def test_output_grammar(hf_folder, spec, output, token, index):
    from fiber_plugins.adapters.hf import hf_objective

    model, pre = load_subject(f"hf:{hf_folder}")
    obj = objective_from_spec(model, spec, preprocess=pre)
    expected = hf_objective(model, output, token=token, index=index, preprocess=pre)
    x = as_prior(photo(24))
    with torch.no_grad():
        torch.testing.assert_close(obj.features(x), expected.features(x))
    assert obj.name == spec


def test_output_units(hf_folder):
    """A range after an output's name: one unit per feature, sampled in one call."""
    from fiber_plugins.objectives.units import UnitSet

    model, pre = load_subject(f"hf:{hf_folder}")
    obj = objective_from_spec(model, "output:last_hidden_state:token=mean:0-3", preprocess=pre)
    assert isinstance(obj, UnitSet)
    assert obj.labels == [f"output:last_hidden_state:{i}" for i in range(4)]
    joint = objective_from_spec(
        model, "output:last_hidden_state:token=mean:0+1+2+3", preprocess=pre
    )
    x = as_prior(photo(24))
    with torch.no_grad():
        torch.testing.assert_close(obj.features(x), joint.features(x))


def test_layer_targets_work_on_hf_subjects(hf_folder):
    """``layer:NAME`` reads any submodule of the transformers model with a hook."""
    model, pre = load_subject(f"hf:{hf_folder}")
    x = as_prior(photo(32))
    obj = objective_from_spec(model, "layer:layers.1.mlp.fc1", preprocess=pre)
    recorded = {}
    handle = model.layers[1].mlp.fc1.register_forward_hook(lambda m, a, o: recorded.update(o=o))
    try:
        with torch.no_grad():
            features = obj.features(x)
            model(pixel_values=pre(x))
    finally:
        handle.remove()
    torch.testing.assert_close(features, recorded["o"].flatten(1))


def test_logits_of_a_classifier(classifier_folder):
    model, pre = load_subject(f"hf:{classifier_folder}")
    x = as_prior(photo(32))
    with torch.no_grad():
        logits = model(pixel_values=pre(x)).logits
        all_logits = objective_from_spec(model, "logits", preprocess=pre).features(x)
        torch.testing.assert_close(all_logits, logits)
        one = objective_from_spec(model, "logits:2", preprocess=pre).features(x)
        torch.testing.assert_close(one, logits[:, 2:3])


@pytest.mark.parametrize(
    "subject, extra, message",
    [
        ("hf:{vit}", [], "unknown output 'logits' of ViTModel; valid: last_hidden_state"),
        ("hf:{vit}", ["--target", "output:pooler"], "closest: 'pooler_output'"),
        ("hf:{vit}", ["--target", "output:pooler_output:token=cls"], "needs (B, tokens, D)"),
        ("hf:{vit}", ["--target", "output:pooler_output:normalize"], "is for open_clip:"),
        ("hf:{vit}", ["--target", "output:pooler_output:1:2"], "more than one index"),
        ("hf:{vit}", ["--weights", "w.safetensors"], "carries its own weights"),
        ("hf:./no/such/folder", [], "does not exist"),
        (
            "module:tests.conftest:make_subject",
            ["--target", "output:pooler_output"],
            "names an output of a Hugging Face or OpenCLIP subject",
        ),
    ],
)
def test_mistakes_are_one_line(
    hf_folder, pixel_prior_dir, ref_png, tmp_path, capsys, subject, extra, message
):
    args = _sample(subject.format(vit=hf_folder), pixel_prior_dir, ref_png, tmp_path / "r", *extra)
    assert main(args) == 2
    assert message in _one_error_line(capsys)


# ---------------------------------------------------------------------------- OpenCLIP
def test_open_clip_targets_and_sample(clip_folder, pixel_prior_dir, ref_png, tmp_path, capsys):
    assert main(["targets", f"open_clip:{clip_folder}"]) == 0
    listing = capsys.readouterr().out
    assert "image_embedding" in listing and "visual.transformer.resblocks.1" in listing
    out = tmp_path / "run"
    target = ["--target", "output:image_embedding:normalize"]
    assert main(_sample(f"open_clip:{clip_folder}", pixel_prior_dir, ref_png, out, *target)) == 0
    objective = json.loads((out / "metrics.json").read_text())["config"]["objective"]
    assert objective["adapter"] == "open_clip" and objective["output"] == "image_embedding"


def test_open_clip_layer_target(clip_folder):
    from fiber_plugins.adapters.open_clip import open_clip_objective

    model, pre = load_subject(f"open_clip:{clip_folder}")
    spec = "output:visual.transformer.resblocks.1:token=mean:3"
    obj = objective_from_spec(model, spec, preprocess=pre)
    expected = open_clip_objective(
        model, layer="visual.transformer.resblocks.1", token="mean", index=3, preprocess=pre
    )
    x = as_prior(photo(24))
    with torch.no_grad():
        torch.testing.assert_close(obj.features(x), expected.features(x))


def test_open_clip_builtin_name_with_weights(clip_folder, monkeypatch, capsys):
    import open_clip

    from tests.adapters.test_open_clip import TINY_CFG

    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "fiber-tiny-ViT", dict(TINY_CFG))
    weights = clip_folder / "open_clip_model.safetensors"
    assert main(["targets", "open_clip:fiber-tiny-ViT", "--weights", str(weights)]) == 0
    assert "image_embedding" in capsys.readouterr().out


@pytest.mark.parametrize(
    "subject, extra, message",
    [
        ("open_clip:ViT-B-322", [], "closest: 'ViT-B-32'"),
        ("open_clip:{clip}", [], "unknown output 'logits' of CLIP"),
        ("open_clip:{clip}", ["--target", "output:visual.transformer.resblock.0"], "closest"),
        ("open_clip:{clip}", ["--weights", "{vit_weights}"], "do not match"),
    ],
)
def test_open_clip_mistakes_are_one_line(
    clip_folder, hf_folder, pixel_prior_dir, ref_png, tmp_path, capsys, subject, extra, message
):
    fill = {"clip": clip_folder, "vit_weights": hf_folder / "model.safetensors"}
    subject = subject.format(**fill)
    extra = [e.format(**fill) for e in extra]
    assert main(_sample(subject, pixel_prior_dir, ref_png, tmp_path / "r", *extra)) == 2
    assert message in _one_error_line(capsys)


def test_photo_png_round_trip(ref_png):
    """The reference written for the runs is the photo crop itself (lossless PNG)."""
    assert np.array_equal(np.asarray(Image.open(ref_png)), photo(16))


@pytest.mark.parametrize("kind", ["hf", "open_clip"])
def test_sample_on_a_converted_adm_prior(kind, hf_folder, clip_folder, tmp_path, capsys):
    """The issue's end-to-end path: a guided-diffusion checkpoint converted with
    ``fiber-plugins convert adm``, then ``sample`` with an ``hf:`` / ``open_clip:`` subject."""
    pytest.importorskip("deepinv")
    from tests.priors.test_adm import _flags, small_checkpoint

    path, _, _ = small_checkpoint(tmp_path, "uncond")
    prior_dir = tmp_path / "adm-prior"
    assert main(["convert", "adm", str(path), str(prior_dir), *_flags("uncond")]) == 0
    ref = tmp_path / "ref.png"
    Image.fromarray(photo(48)).save(ref)  # larger than the 32-px prior: read natively
    subject, target = {
        "hf": (f"hf:{hf_folder}", "output:pooler_output"),
        "open_clip": (f"open_clip:{clip_folder}", "output:image_embedding"),
    }[kind]
    out = tmp_path / "run"
    assert main([*_sample(subject, prior_dir, ref, out, "--target", target)]) == 0, (
        capsys.readouterr().err
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_failed"] == 0 and np.isfinite(metrics["median_fiber_loss"])
    assert (out / "grid.png").exists()
