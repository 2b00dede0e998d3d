"""Parity with mace-torch 0.3.16 on random-weight models of every supported architecture.

The references were computed by mace-torch itself (tests/fixtures/make_fixtures.py, run in a separate virtualenv);
the tolerances are those of issue 2.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import fixture_model, references, structure
from mace_ase.calculator import MACECalculator

_CALCULATORS: dict = {}


def _calculator(model: str, dtype: str, head: str | None) -> MACECalculator:
    key = (model, dtype, head)
    if key not in _CALCULATORS:
        _CALCULATORS[key] = MACECalculator(model_paths=str(fixture_model(model)), device="cpu",
                                           default_dtype=dtype, head=head)
    return _CALCULATORS[key]


def _cases():
    try:
        data = references()
    except FileNotFoundError:
        return []
    return [
        pytest.param(model, case, id=f"{model}-{case['structure']}-{case['dtype']}-{case['head']}")
        for model, entry in data["models"].items()
        for case in entry.get("cases", [])
    ]


@pytest.mark.parametrize("model,case", _cases())
def test_matches_mace_torch(model: str, case: dict) -> None:
    atoms = structure(case["structure"])
    atoms.calc = _calculator(model, case["dtype"], case["head"])
    n = len(atoms)
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    ref_forces = np.array(case["forces"])
    if case["dtype"] == "float64":
        assert abs(energy - case["energy"]) / n <= 1e-9
        assert np.abs(forces - ref_forces).max(initial=0.0) <= 1e-8
        assert np.abs(atoms.calc.results["energies"] - case["energies"]).max() <= 1e-9
        assert np.abs(atoms.calc.results["node_energy"] - case["node_energy"]).max() <= 1e-9
        stress_tolerance = 1e-9
    else:
        assert abs(energy - case["energy"]) / n <= 2e-5
        assert np.abs(forces - ref_forces).max(initial=0.0) <= 2e-4 * (1 + np.abs(ref_forces).max(initial=0.0))
        energies_scale = 1 + np.abs(case["energies"]).max()
        assert np.abs(atoms.calc.results["energies"] - case["energies"]).max() <= 2e-5 * energies_scale
        stress_tolerance = 2e-5
    if case["stress"] is not None:
        assert np.abs(atoms.get_stress() - np.array(case["stress"])).max() <= stress_tolerance
    else:
        assert not atoms.pbc.all()


def test_every_architecture_is_covered() -> None:
    """The fixtures exercise each block type, Agnesi, ZBL, L=2, two heads and both dtypes."""
    data = references()
    models = data["models"]
    assert len(models) >= 7
    assert any(len(entry["heads"]) > 1 for entry in models.values())
    dtypes = {case["dtype"] for entry in models.values() for case in entry["cases"]}
    assert dtypes == {"float32", "float64"}
