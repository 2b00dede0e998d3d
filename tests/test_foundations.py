"""mace_mp / mace_off / mace_omol: model resolution, defaults, argument checks (no network, fake calculator)."""

from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path

import pytest
from conftest import place_as_cached

from mace_ase import foundations
from mace_ase.io import catalogue, registry


class FakeCalculator:
    """Stands in for mace_ase.calculator.MACECalculator: records how it was built."""

    def __init__(self, model_paths, device=None, default_dtype="float64", head=None, **kwargs):
        self.model_paths, self.device, self.default_dtype, self.head, self.kwargs = (
            model_paths, device, default_dtype, head, kwargs)
        self.parameters = {}


@pytest.fixture(autouse=True)
def environment(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("MACE_ASE_CACHE_DIR", str(cache))
    monkeypatch.setenv("MACE_ASE_OFFLINE", "1")  # never the network
    for name in ("MACE_ASE_MIRROR", "MACE_ASE_CACHE_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(registry, "_verified", set())
    monkeypatch.setitem(sys.modules, "mace_ase.calculator", types.SimpleNamespace(MACECalculator=FakeCalculator))
    return cache




def test_mace_mp_default_model_from_cache(environment, model_file):
    cached = place_as_cached(environment, "medium-mpa-0", model_file)
    with pytest.raises(registry.IntegrityError):  # the fixture is not the real MPA-0 file: its git SHA-1 differs
        foundations.mace_mp()
    assert not cached.exists()  # and the impostor was removed


def test_mace_mp_by_name_uses_cache_and_defaults(environment, model_file):
    cached = place_as_cached(environment, "small", model_file)
    calc = foundations.mace_mp("small", device="cpu")
    assert calc.model_paths == str(cached) and calc.device == "cpu" and calc.default_dtype == "float32"
    assert calc.head is None and calc.parameters["model_name"] == "small"


def test_device_none_picks_cuda_only_when_available(model_file):
    import torch

    calc = foundations.mace_mp(model_file)
    assert calc.device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_local_path_and_extra_kwargs(model_file):
    calc = foundations.mace_mp(str(model_file), device="cpu", default_dtype="float64", head="h", enable_x=True)
    assert calc.model_paths == str(model_file) and calc.default_dtype == "float64" and calc.head == "h"
    assert calc.kwargs == {"enable_x": True} and calc.parameters["model_name"] == str(model_file)


def test_mace_off_alias_and_offline_message(environment):
    with pytest.raises(registry.OfflineError, match="MACE-OFF23_medium.model") as info:
        foundations.mace_off()
    assert str(environment / "MACE-OFF23_medium.model") in str(info.value)
    with pytest.raises(registry.OfflineError, match="MACE-OFF23_large.model"):
        foundations.mace_off("large", device="cpu")


def test_mace_omol_is_refused_before_the_cache_is_looked_at(environment, model_file):
    place_as_cached(environment, "omol-0-extra-large", model_file)  # even a cached copy is not used
    with pytest.raises(registry.UnsupportedModelError, match="mace-ase cannot run it: its charge/spin"):
        foundations.mace_omol(device="cpu")


def test_mace_omol_forces_its_head_on_a_file(model_file):
    calc = foundations.mace_omol(model_file, device="cpu")
    assert calc.head == "omol" and calc.default_dtype == "float64"


def test_default_dtype_comes_from_the_catalogue(environment, model_file):
    place_as_cached(environment, "small", model_file)
    place_as_cached(environment, "off23-small", model_file)
    assert foundations.mace_mp("small", device="cpu").default_dtype == registry.lookup("small").dtype == "float32"
    assert foundations.mace_mp("emt-demo", device="cpu").default_dtype == "float32"  # as every mace_mp model
    assert foundations.mace_mp(model_file, device="cpu").default_dtype == "float32"  # a path: the default's
    assert foundations.mace_off(model_file, device="cpu").default_dtype == "float64"
    assert foundations.mace_anicc(model_file, device="cpu").default_dtype == "float64"
    assert foundations.mace_mp("small", device="cpu", default_dtype="float64").default_dtype == "float64"


def test_every_catalogue_family_has_a_function():
    assert set(foundations.FAMILY_FUNCTIONS) == set(catalogue.FAMILIES)
    for entry in registry.catalogue().values():
        function = foundations.function_for(entry)
        assert registry.lookup(entry.alias or entry.name, foundations.FUNCTION_FAMILIES[function]) is entry


def test_errors_before_any_download():
    with pytest.raises(TypeError, match="dispersion must be True or False"):
        foundations.mace_mp(dispersion="False")
    with pytest.raises(ValueError, match="default_dtype"):
        foundations.mace_mp(default_dtype="float16")
    with pytest.raises(registry.UnknownModelError, match="Available: .*medium-mpa-0"):
        foundations.mace_mp("medium-mpa-9")
    with pytest.raises(registry.UnknownModelError, match=r"use mace_off\(model='off24-medium'\)"):
        foundations.mace_mp("off24-medium")
    with pytest.raises(FileNotFoundError, match="No model file at"):
        foundations.mace_mp("./no/such.model")


def test_dispersion_passes_options_to_add_d3(environment, model_file, monkeypatch):
    calls = []

    def add_d3(calculator, **options):
        calls.append(options)
        return ("sum", calculator)

    monkeypatch.setitem(sys.modules, "mace_ase.dispersion", types.SimpleNamespace(add_d3=add_d3))
    result = foundations.mace_mp(model_file, device="cpu", dispersion=True, damping="zero", dispersion_cutoff=12.0)
    assert result[0] == "sum" and isinstance(result[1], FakeCalculator)
    assert calls == [{"damping": "zero", "xc": "pbe", "cutoff": 12.0}]


def test_default_change_warns_only_when_the_default_is_relied_on(environment, model_file, monkeypatch):
    place_as_cached(environment, "small", model_file)
    # pretend a later release changed mace_mp's default from 'medium' to 'small'
    monkeypatch.setitem(foundations.DEFAULT_MODELS, "mace_mp", (("0.1.0", "medium"), ("0.2.0", "small")))
    monkeypatch.setitem(foundations._DEFAULT, "mace_mp", foundations._DefaultModel("small"))
    default = foundations._DEFAULT["mace_mp"]
    expected = r"uses the model 'small' by default since mace-ase 0.2.0 \(before: 'medium'\)"
    with pytest.warns(UserWarning, match=expected):
        path, entry = foundations.resolve_model("mace_mp", ["mp"], default)
    assert entry.name == "small"
    with pytest.warns(UserWarning, match=expected):  # model=None also means "the default" (as in mace-torch)
        assert foundations.resolve_model("mace_mp", ["mp"], None)[1].name == "small"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        foundations.resolve_model("mace_mp", ["mp"], "small")  # an explicit choice: no warning


def test_current_defaults_are_explicit_and_do_not_warn():
    assert foundations.DEFAULT_MODELS["mace_mp"][-1][1] == "medium-mpa-0"
    assert foundations.mace_mp.__defaults__[0] == "medium-mpa-0"
    assert foundations.mace_off.__defaults__[0] == "medium"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        foundations._warn_if_default_changed("mace_mp")


def test_real_calculator_on_fixture(model_file, monkeypatch):
    """End to end: mace_mp(path) gives exactly what MACECalculator on that file gives."""
    monkeypatch.delitem(sys.modules, "mace_ase.calculator")  # the autouse environment installs a fake calculator
    from ase.build import bulk

    from mace_ase.calculator import MACECalculator

    atoms = bulk("Cu", "fcc", a=3.6)
    atoms.rattle(0.05, seed=2)
    atoms.calc = foundations.mace_mp(model_file, device="cpu", default_dtype="float64")
    energy = atoms.get_potential_energy()
    assert isinstance(atoms.calc, MACECalculator) and atoms.calc.dtype.is_floating_point
    atoms.calc = MACECalculator(model_paths=str(model_file), device="cpu", default_dtype="float64")
    assert atoms.get_potential_energy() == energy
