"""The one training loop: schedule, record, gradients only into the trained parameters,
non-finite losses refused, EMA."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fiber_plugins.training import TrainingRecord, cosine_lr, train_loop


def test_cosine_lr_warms_up_then_decays_to_zero():
    assert cosine_lr(0, 1000, 1.0) == pytest.approx(0.01)
    assert cosine_lr(99, 1000, 1.0) == pytest.approx(1.0)
    assert cosine_lr(100, 1000, 1.0) == pytest.approx(1.0)
    assert cosine_lr(550, 1000, 1.0) == pytest.approx(0.5)
    assert cosine_lr(1000, 1000, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_the_loop_minimises_and_records_every_step():
    w = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    made, seen_lr = [], []

    class Recording(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    def step(i):
        seen_lr.append(made[0].param_groups[0]["lr"])
        loss = w.pow(2).sum()
        out = {"loss": loss}
        if i % 2 == 0:
            out["even"] = loss * 0 + i  # returned on some steps only
        return out

    record = train_loop(
        [w],
        step,
        steps=50,
        lr=0.1,
        optimizer=Recording,
        lr_schedule=lambda i, total, lr: lr * (total - i) / total,
        progress=False,
    )
    assert isinstance(record, TrainingRecord) and record.wall_time_s > 0
    assert len(record.logs["loss"]) == 50 and record.logs["loss"][-1] < 0.1 * record.logs["loss"][0]
    assert record.logs["even"] == [float(i) for i in range(0, 50, 2)]
    assert record.mean_last("even", 2) == 47.0 and record.mean_last("missing") is None
    assert seen_lr[:2] == [pytest.approx(0.1), pytest.approx(0.098)]
    assert w.grad is None  # gradients are cleared after every step


def test_gradients_reach_only_the_trained_parameters():
    frozen = torch.nn.Linear(2, 2)  # a subject inside the loss, with requires_grad left on
    w = torch.nn.Parameter(torch.ones(2))
    before = [p.detach().clone() for p in frozen.parameters()]
    train_loop([w], lambda i: {"loss": frozen(w).pow(2).sum()}, steps=3, lr=0.1, progress=False)
    assert all(p.grad is None for p in frozen.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, frozen.parameters()))


def test_a_non_finite_loss_is_refused_with_the_hint():
    w = torch.nn.Parameter(torch.ones(1))

    def step(i):
        return {"loss": w.sum() * (math.inf if i == 2 else 1.0)}

    with pytest.raises(FloatingPointError, match=r"inf at step 2; lower lr \(now 0.5\) or beta"):
        train_loop([w], step, steps=5, lr=0.5, nonfinite_hint="beta", progress=False)


def test_ema_weights_are_copied_in_at_the_end():
    pytest.importorskip("diffusers")

    def run(ema_decay):
        w = torch.nn.Parameter(torch.tensor([4.0]))
        train_loop(
            [w],
            lambda i: {"loss": w.pow(2).sum()},
            steps=30,
            lr=0.2,
            lr_schedule=None,
            optimizer=torch.optim.SGD,
            ema_decay=ema_decay,
            progress=False,
        )
        return float(w.detach())

    plain, averaged = run(None), run(0.9)
    assert abs(plain) < abs(averaged) < 4.0  # the average lags behind the last iterate


# ---------------------------------------------------------------------- checkpoint / resume
def _toy_run(folder, steps=12, stop_after=None, resume=True, every=4, seen=None, **changed):
    """A seeded toy regression with AdamW, the cosine schedule, EMA and a batch generator;
    ``stop_after`` interrupts it (an exception from ``step``) before that step; ``changed``
    replaces train_loop arguments."""
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    gen = torch.Generator().manual_seed(1)

    class Stop(Exception):
        pass

    def step(i):
        if stop_after is not None and i == stop_after:
            raise Stop
        x = torch.randn(16, 3, generator=gen)
        y = x.sum(1, keepdim=True) + 0.1 * torch.randn(16, 1)  # torch's global RNG too
        loss = (net(x) - y).pow(2).mean()
        return {"loss": loss, "odd": loss * 0 + i} if i % 2 else {"loss": loss}

    kw = dict(
        steps=steps,
        lr=0.01,
        clip_grad_norm=1.0,
        ema_decay=0.9,
        progress=False,
        checkpoint=folder,
        checkpoint_every=every,
        resume=resume,
        generators=[gen],
        on_checkpoint=(lambda done, w: seen.append(done)) if seen is not None else None,
    )
    kw.update(changed)
    try:
        record = train_loop(net.parameters(), step, **kw)
    except Stop:
        return None, None
    return record, [p.detach().clone() for p in net.parameters()]


def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path):
    whole, w_whole = _toy_run(tmp_path / "a")
    seen: list[int] = []
    assert _toy_run(tmp_path / "b", stop_after=6, seen=seen) == (None, None)
    assert seen == [4]  # the checkpoint after 4 steps; steps 5 and 6 are redone
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "state-4.safetensors",
        "state.json",
    ]
    resumed, w_resumed = _toy_run(tmp_path / "b", seen=seen)
    assert seen == [4, 8, 12]
    assert all(torch.equal(a, b) for a, b in zip(w_whole, w_resumed))
    assert resumed.logs == whole.logs and len(resumed.logs["loss"]) == 12
    # a finished checkpoint resumes to the same EMA weights without another step
    again, w_again = _toy_run(tmp_path / "b", seen=seen)
    assert seen == [4, 8, 12] and again.logs == whole.logs
    assert all(torch.equal(a, b) for a, b in zip(w_whole, w_again))
    # resume=False starts afresh (and ends where a fresh run ends)
    fresh, w_fresh = _toy_run(tmp_path / "b", resume=False)
    assert all(torch.equal(a, b) for a, b in zip(w_whole, w_fresh))


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_a_corrupt_or_foreign_checkpoint_is_refused_in_one_line(tmp_path):
    from fiber_plugins.errors import UserValueError

    folder = tmp_path / "ck"
    _toy_run(folder, steps=8)
    state = folder / "state.json"
    good = state.read_text()

    state.write_text(good[: len(good) // 2])  # truncated JSON
    with pytest.raises(UserValueError, match="not valid JSON") as err:
        _toy_run(folder, steps=8)
    assert "cannot be resumed" in _one_line(err)

    state.write_text(good)
    with pytest.raises(
        UserValueError, match=r"other settings \(steps: checkpoint 8, now 10\)"
    ) as err:
        _toy_run(folder, steps=10)
    _one_line(err)

    tensors = folder / "state-8.safetensors"
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])  # a truncated tensor file
    with pytest.raises(UserValueError, match="truncated or corrupt") as err:
        _toy_run(folder, steps=8)
    _one_line(err)

    tensors.unlink()
    with pytest.raises(UserValueError, match="tensor file 'state-8.safetensors' is missing") as err:
        _toy_run(folder, steps=8)
    _one_line(err)

    state.write_text('{"format": "something else"}')
    with pytest.raises(UserValueError, match="not a train_loop checkpoint") as err:
        _toy_run(folder, steps=8)
    _one_line(err)

    # a checkpoint of the first format recorded no recipe: its own reason, not a settings list
    state.write_text(good.replace("fiber_plugins.train_loop/2", "fiber_plugins.train_loop/1"))
    with pytest.raises(UserValueError, match=r"earlier fiber-plugins .*train_loop/1") as err:
        _toy_run(folder, steps=8)
    assert "start afresh" in _one_line(err) and "other settings" not in str(err.value)


def test_checkpoint_every_must_be_positive(tmp_path):
    w = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match="checkpoint_every must be >= 1"):
        train_loop(
            [w],
            lambda i: {"loss": w.sum()},
            steps=2,
            lr=0.1,
            progress=False,
            checkpoint=tmp_path,
            checkpoint_every=0,
        )


@pytest.mark.parametrize(
    "changed, named",
    [
        ({"lr": 0.02}, "lr: checkpoint 0.01, now 0.02"),
        ({"ema_decay": 0.5}, "ema_decay: checkpoint 0.9, now 0.5"),
        ({"ema_decay": None}, "ema_decay: checkpoint 0.9, now None"),
        ({"clip_grad_norm": None}, "clip_grad_norm: checkpoint 1.0, now None"),
        ({"weight_decay": 0.1}, "weight_decay: checkpoint 0.0, now 0.1"),
        ({"optimizer": torch.optim.Adam}, "optimizer: checkpoint 'AdamW', now 'Adam'"),
        ({"lr_schedule": None}, "lr_schedule: checkpoint 'cosine_lr', now None"),
        ({"generators": []}, "generators: checkpoint 1, now 0"),
        ({"recipe": {"batch": 16}}, "batch: checkpoint (not recorded), now 16"),
    ],
)
def test_a_resume_with_other_settings_names_each_with_both_values(tmp_path, changed, named):
    """Every setting of the loop and of the trainer's recipe is compared on resume; the refusal
    names each differing one with the checkpoint's value and the new one, before any step."""
    from fiber_plugins.errors import UserValueError

    folder = tmp_path / "ck"
    _toy_run(folder, steps=8)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(UserValueError, match="cannot be resumed") as err:
        _toy_run(folder, steps=8, **changed)
    assert named in _one_line(err) and "other settings" in str(err.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_the_recipe_is_compared_key_by_key(tmp_path):
    from fiber_plugins.errors import UserTypeError, UserValueError

    folder = tmp_path / "ck"
    recipe = {"batch_size": 16, "seed": 0, "arch": (8, 8), "objective": "flow"}
    _, w = _toy_run(folder, steps=8, recipe=recipe)
    # the same recipe (tuples come back from JSON as lists) resumes the finished run
    _, w_again = _toy_run(folder, steps=8, recipe=dict(recipe))
    assert all(torch.equal(a, b) for a, b in zip(w, w_again))
    with pytest.raises(UserValueError) as err:
        _toy_run(folder, steps=10, recipe={**recipe, "seed": 5, "objective": "epsilon"})
    text = _one_line(err)
    assert "(steps: checkpoint 8, now 10; seed: checkpoint 0, now 5; objective: " in text
    assert "objective: checkpoint 'flow', now 'epsilon')" in text
    with pytest.raises(UserValueError) as err:  # a checkpoint of another trainer, no recipe
        _toy_run(folder, steps=8)
    assert "batch_size: checkpoint 16, now (not given)" in _one_line(err)
    with pytest.raises(UserTypeError, match="recipe must hold JSON values.*shape \\(2,\\)"):
        _toy_run(tmp_path / "other", steps=8, recipe={"data": torch.zeros(2)})
    # numpy and torch scalars are the numbers they hold
    _toy_run(
        folder, steps=8, recipe={**recipe, "batch_size": torch.tensor(16), "seed": np.int64(0)}
    )
    # a checkpoint written before the settings were recorded: refused, naming what is missing
    state = folder / "state.json"
    meta = json.loads(state.read_text())
    for key in ("recipe", "ema_decay", "optimizer"):
        del meta["settings"][key]
    state.write_text(json.dumps(meta))
    with pytest.raises(UserValueError) as err:
        _toy_run(folder, steps=8, recipe=recipe)
    text = _one_line(err)
    assert "ema_decay: checkpoint (not recorded), now 0.9" in text
    assert "batch_size: checkpoint (not recorded), now 16" in text


def test_the_checkpoint_folder_is_checked_before_anything_is_written(tmp_path):
    """A file, a path under a file and a folder of other files are refused in one line, before
    a step runs and without writing anything; resume=True in a new or empty folder starts
    afresh; check_checkpoint(required=True) refuses a folder with nothing to resume."""
    from fiber_plugins.errors import UserValueError
    from fiber_plugins.training.loop import check_checkpoint

    png = tmp_path / "digit.png"
    png.write_bytes(b"not a folder")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    (run / "grid.png").write_bytes(b"png")
    for folder, message in [
        (png, f"checkpoint folder {str(png)!r} is a file; give a folder"),
        (
            png / "ck",
            f"cannot create checkpoint folder {str(png / 'ck')!r}: {str(png)!r} is a file",
        ),
        (run, "holds files that are not a training checkpoint (grid.png, run.json)"),
    ]:
        for resume in (True, False):
            with pytest.raises(UserValueError) as err:
                _toy_run(folder, steps=4, resume=resume)
            assert message in _one_line(err)
    assert png.read_bytes() == b"not a folder"
    assert sorted(p.name for p in run.iterdir()) == ["grid.png", "run.json"]

    new, empty = tmp_path / "new", tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"")  # hidden files do not count
    (empty / "state-2.safetensors.tmp").write_bytes(b"")  # an interrupted first save
    for folder in (new, empty):
        assert check_checkpoint(folder) is False
        with pytest.raises(UserValueError, match="nothing to resume") as err:
            check_checkpoint(folder, required=True)
        _one_line(err)
        record, _ = _toy_run(folder, steps=4, resume=True)  # continue if present: afresh here
        assert len(record.logs["loss"]) == 4
        assert check_checkpoint(folder, required=True) is True
    with pytest.raises(UserValueError, match="does not exist, so there is nothing to resume"):
        check_checkpoint(tmp_path / "none", required=True)
    assert not (tmp_path / "none").exists()
