"""Parity with mace-torch on random-weight models of every supported architecture.

The references were computed by mace-torch itself, run in separate virtualenvs: mace-torch 0.3.16 for
``references.json`` (tests/fixtures/make_fixtures.py) and mace-torch 0.3.3 for ``references_v033.json``
(tests/fixtures/make_fixtures_v033.py: the file layout of the first MACE-MP-0 releases). The tolerances are those of
issue 2. ``check_case`` is shared with tests/test_default_dtype.py. Every case runs twice: in the default
``radial="auto"`` mode (on the CPU kernel: tabulated radial weights, :mod:`mace_ase.model.radial_spline`) and with
``radial="exact"`` (the radial MLP for every distinct edge): both must be inside the same bar.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms

from conftest import FIXTURES
from mace_ase.calculator import MACECalculator
from mace_ase.model import fused

REFERENCE_FILES = ("references.json", "references_v033.json")

_CALCULATORS: dict = {}


@cache
def reference_set(file_name: str) -> dict:
    """One committed reference file; a missing one is a failure (a broken checkout), never a skip."""
    path = FIXTURES / file_name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; regenerate it with its tests/fixtures/make_fixtures*.py script")
    return json.loads(path.read_text())


def model_path(file_name: str, model: str) -> Path:
    path = FIXTURES / reference_set(file_name)["models"][model]["file"]
    if not path.is_file():
        pytest.fail(f"fixture model {path} is missing; regenerate it with tests/fixtures/make_fixtures*.py")
    return path


def reference_atoms(file_name: str, name: str) -> Atoms:
    data = reference_set(file_name)["structures"][name]
    return Atoms(numbers=data["numbers"], positions=data["positions"], cell=data["cell"], pbc=data["pbc"])


def all_cases() -> list[tuple[str, str, dict]]:
    """(reference file, model, case) for every committed reference case."""
    return [
        (file_name, model, case)
        for file_name in REFERENCE_FILES
        for model, entry in reference_set(file_name)["models"].items()
        for case in entry.get("cases", [])
    ]


def _calculator(file_name: str, model: str, dtype: str, head: str | None, radial: str = "auto") -> MACECalculator:
    key = (file_name, model, dtype, head, radial)
    if key not in _CALCULATORS:
        _CALCULATORS[key] = MACECalculator(model_paths=str(model_path(file_name, model)), device="cpu",
                                           default_dtype=dtype, head=head, radial=radial)
    return _CALCULATORS[key]


def _cases():
    """Every committed reference case; no references (or none in a file) fails collection, never zero tests."""
    cases = [
        pytest.param(file_name, model, case, id=f"{model}-{case['structure']}-{case['dtype']}-{case['head']}")
        for file_name, model, case in all_cases()
    ]
    for file_name in REFERENCE_FILES:
        if not any(param.values[0] == file_name for param in cases):
            raise RuntimeError(f"tests/fixtures/{file_name} holds no parity cases; regenerate it with its "
                               "tests/fixtures/make_fixtures*.py script (in the mace-torch virtualenv)")
    return cases


def check_case(results: dict, case: dict, n_atoms: int, periodic: bool) -> None:
    """Assert that ``results`` (energy, forces, energies, node_energy, stress or None) match one reference case.

    float64: 1e-9 eV/atom, 1e-8 eV/A, 1e-9 eV/A^3; float32: 2e-5 eV/atom, 2e-4 eV/A relative to 1 + the largest
    reference value (issue 2).
    """
    energy, forces = results["energy"], np.asarray(results["forces"])
    ref_forces = np.array(case["forces"])
    energies = np.asarray(results["energies"])
    if case["dtype"] == "float64":
        assert abs(energy - case["energy"]) / n_atoms <= 1e-9
        assert np.abs(forces - ref_forces).max(initial=0.0) <= 1e-8
        assert np.abs(energies - case["energies"]).max() <= 1e-9
        assert np.abs(np.asarray(results["node_energy"]) - case["node_energy"]).max() <= 1e-9
        stress_tolerance = 1e-9
    else:
        assert abs(energy - case["energy"]) / n_atoms <= 2e-5
        assert np.abs(forces - ref_forces).max(initial=0.0) <= 2e-4 * (1 + np.abs(ref_forces).max(initial=0.0))
        energies_scale = 1 + np.abs(case["energies"]).max()
        assert np.abs(energies - case["energies"]).max() <= 2e-5 * energies_scale
        stress_tolerance = 2e-5
    if case["stress"] is not None:
        assert np.abs(np.asarray(results["stress"]) - np.array(case["stress"])).max() <= stress_tolerance
    else:
        assert not periodic


@pytest.mark.parametrize("radial", ["auto", "exact"])
@pytest.mark.parametrize("file_name,model,case", _cases())
def test_matches_mace_torch(file_name: str, model: str, case: dict, radial: str) -> None:
    """The default (tabulated radial weights on the CPU kernel) and the radial MLP for every edge."""
    atoms = reference_atoms(file_name, case["structure"])
    atoms.calc = _calculator(file_name, model, case["dtype"], case["head"], radial)
    tables = atoms.calc.models[0].use_radial_spline
    assert tables == (radial == "auto" and fused.load_kernel()[0] is not None)
    results = {
        "energy": atoms.get_potential_energy(),
        "forces": atoms.get_forces(),
        "energies": atoms.calc.results["energies"],
        "node_energy": atoms.calc.results["node_energy"],
        "stress": atoms.get_stress() if case["stress"] is not None else None,
    }
    check_case(results, case, len(atoms), bool(atoms.pbc.all()))


def test_every_architecture_is_covered() -> None:
    """The fixtures exercise each block type, Agnesi, ZBL, L=2, two heads and both dtypes."""
    data = reference_set("references.json")
    models = data["models"]
    assert len(models) >= 7
    assert any(len(entry["heads"]) > 1 for entry in models.values())
    dtypes = {case["dtype"] for entry in models.values() for case in entry["cases"]}
    assert dtypes == {"float32", "float64"}
    # ZBL inside its range for light and heavy pairs, in MP-0b, MPA-0 and OMAT-0 style models
    zbl_structures = {case["structure"] for name in ("mp0b_zbl89", "mpa0_zbl89", "omat0_zbl89")
                      for case in models[name]["cases"]}
    assert {"hh_030", "hh_045", "compressed_dimer", "uo_120", "al2_triclinic"} <= zbl_structures
    assert all(models[name]["pair_repulsion"] for name in ("mp0b_zbl89", "mpa0_zbl89", "omat0_zbl89"))


def test_old_files_use_the_simplified_linear_layout() -> None:
    """The mace-torch 0.3.3 fixtures really are in the old layout: for L >= 1 hidden features the interaction's
    linear reads the tensor-product output as simplified irreps (e.g. 16x0e where the product writes 8x0e+8x0e)."""
    from mace_ase.io.model_file import read_model_file
    from mace_ase.model.build import parse_irreps

    data = reference_set("references_v033.json")
    assert data["mace_torch_version"] == "0.3.3"
    assert {"mp0_small_v033", "mp0_medium_v033", "mp0_large_v033"} <= set(data["models"])
    for model in ("mp0_medium_v033", "mp0_large_v033"):
        interaction = read_model_file(model_path("references_v033.json", model)).root.module("interactions.1")
        written = parse_irreps(interaction.module("conv_tp").get("irreps_out"))
        read = parse_irreps(interaction.module("linear").get("irreps_in"))
        assert len(read) < len(written)
        assert sum(mul * (2 * l + 1) for mul, l, _ in read) == sum(mul * (2 * l + 1) for mul, l, _ in written)


@pytest.mark.parametrize("model", ["mp0_small_v033", "mp0_medium_v033", "mp0_large_v033"])
def test_models_info_shows_old_files(model: str, capsys) -> None:
    """``mace-ase models info FILE`` summarises the files written by mace-torch 0.3.3."""
    import argparse

    from mace_ase.cli import models as models_cli

    parser = argparse.ArgumentParser(prog="mace-ase")
    models_cli.register(parser.add_subparsers())
    args = parser.parse_args(["models", "info", str(model_path("references_v033.json", model))])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    entry = reference_set("references_v033.json")["models"][model]
    assert "RealAgnosticResidualInteractionBlock" in out and entry["hidden_irreps"] in out
