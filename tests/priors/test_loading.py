"""Loading priors from diffusers folders (offline) and clear errors for broken folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import fiber_plugins as fp
from fiber_plugins.errors import MissingFileError, UserValueError

from ..conftest import tiny_unet, tiny_vae


def test_pixel_prior_roundtrip(pixel_prior):
    assert pixel_prior.kind == "pixel"
    assert pixel_prior.image_size == (16, 16) and pixel_prior.latent_shape == (3, 16, 16)
    steps = pixel_prior.timesteps(10)
    assert len(steps) == 10 and steps[0].level > steps[-1].level
    assert steps[-1].a_s == pytest.approx(1.0)


def _dit(seed=0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=4,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=4,
    )


@pytest.fixture(scope="module")
def dit_prior_dir(tmp_path_factory):
    from diffusers import DDIMScheduler

    root = tmp_path_factory.mktemp("dit")
    _dit().save_pretrained(root / "transformer")
    tiny_vae().save_pretrained(root / "vae")
    DDIMScheduler(num_train_timesteps=1000, clip_sample=False).save_pretrained(root / "scheduler")
    return root


def test_latent_dit_prior(dit_prior_dir, subject):
    prior = fp.load_prior(dit_prior_dir)
    assert prior.kind == "latent" and prior.class_label == 10  # the null class
    assert prior.latent_shape == (4, 4, 4) and prior.image_size == (8, 8)
    z = torch.randn(2, 4, 4, 4)
    out = prior.model_output(z, prior.timesteps(5)[0])
    assert out.shape == z.shape  # learned-variance half dropped
    img = prior.decode(z)
    assert img.shape == (2, 3, 8, 8)
    assert prior.encode(img).shape == z.shape
    obj = fp.FiberObjective(subject)
    res = fp.NDTMSampler(prior, obj, num_steps=4, inner_steps=2).sample(
        references=torch.rand(1, 3, 8, 8), n=2, progress=False
    )
    assert res.images.shape == (1, 2, 3, 8, 8) and torch.isfinite(res.fiber_loss).all()


def test_latent_unet_conditional_prior_uses_fixed_empty_conditioning(tmp_path, subject):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        norm_num_groups=4,
        attention_head_dim=4,
    )
    unet.save_pretrained(tmp_path / "unet")
    tiny_vae().save_pretrained(tmp_path / "vae")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path / "scheduler")
    cond = torch.randn(1, 3, 12)
    prior = fp.load_prior(tmp_path, conditioning=cond)
    assert prior.kind == "latent" and prior.denoiser_type == "UNet2DConditionModel"
    z = torch.randn(2, 4, 4, 4)
    step = prior.timesteps(5)[1]
    out = prior.model_output(z, step)
    with torch.no_grad():
        ref = unet(
            z, torch.tensor([int(step.timestep)] * 2), encoder_hidden_states=cond.expand(2, -1, -1)
        ).sample
    torch.testing.assert_close(out, ref)
    res = fp.NDTMSampler(prior, fp.FiberObjective(subject), num_steps=3, inner_steps=1).sample(
        references=torch.rand(1, 3, 8, 8), n=1, progress=False
    )
    assert torch.isfinite(res.fiber_loss).all()


def test_flow_prior_from_folder(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    tiny_unet().save_pretrained(tmp_path / "unet")
    FlowMatchEulerDiscreteScheduler().save_pretrained(tmp_path / "scheduler")
    prior = fp.load_prior(tmp_path)
    assert prior.kind == "flow"
    steps = prior.timesteps(8)
    assert steps[0].level == pytest.approx(1.0) and steps[-1].s_s == 0.0


def test_missing_folder_errors(tmp_path, pixel_prior_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fp.load_prior(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(pixel_prior_dir, broken)
    shutil.rmtree(broken / "scheduler")
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        fp.load_prior(broken)
    broken2 = tmp_path / "broken2"
    shutil.copytree(pixel_prior_dir, broken2)
    for f in (broken2 / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        fp.load_prior(broken2)
    empty = tmp_path / "empty"
    (empty / "scheduler").mkdir(parents=True)
    shutil.copy(pixel_prior_dir / "scheduler" / "scheduler_config.json", empty / "scheduler")
    with pytest.raises(FileNotFoundError, match="'unet/' or 'transformer/'"):
        fp.load_prior(empty)


def test_prior_weights_frozen_and_eval(pixel_prior):
    assert not any(p.requires_grad for p in pixel_prior.denoiser.parameters())
    assert not pixel_prior.denoiser.training


def test_tiny_unet_helper_is_small():
    assert sum(p.numel() for p in tiny_unet().parameters()) < 100_000


# ---------------------------------------------------------------- one-line errors at the boundary
def _one_line(err) -> str:
    message = str(err.value)
    assert message and "\n" not in message, message
    return message


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors_named_in_one_line(tmp_path, pixel_prior_dir):
    root = _copy(pixel_prior_dir, tmp_path / "prior")
    weights = root / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserValueError) as err:
        fp.load_prior(root)
    message = _one_line(err)
    assert str(weights) in message and "truncated or corrupt" in message
    assert "re-download/re-save it" in message


def test_config_that_does_not_fit_its_weights_one_line(tmp_path, pixel_prior_dir):
    root = _copy(pixel_prior_dir, tmp_path / "prior")
    file = root / "unet" / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "block_out_channels": [8, 32]}))
    with pytest.raises(UserValueError) as err:
        fp.load_prior(root)
    message = _one_line(err)
    assert "diffusers cannot load" in message and "expected shape" in message
    assert "ignore_mismatched_sizes" not in message


def test_pickled_weights_refused_without_weights_only_advice(tmp_path, pixel_prior_dir):
    root = tmp_path / "prior"
    tiny_unet().save_pretrained(root / "unet", safe_serialization=False)
    shutil.copytree(pixel_prior_dir / "scheduler", root / "scheduler")
    assert (root / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(UserValueError) as err:
        fp.load_prior(root)
    message = _one_line(err)
    assert "diffusion_pytorch_model.bin" in message and "refused" in message
    assert "pickles are not loaded" in message and "safe_serialization=True" in message
    assert "weights_only=False" not in message


@pytest.mark.parametrize(
    "source",
    [
        "some/missing/path",
        "./prior",
        "~/no-such-prior-folder",
        "/no/such/prior",
        "prior.safetensors",
    ],
)
def test_missing_local_looking_path_never_goes_to_the_hub(monkeypatch, source):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub must not be asked for a local-looking path")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    with pytest.raises(MissingFileError) as err:
        fp.load_prior(source)
    assert f"prior folder {source!r} does not exist" in _one_line(err)


def test_missing_path_under_an_existing_folder_is_local(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("Hub"))
    with pytest.raises(MissingFileError) as err:
        fp.load_prior("models/prior")
    assert "prior folder 'models/prior' does not exist" in _one_line(err)


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1, also for the huggingface_hub already imported: no network in tests."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_hub_id_offline_one_line(offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserValueError) as err:
        fp.load_prior("no-such-org/no-such-prior")
    message = _one_line(err)
    assert "'no-such-org/no-such-prior' is not a local folder" in message
    assert "Hub cannot be reached" in message and "HF_HUB_OFFLINE" in message
    # the fix, named: the download command for a machine with a network, then the folder
    assert "huggingface-cli download no-such-org/no-such-prior --local-dir" in message
    assert "pass that folder" in message


def test_hub_id_without_network_one_line(offline, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from fiber_plugins.priors import loading

    def no_network(*args, **kwargs):  # what snapshot_download raises when the DNS lookup fails
        raise LocalEntryNotFoundError(
            "Got: ConnectError: [Errno -2] Name or service not known\n..."
        )

    monkeypatch.setattr(loading, "_offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserValueError) as err:
        fp.load_prior("org/name")
    message = _one_line(err)
    assert "not a local folder" in message and "(no network)" in message


def test_hub_id_not_on_the_hub_one_line(offline, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(*args, **kwargs):
        err = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # no HTTP response needed
        Exception.__init__(err, "404 Client Error: Repository Not Found")
        raise err

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserValueError) as err:
        fp.load_prior("org/typo-prior")
    message = _one_line(err)
    assert (
        "'org/typo-prior' is neither a local folder nor a model on the Hugging Face Hub" in message
    )


@pytest.mark.parametrize(
    ("prior", "message"),
    [
        ("some/missing/path", "prior folder 'some/missing/path' does not exist"),
        ("no-such-org/no-such-prior", "Hugging Face Hub cannot be reached (HF_HUB_OFFLINE"),
    ],
)
def test_cli_missing_prior_exit_2(offline, tmp_path, capsys, monkeypatch, prior, message):
    from PIL import Image

    from fiber_plugins.cli.main import main

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (16, 16)).save(tmp_path / "ref.png")
    argv = ["sample", "--subject", "module:tests.conftest:make_subject", "--prior", prior,
            "--reference", "ref.png", "--out", str(tmp_path / "run"), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def _scheduler(root, **changes):
    file = root / "scheduler" / "scheduler_config.json"
    cfg = json.loads(file.read_text())
    cfg.update(changes)
    file.write_text(json.dumps(cfg))
    return file


def test_unknown_scheduler_class_refused(tmp_path, pixel_prior_dir):
    root = _copy(pixel_prior_dir, tmp_path / "prior")
    file = _scheduler(root, _class_name="EDMEulerScheduler")
    with pytest.raises(UserValueError) as err:
        fp.load_prior(root)
    message = _one_line(err)
    assert str(file) in message and "'EDMEulerScheduler'" in message
    assert "supported: DDPMScheduler" in message and "FlowMatchEulerDiscreteScheduler" in message
    with pytest.raises(UserValueError, match="'NoSuchScheduler'"):
        fp.DiffusionPrior(tiny_unet(), {"_class_name": "NoSuchScheduler"})


def test_ddpm_family_schedulers_read_as_ddpm(tmp_path, pixel_prior_dir):
    root = _copy(pixel_prior_dir, tmp_path / "prior")
    _scheduler(root, _class_name="EulerDiscreteScheduler")
    assert fp.load_prior(root).schedule.family == "ddpm"
    _scheduler(root, timestep_type="continuous")  # the network would take c_noise(sigma)
    with pytest.raises(UserValueError) as err:
        fp.load_prior(root)
    assert "timestep_type 'continuous'" in _one_line(err)


def test_conditional_model_truncated_condition_weights(tmp_path):
    from fiber_plugins.priors import ConditionalFiberModel
    from fiber_plugins.priors.conditional import ConditionEmbedding

    unet = tiny_unet(sample_size=8, class_embed_type="identity")
    width = unet.time_embedding.linear_2.out_features
    root = ConditionalFiberModel(unet, ConditionEmbedding(3, width, hidden=8)).save_pretrained(
        tmp_path / "model"
    )
    assert isinstance(fp.load_prior(root), ConditionalFiberModel)
    weights = root / "condition" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    with pytest.raises(UserValueError) as err:
        fp.load_prior(root)
    message = _one_line(err)
    assert str(weights) in message and "truncated or corrupt" in message
