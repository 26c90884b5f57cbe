"""The zoo's one table: register_model fills it, list_models / load / asset_dir read it."""

from __future__ import annotations

import pytest

from fiber_plugins import zoo
from fiber_plugins.errors import MissingFileError
from fiber_plugins.zoo import _registry


@pytest.fixture
def scratch_entry():
    """Register a model for one test and take it out again."""
    names = []

    def add(name, **kw):
        names.append(name)
        return zoo.register_model(name, **kw)

    yield add
    for name in names:
        _registry._MODELS.pop(name, None)


def test_every_registered_model_is_listed_and_documented():
    names = zoo.list_models()
    assert names[:2] == ["color-mnist-prior", "color-mnist-prior-ood"] and len(names) == 9
    assert zoo.NAMES == tuple(names)
    for name in names:
        entry = zoo.model_entry(name)
        assert entry.summary and f"``{name}``" in zoo.__doc__
        assert entry.folder.startswith("color_mnist/") and entry.train


def test_a_registered_loader_is_what_load_calls(scratch_entry):
    @scratch_entry("scratch-model", folder="color_mnist/classifier", train="classifier")
    def scratch(folder, device):
        """a test model"""
        return ("loaded", folder.name, device)

    assert "scratch-model" in zoo.list_models()
    assert zoo.load("scratch-model", device="cpu") == ("loaded", "classifier", "cpu")
    with pytest.raises(ValueError, match="'scratch-model' is registered twice"):
        scratch_entry("scratch-model", folder="x", train="x")(scratch)


def test_missing_weights_name_the_training_command(scratch_entry):
    scratch_entry("scratch-subject", folder="color_mnist/not-there", train="autoencoder")(
        lambda folder, device: None
    )
    with pytest.raises(MissingFileError, match="fiber-plugins train autoencoder"):
        zoo.load("scratch-subject")


def test_unknown_name_lists_the_table():
    with pytest.raises(KeyError, match="closest: 'color-mnist-vit'.*available: \\['color-mnist"):
        zoo.load("color-mnist-vt")


def test_load_prior_loads_the_priors_and_refuses_the_subjects():
    """``--prior zoo:NAME`` and plans' ``prior.path`` go through ``zoo.load_prior``: each entry
    marked ``prior`` loads as a sampler prior; a subject is refused in one line naming the
    priors, before anything is loaded."""
    from fiber_plugins.errors import UserValueError
    from fiber_plugins.priors import ConditionalFiberModel, DiffusionPrior

    assert zoo.prior_names() == [
        "color-mnist-prior",
        "color-mnist-prior-ood",
        "color-mnist-conditional",
        "color-mnist-conditional-nofiber",
    ]
    for name in zoo.prior_names():
        assert isinstance(zoo.load_prior(name), (DiffusionPrior, ConditionalFiberModel))
    for name in set(zoo.list_models()) - set(zoo.prior_names()):
        with pytest.raises(UserValueError) as err:
            zoo.load_prior(name)
        message = str(err.value)
        assert f"shipped model {name!r} is not a prior" in message and "\n" not in message
        assert "shipped priors: color-mnist-prior, color-mnist-prior-ood" in message


def test_a_zoo_name_given_as_a_prior_folder_says_how_to_load_it():
    import fiber_plugins as fp
    from fiber_plugins.errors import UserValueError

    with pytest.raises(UserValueError, match=r"zoo\.load_prior\('color-mnist-prior'\)"):
        fp.load_prior("zoo:color-mnist-prior")


def test_targets_of_a_shipped_subject_need_no_input_size(capsys):
    """Each shipped subject records its input; ``fiber-plugins targets zoo:NAME`` uses it."""
    from fiber_plugins.cli.main import main

    sizes = {n: zoo.model_entry(n).input_size for n in zoo.list_models()}
    assert sizes["color-mnist-classifier"] == (3, 32, 32)
    assert sizes["color-mnist-autoencoder"] == (1, 32, 32)  # the grey digits
    assert all(sizes[n] is None for n in zoo.prior_names())
    for name, first in (
        ("color-mnist-classifier", "features.0"),
        ("color-mnist-autoencoder", "encoder.conv.0"),
    ):
        assert main(["targets", f"zoo:{name}"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert f"input {sizes[name]}" in lines[0] and lines[1].startswith(first)
