"""The bad-input matrix: every user mistake is one line, a UserError, and loses nothing.

Command-line rows: ``fiber-plugins ...`` returns exit code 2 (argparse errors: SystemExit(2)) and
prints exactly one line to stderr, ``fiber-plugins...error: ...``, that quotes the bad value or
names the fix, with no traceback; nothing under the test's folder is created, changed or removed
(an earlier run in ``--out`` keeps its bytes; a new ``--out`` is not created).

Python rows: the call raises a :class:`fiber_plugins.errors.UserError` that is also the built-in
exception a caller expects (ValueError, TypeError, ...), with a one-line message that has the key
words.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import fiber_plugins as fp
from fiber_plugins.cli.main import main
from fiber_plugins.errors import UserError

SUBJECT = "module:tests.conftest:make_subject"
HERE = "module:tests.test_bad_inputs"
ASSETS = Path(fp.__file__).resolve().parent / "assets"


# ---------------------------------------------------------------------------- subjects


class UnusedLayerNet(nn.Module):
    """conftest's TinySubject shape, plus a submodule that forward never calls."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.unused = nn.Conv2d(8, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv1(x))).flatten(1))


def make_unused_layer_subject():
    return UnusedLayerNet().eval()


def make_dead_channel_subject():
    """TinySubject whose channel 0 of ``act`` (ReLU after conv1) is 0 for every image in [0, 1]."""
    from tests.conftest import TinySubject

    model = TinySubject().eval()
    with torch.no_grad():
        model.conv1.weight[0].zero_()
        model.conv1.bias[0] = -100.0
    return model


def make_mnist_linear_subject():
    """A subject for 3x28x28 inputs (flatten -> linear): cannot take the 16x16 prior's images."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 28 * 28, 6)).eval()


class CreatesFile:
    """Unpickling this object creates ``path``: a pickle that must never be executed."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict:
    """Every file (bytes) and folder under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = p.read_bytes() if p.is_file() else "<dir>"
    return out


def asset_times() -> dict:
    return {str(p): p.stat().st_mtime_ns for p in ASSETS.rglob("*")}


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    """A complete run folder, written once with FiberResult.save."""
    g = torch.Generator().manual_seed(0)
    result = fp.FiberResult(
        images=torch.rand(1, 2, 3, 16, 16, generator=g),
        references=torch.rand(1, 3, 16, 16, generator=g),
        fiber_loss=torch.tensor([[0.1, 0.2]]),
        loss_trace=torch.rand(1, 2, 3, generator=g),
        failed=torch.zeros(1, 2, dtype=torch.bool),
        config={"sampler": "ndtm", "seed": 0},
        targets=torch.rand(1, 6, generator=g),
    )
    return result.save(tmp_path_factory.mktemp("earlier") / "run")


class Ctx:
    """What a row builds its command from; every file lives under ``tmp``."""

    def __init__(self, tmp: Path, prior_dir: Path, earlier: Path, monkeypatch):
        self.tmp, self.prior, self._earlier, self.monkeypatch = tmp, prior_dir, earlier, monkeypatch
        arr = (np.random.default_rng(0).random((20, 20, 3)) * 255).astype("uint8")
        self.ref = tmp / "ref.png"
        Image.fromarray(arr).save(self.ref)
        self.out = tmp / "run"

    def sample(self, *extra, ref=True, out=None, prior=None, subject=SUBJECT) -> list[str]:
        argv = ["sample", "--subject", subject, "--prior", str(prior or self.prior)]
        if ref:
            argv += ["--reference", str(self.ref)]
        argv += ["-n", "2", "--steps", "3", "--inner-steps", "1", "--device", "cpu"]
        return [*argv, "--out", str(out or self.out), *extra]

    def earlier(self, path: Path | None = None) -> Path:
        path = path or self.out
        shutil.copytree(self._earlier, path)
        return path

    def write(self, name: str, data: bytes | str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def folder(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir()
        return path

    def prior_copy(self) -> Path:
        return shutil.copytree(self.prior, self.tmp / "prior")

    @property
    def marker(self) -> Path:
        return self.tmp / "PICKLE-WAS-RUN"


# ---------------------------------------------------------------------------- row builders


def _out_unwritable(c: Ctx):
    locked = c.tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root writes anywhere: make os.access tell the truth for a user
        real = os.access

        def access(path, mode, *a, **kw):
            if Path(path).resolve() == locked.resolve() and mode & os.W_OK:
                return False
            return real(path, mode, *a, **kw)

        c.monkeypatch.setattr(os, "access", access)
    return c.sample(out=locked / "run")


def _nonempty_no_run(c: Ctx):
    c.write("run/notes.txt", "my notes")
    return c.sample("--overwrite")


def _vector_npy(c: Ctx, array, name="vec.npy"):
    path = c.tmp / name
    np.save(path, array)
    return c.sample("--target-vector", str(path), ref=False)


def _pickle_pt(c: Ctx):
    path = c.tmp / "vec.pt"
    torch.save({"target": CreatesFile(c.marker)}, path)
    return c.sample("--target-vector", str(path), ref=False)


def _pickle_npy(c: Ctx):
    path = c.tmp / "vec.npy"
    arr = np.empty(1, dtype=object)
    arr[0] = CreatesFile(c.marker)
    np.save(path, arr, allow_pickle=True)
    return c.sample("--target-vector", str(path), ref=False)


def _raw_pickle_pt(c: Ctx):
    path = c.write("vec.pt", pickle.dumps(CreatesFile(c.marker), protocol=2))
    return c.sample("--target-vector", str(path), ref=False)


def _vector_wrong_width(c: Ctx):
    from safetensors.torch import save_file

    path = c.tmp / "vec.safetensors"
    save_file({"target": torch.zeros(5)}, str(path))
    return c.sample("--target-vector", str(path), ref=False)


def _vector_two_tensors(c: Ctx):
    from safetensors.torch import save_file

    path = c.tmp / "vec.safetensors"
    save_file({"a": torch.zeros(6), "b": torch.ones(6)}, str(path))
    return c.sample("--target-vector", str(path), ref=False)


def _prior_truncated(c: Ctx):
    prior = c.prior_copy()
    weights = prior / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return c.sample(prior=prior)


def _prior_pickle_bin(c: Ctx):
    from safetensors.torch import load_file

    prior = c.prior_copy()
    weights = prior / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), weights.with_suffix(".bin"))
    weights.unlink()
    return c.sample(prior=prior)


def _prior_unknown_scheduler(c: Ctx):
    prior = c.prior_copy()
    cfg_file = prior / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["_class_name"] = "FooScheduler"
    cfg_file.write_text(json.dumps(cfg))
    return c.sample(prior=prior)


def _weights_truncated(c: Ctx):
    from safetensors.torch import save_file

    from tests.conftest import make_subject

    path = c.tmp / "w.safetensors"
    save_file(make_subject().state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:-40])
    return c.sample("--weights", str(path))


def _weights_pickle_object(c: Ctx):
    path = c.tmp / "w.pt"
    torch.save({"conv1.weight": CreatesFile(c.marker)}, path)
    return c.sample("--weights", str(path))


def _sae_on_conv(c: Ctx):
    from fiber_plugins.adapters.sae import SparseAutoencoder

    folder = SparseAutoencoder(8, 16).save(c.tmp / "sae")
    return c.sample("--target", "sae:conv1:feature=0", "--sae", str(folder))


# ---------------------------------------------------------------------------- CLI rows

P = pytest.param
CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")

CLI_ROWS = [
    # --out
    P(lambda c: c.sample(out=c.write("run", "a file")), ["is a file"], id="out-is-a-file"),
    P(
        lambda c: c.sample(out=c.write("afile", "x") / "run"),
        ["is a file", "afile"],
        id="out-under-a-file",
    ),
    P(_out_unwritable, ["not writable", "locked"], id="out-unwritable"),
    P(
        lambda c: (c.earlier(), c.sample())[1],
        ["earlier complete run", "--overwrite"],  # a finished run: nothing to --resume
        id="out-holds-earlier-run",
    ),
    P(_nonempty_no_run, ["not empty", "notes.txt"], id="out-nonempty-no-run-overwrite"),
    P(
        lambda c: (c.earlier(), c.sample("--resume", "--overwrite"))[1],
        ["overwrite", "resume", "not both"],
        id="resume-and-overwrite",
    ),
    # settings
    P(lambda c: c.sample("--guidance", "nan"), ["--guidance", "'nan'"], id="guidance-nan"),
    P(lambda c: c.sample("--kappa", "nan"), ["--kappa", "'nan'"], id="kappa-nan"),
    P(lambda c: c.sample("--guidance", "inf"), ["--guidance", "'inf'"], id="guidance-inf"),
    P(lambda c: c.sample("--lr", "nan", "nan"), ["--lr", "'nan'"], id="lr-nan"),
    P(lambda c: c.sample("--eta", "2"), ["eta", "2"], id="eta-2"),
    P(lambda c: c.sample("-n", "0"), ["-n", "'0'"], id="n-0"),
    P(lambda c: c.sample("-n", "2.5"), ["-n", "'2.5'"], id="n-2.5"),
    P(lambda c: c.sample("--steps", "-1"), ["--steps", "'-1'"], id="steps-negative"),
    P(lambda c: c.sample("--inner-steps", "-1"), ["--inner-steps", "'-1'"], id="inner-steps-neg"),
    P(lambda c: c.sample("--batch-size", "0"), ["--batch-size", "'0'"], id="batch-size-0"),
    P(lambda c: c.sample("--seed", "-1"), ["--seed", "'-1'"], id="seed-negative"),
    P(lambda c: c.sample("--interval", "0.8", "0.2"), ["interval", "0.8", "0.2"], id="interval"),
    P(lambda c: c.sample("--guidance", "-1"), ["guidance", "-1"], id="guidance-negative"),
    P(lambda c: c.sample("--final-guidance", "-2"), ["guidance", "-2"], id="final-guidance-neg"),
    P(lambda c: c.sample("--lr", "-1", "0.01"), ["lr", "-1"], id="lr-negative"),
    P(lambda c: c.sample("--tau", "-1"), ["tau", "-1"], id="tau-negative"),
    # devices
    P(lambda c: c.sample("--device", "tpu9"), ["'tpu9'"], id="device-tpu9"),
    P(
        lambda c: c.sample("--device", "cuda"),
        ["'cuda'", "not available"],
        id="device-cuda",
        marks=CUDA,
    ),
    # references and target vectors
    P(
        lambda c: c.sample("--reference", str(c.tmp / "missing.png"), ref=False),
        ["missing.png", "does not exist"],
        id="reference-missing",
    ),
    P(
        lambda c: c.sample("--reference", str(c.write("text.png", "hello")), ref=False),
        ["text.png", "cannot read"],
        id="reference-text-as-png",
    ),
    P(
        lambda c: c.sample("--reference", str(c.write("empty.png", b"")), ref=False),
        ["empty.png", "cannot read"],
        id="reference-empty-file",
    ),
    P(
        lambda c: c.sample("--reference", str(c.folder("imgs")), ref=False),
        ["imgs", ("directory", "folder", "not a file")],
        id="reference-is-a-folder",
    ),
    P(
        lambda c: c.sample("--target-vector", str(c.write("v.npy", b"")), ref=True),
        ["--reference", "--target-vector"],
        id="reference-and-target-vector",
    ),
    P(lambda c: c.sample(ref=False), ["--reference", "--target-vector"], id="no-reference"),
    P(
        lambda c: c.sample("--target-vector", str(c.write("vec.txt", "1 2 3")), ref=False),
        ["vec.txt", ".safetensors"],
        id="target-vector-txt",
    ),
    P(_pickle_pt, ["vec.pt", "pickle"], id="target-vector-pickle-pt"),
    P(_raw_pickle_pt, ["vec.pt", "pickle"], id="target-vector-raw-pickle"),
    P(_pickle_npy, ["vec.npy", "pickle"], id="target-vector-pickle-npy"),
    P(
        lambda c: _vector_npy(c, np.array([0.0, np.nan, 0, 0, 0, 0], np.float32)),
        ["nan", "finite"],
        id="target-vector-nan",
    ),
    P(_vector_wrong_width, ["5", "6"], id="target-vector-wrong-width"),
    P(_vector_two_tensors, ["vec.safetensors", "2 tensors (a, b)"], id="target-vector-two"),
    P(
        lambda c: _vector_npy(c, np.zeros((2, 3, 6), np.float32)),
        ["(2, 3, 6)", "(6,)"],
        id="target-vector-3d",
    ),
    P(
        lambda c: _vector_npy(c, np.ones(6, bool)),
        ["vec.npy", "bool"],
        id="target-vector-bool",
    ),
    P(
        lambda c: c.sample("--target-vector", str(c.folder("vecs")), ref=False),
        ["vecs", ("directory", "folder", "not a file")],
        id="target-vector-is-a-folder",
    ),
    P(
        lambda c: c.sample("--target-vector", str(c.tmp / "nope.npy"), ref=False),
        ["nope.npy", "does not exist"],
        id="target-vector-missing",
    ),
    # targets
    P(
        lambda c: c.sample("--target", "layer:nonexistent"),
        ["'nonexistent'"],
        id="target-unknown-layer",
    ),
    P(lambda c: c.sample("--target", "layer:conv1:99"), ["99", "8"], id="target-channel-range"),
    P(
        lambda c: c.sample("--target", "foo:bar"),
        ["'foo:bar'", "valid forms"],
        id="target-unknown-form",
    ),
    P(
        lambda c: c.sample("--target", "layer:unused", subject=f"{HERE}:make_unused_layer_subject"),
        ["'unused'", "not called"],
        id="target-layer-never-called",
    ),
    P(
        lambda c: c.sample("--target", "layer:act:0", subject=f"{HERE}:make_dead_channel_subject"),
        ["inactive"],
        id="target-unit-inactive",
    ),
    P(
        lambda c: c.sample("--target", "sae:conv1:feature=0"),
        ["--sae"],
        id="target-sae-without-sae",
    ),
    P(_sae_on_conv, ["conv1", "token"], id="target-sae-on-conv-map"),
    P(
        lambda c: c.sample(subject=f"{HERE}:make_mnist_linear_subject"),
        ["3x16x16", "Preprocess"],
        id="subject-input-size-mismatch",
    ),
    # priors
    P(
        lambda c: c.sample(prior="some/missing/path"),
        ["some/missing/path", "does not exist"],
        id="prior-missing-path",
    ),
    P(lambda c: c.sample(prior=c.write("prior.txt", "x")), ["is a file"], id="prior-is-a-file"),
    P(_prior_truncated, ["truncated"], id="prior-truncated-safetensors"),
    P(_prior_pickle_bin, ["pickle", ".bin"], id="prior-pickle-bin"),
    P(_prior_unknown_scheduler, ["FooScheduler"], id="prior-unknown-scheduler"),
    P(
        lambda c: c.sample(prior="zoo:no-such-prior"),
        ["no-such-prior"],
        id="prior-unknown-zoo",
    ),
    # subject weights
    P(
        lambda c: c.sample(
            "--weights", str(c.tmp / "w.safetensors"), subject="zoo:color-mnist-classifier"
        ),
        ["--weights", "zoo"],
        id="weights-with-zoo-subject",
    ),
    P(
        lambda c: c.sample("--weights", str(c.tmp / "w.safetensors")),
        ["w.safetensors", "does not exist"],
        id="weights-missing",
    ),
    P(_weights_truncated, ["w.safetensors", "truncated"], id="weights-truncated"),
    P(_weights_pickle_object, ["w.pt", "pickle"], id="weights-pickle-object"),
    P(
        lambda c: c.sample("--weights", str(c.write("w.txt", "x"))),
        ["w.txt", ".safetensors"],
        id="weights-txt",
    ),
    P(
        lambda c: c.sample(subject="zoo:no-such-model"),
        ["no-such-model"],
        id="subject-unknown-zoo",
    ),
    # other commands
    P(
        lambda c: ["targets", SUBJECT, "--input-size", "3", "0", "0"],
        ["--input-size", "3 0 0"],
        id="targets-input-size-zero",
    ),
    P(
        lambda c: ["targets", SUBJECT, "--input-size", "3", "16"],
        ["--input-size", "3 16"],
        id="targets-input-size-two",
    ),
    P(
        lambda c: ["targets", "zoo:color-mnist-classifier", "--input-size", "1", "32", "32"],
        ["forward pass fails on an input of shape (1, 32, 32)", "3 channels", "--input-size"],
        id="targets-wrong-channels",
    ),
    P(
        lambda c: ["targets", "onnx:model", "--input-size", "3", "16", "16"],
        ["'onnx:model'", "valid forms"],
        id="targets-unknown-subject-form",
    ),
    P(
        lambda c: ["bench", "color-mnist", "--references", "0", "--out", str(c.out)],
        ["--references", "'0'"],
        id="bench-references-0",
    ),
    P(
        lambda c: ["bench", "color-mnist", "--sets", "0", "--out", str(c.out)],
        ["--sets", "'0'"],
        id="bench-sets-0",
    ),
    P(
        lambda c: [
            "bench",
            "color-mnist",
            "--out",
            str(c.write("bench.txt", "x")),
            "--references",
            "1",
            "--samples",
            "1",
            "--steps",
            "1",
            "--methods",
            "unguided",
            "--device",
            "cpu",
        ],
        ["bench.txt", "is a file"],
        id="bench-out-is-a-file",
    ),
    P(
        lambda c: ["train", "classifier", "--steps", "-1", "--out", str(c.out)],
        ["--steps", "'-1'"],
        id="train-steps-negative",
    ),
    P(
        lambda c: ["train", "classifier", "--steps", "1", "--device", "cpu"],
        ["--out", "--into-package"],
        id="train-without-out",
    ),
    P(
        lambda c: ["train", "conditional", "--fiber-weight", "-1", "--out", str(c.out)],
        ["--fiber-weight", "-1"],
        id="train-fiber-weight-negative",
    ),
    P(
        lambda c: ["train", "prior", "--fiber-weight", "0.1", "--out", str(c.out)],
        ["--fiber-weight", "train conditional"],
        id="train-prior-fiber-weight",
    ),
    P(
        lambda c: ["train", "classifier", "--out", str(c.write("model.txt", "x"))],
        ["model.txt", "is a file"],
        id="train-out-is-a-file",
    ),
    P(
        lambda c: ["train", "classifier", "--out", str(c.write("run/notes.txt", "x").parent)],
        ["not empty", "--overwrite"],
        id="train-out-not-empty",
    ),
    P(
        lambda c: ["demo", "--out", str(c.write("demo.txt", "x")), "--device", "cpu"],
        ["demo.txt", "is a file"],
        id="demo-out-is-a-file",
    ),
    P(
        lambda c: ["report", str(c.write("empty/keep.txt", "x").parent)],
        ["empty", "not a run folder"],
        id="report-not-a-run",
    ),
    P(
        lambda c: ["report", str(c.tmp / "nowhere")],
        ["nowhere"],
        id="report-missing-folder",
    ),
]


def missing_words(words, text: str) -> list:
    """The key words (a tuple: any one of them) that ``text`` lacks, case-insensitively."""
    text = text.lower()
    return [
        w
        for w in words
        if not any(v.lower() in text for v in (w if isinstance(w, tuple) else (w,)))
    ]


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse
        return exit_.code


@pytest.mark.parametrize("build, words", CLI_ROWS)
def test_cli_bad_input(build, words, pixel_prior_dir, earlier_run, tmp_path, monkeypatch, capsys):
    ctx = Ctx(tmp_path, pixel_prior_dir, earlier_run, monkeypatch)
    argv = build(ctx)
    before, assets_before = snapshot(tmp_path), asset_times()
    prior_before = snapshot(pixel_prior_dir)
    capsys.readouterr()
    code = run_cli(argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2, f"exit code {code}; stderr: {err[-800:]!r}"
    assert "Traceback" not in err, err[-2000:]
    assert len(lines) == 1, f"{len(lines)} lines on stderr: {err[-800:]!r}"
    line = lines[0]
    assert line.startswith("fiber-plugins") and "error:" in line, line
    assert not missing_words(words, line), f"{missing_words(words, line)} not in {line!r}"
    if "inactive" in words:  # its own message, not the "no gradient path" one
        assert "detach" not in line, line
    # nothing created, changed or removed: no --out, no pickle side effect, earlier runs intact
    assert not ctx.marker.exists(), "a pickle in the input was executed"
    after = snapshot(tmp_path)
    assert sorted(after) == sorted(before), f"files changed: {set(after) ^ set(before)}"
    changed = [k for k in before if before[k] != after[k]]
    assert not changed, f"bytes changed: {changed}"
    assert snapshot(pixel_prior_dir) == prior_before
    assert asset_times() == assets_before, "the package's assets were written"


# ---------------------------------------------------------------------------- Python API rows


class Api:
    """What a Python row calls with; its files (``out.txt``, an earlier run) exist beforehand."""

    def __init__(self, prior, prior_dir: Path, subject, tmp: Path, earlier: Path):
        self.prior, self.prior_dir, self.subject, self.tmp = prior, prior_dir, subject, tmp
        self.ref = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
        self.file = tmp / "out.txt"
        self.file.write_text("x")
        self.earlier = shutil.copytree(earlier, tmp / "earlier")

    def sampler(self, objective=None):
        objective = objective or fp.FiberObjective(self.subject)
        return fp.NDTMSampler(self.prior, objective, fp.NDTMConfig(num_steps=3, inner_steps=1))

    def sample(self, objective=None, **kw):
        kw = {"references": self.ref, "n": 1, "progress": False, **kw}
        return self.sampler(objective).sample(**kw)


def _sae_conv(a: Api):
    from fiber_plugins.adapters.sae import SparseAutoencoder, sae_objective

    # conv1 has 8 channels = the SAE's d_in: width-checking alone would accept the map
    return a.sample(sae_objective(a.subject, "conv1", SparseAutoencoder(8, 16)))


def _inactive(a: Api):
    obj = fp.FiberObjective(
        make_dead_channel_subject(), layer="act", index=0, reduction="spatial_mean"
    )
    return a.sample(obj)


def _shape_mismatch(a: Api):
    return a.sample(fp.FiberObjective(make_mnist_linear_subject()))


V, T = ValueError, TypeError
API_ROWS = [
    P(lambda a: fp.NDTMConfig(num_steps=2.5), (V, T), ["num_steps", "2.5"], id="cfg-steps-2.5"),
    P(lambda a: fp.NDTMConfig(guidance=True), (T,), ["guidance", "True"], id="cfg-guidance-bool"),
    P(lambda a: fp.NDTMConfig(guidance=float("nan")), (V,), ["guidance", "nan"], id="cfg-guid-nan"),
    P(lambda a: fp.NDTMConfig(eta=2.0), (V,), ["eta", "2"], id="cfg-eta-2"),
    P(lambda a: fp.NDTMConfig(kappa=-1.0), (V,), ["kappa", "-1"], id="cfg-kappa-negative"),
    P(
        lambda a: fp.GuidanceSchedule(strength=float("inf")),
        (V,),
        ["strength", "inf"],
        id="schedule-strength-inf",
    ),
    P(lambda a: a.sample(n=0), (V,), ["n", "0"], id="sample-n-0"),
    P(lambda a: a.sample(n=1.5), (V, T), ["n", "1.5"], id="sample-n-1.5"),
    P(lambda a: a.sample(batch_size=-1), (V,), ["batch_size", "-1"], id="sample-batch-size-neg"),
    P(lambda a: a.sample(seed=-1), (V,), ["seed", "-1"], id="sample-seed-negative"),
    P(
        lambda a: a.sample(references=np.random.default_rng(0).random((16, 16, 3)) * 255),
        (V,),
        ["[0, 1]", "255"],
        id="sample-ref-array-0-255",
    ),
    P(
        lambda a: a.sample(references=torch.rand(16, 16, 3)),
        (V,),
        ["HWC", "permute"],
        id="sample-ref-hwc-tensor",
    ),
    P(lambda a: a.sample(out=a.file), (V,), ["out.txt", "is a file"], id="sample-out-is-a-file"),
    P(
        lambda a: a.sample(out=a.earlier),
        (V,),
        ["earlier complete run", "overwrite=True"],
        id="sample-out-holds-earlier-run",
    ),
    P(
        lambda a: a.sample(out=a.earlier, resume=True, overwrite=True),
        (V,),
        ["overwrite", "resume"],
        id="sample-resume-and-overwrite",
    ),
    P(lambda a: a.sample(resume=True), (V,), ["resume", "out="], id="sample-resume-without-out"),
    P(
        lambda a: a.sample(references=None, targets=torch.tensor([0.0, float("nan"), 0, 0, 0, 0])),
        (V,),
        ["nan"],
        id="sample-targets-nan",
    ),
    P(
        lambda a: a.sample(references=None, targets=torch.zeros(5)),
        (V,),
        ["5", "6"],
        id="sample-targets-wrong-width",
    ),
    P(
        lambda a: a.sample(references=a.ref, targets=torch.zeros(6)),
        (V,),
        ["references", "targets"],
        id="sample-references-and-targets",
    ),
    P(
        lambda a: fp.load_prior("some/missing/path"),
        (FileNotFoundError,),
        ["some/missing/path", "does not exist"],
        id="load-prior-missing",
    ),
    P(
        lambda a: fp.load_prior(a.prior_dir, device="tpu9"),
        (V,),
        ["'tpu9'"],
        id="load-prior-bad-device",
    ),
    P(
        lambda a: fp.FiberObjective(a.subject, layer="conv9"),
        (KeyError,),
        ["'conv9'"],
        id="objective-unknown-layer",
    ),
    P(_sae_conv, (V,), ["conv1", "token"], id="sae-on-conv-map-width-equal"),
    P(_inactive, (V,), ["inactive"], id="unit-inactive-at-reference"),
    P(_shape_mismatch, (V,), ["16x16", "Preprocess"], id="subject-input-size-mismatch"),
]


@pytest.mark.parametrize("call, bases, words", API_ROWS)
def test_api_bad_input(
    call, bases, words, pixel_prior, pixel_prior_dir, subject, earlier_run, tmp_path
):
    api = Api(pixel_prior, pixel_prior_dir, subject, tmp_path, earlier_run)
    before = snapshot(tmp_path)
    try:
        value = call(api)
    except UserError as err:
        caught = err
    except Exception as err:  # noqa: BLE001 - the report names what was raised instead
        first = (str(err).strip().splitlines() or [""])[0]
        pytest.fail(f"raised {type(err).__name__}, not a UserError: {first[:300]}")
    else:
        pytest.fail(f"no error; returned {type(value).__name__}")
    message = str(caught)
    assert isinstance(caught, bases), f"{type(caught).__mro__} is none of {bases}"
    assert "\n" not in message.strip(), message
    assert not missing_words(words, message), f"{missing_words(words, message)} not in {message!r}"
    if "inactive" in words:
        assert "detach" not in message, message
    assert snapshot(tmp_path) == before, "files were created, changed or removed"
