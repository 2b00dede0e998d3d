"""Tests on the shipped emt-demo model (models/emt-demo.model, trained by mace-torch's mace_run_train on EMT data).

* our calculator equals mace-torch on this file (answers stored in tests/fixtures/emt_demo_reference.json by
  models/emt_demo/evaluate.py);
* on held-out structures it matches EMT within the recorded test-set errors;
* a variable-cell relaxation of fcc Cu gives EMT's lattice constant;
* float64 NVE conserves energy.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.filters import FrechetCellFilter
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS

from mace_ase.calculator import MACECalculator


MODEL = Path(__file__).resolve().parents[1] / "models" / "emt-demo.model"
REFERENCE = Path(__file__).parent / "fixtures" / "emt_demo_reference.json"

# How far from EMT a held-out structure may be, as a multiple of the recorded test-set RMSE. The errors of single
# structures scatter around the RMSE; 3x leaves room for that while still failing if the model (or our evaluation of
# it) is wrong by more than a typical test error -- a broken model is off by 10-100x.
ERROR_MARGIN = 3.0


@cache
def reference() -> dict:
    # both are committed: a missing one is a broken checkout, a failure (never a skip)
    assert MODEL.is_file() and REFERENCE.is_file(), f"{MODEL} or {REFERENCE} is missing; see models/README.md"
    return json.loads(REFERENCE.read_text())


@cache
def calculator():
    return MACECalculator(model_paths=str(MODEL), device="cpu", default_dtype="float64")


def reference_atoms(entry: dict) -> Atoms:
    return Atoms(numbers=entry["numbers"], positions=entry["positions"], cell=entry["cell"], pbc=entry["pbc"])


def structure_ids() -> list[str]:
    if not REFERENCE.exists():
        return ["missing"]
    return [f"{i}-{s['config_type']}" for i, s in enumerate(json.loads(REFERENCE.read_text())["structures"])]


@pytest.fixture(params=range(len(structure_ids())), ids=structure_ids())
def entry(request) -> dict:
    return reference()["structures"][request.param]


def evaluate(atoms: Atoms) -> dict:
    atoms.calc = calculator()
    results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    results["energies"] = atoms.get_potential_energies()
    if atoms.pbc.all():
        results["stress"] = atoms.get_stress(voigt=True)
    return results


def test_equals_mace_torch(entry: dict) -> None:
    """Same file, same structure: our float64 answers equal mace-torch 0.3.16's to rounding."""
    atoms = reference_atoms(entry)
    ours, theirs = evaluate(atoms), entry["mace_torch"]
    n_atoms = len(atoms)
    assert abs(ours["energy"] - theirs["energy"]) / n_atoms <= 1e-9
    np.testing.assert_allclose(ours["forces"], theirs["forces"], rtol=0, atol=1e-8)
    np.testing.assert_allclose(ours["energies"], theirs["energies"], rtol=0, atol=1e-9)
    if "stress" in theirs:
        np.testing.assert_allclose(ours["stress"], theirs["stress"], rtol=0, atol=1e-9)
    else:
        assert "stress" not in ours


def test_matches_emt_within_recorded_errors(entry: dict) -> None:
    """On held-out structures the model reproduces EMT about as well as its recorded test-set errors say."""
    errors = reference()["test_errors"]
    atoms = reference_atoms(entry)
    ours, emt = evaluate(atoms), entry["emt"]
    energy_error = 1e3 * abs(ours["energy"] - emt["energy"]) / len(atoms)  # meV/atom
    force_rmse = 1e3 * np.sqrt(np.mean((ours["forces"] - np.asarray(emt["forces"])) ** 2))  # meV/Å
    assert energy_error <= ERROR_MARGIN * errors["energy_meV_per_atom"]["rmse"]
    assert force_rmse <= ERROR_MARGIN * errors["forces_meV_per_A"]["rmse"]
    if "stress" in emt:
        stress_rmse = 1e3 * np.sqrt(np.mean((ours["stress"] - np.asarray(emt["stress"])) ** 2))  # meV/Å³
        assert stress_rmse <= ERROR_MARGIN * errors["stress_meV_per_A3"]["rmse"]


def relaxed_fcc_lattice_constant(calc) -> float:
    """Relax cell and positions of a primitive fcc Cu cell started 3 % too large; return a = (4 V)^(1/3) in Å."""
    atoms = bulk("Cu", "fcc", a=3.70)
    atoms.calc = calc
    BFGS(FrechetCellFilter(atoms), logfile=None).run(fmax=1e-4, steps=200)
    return (4.0 * atoms.get_volume()) ** (1.0 / 3.0)


def test_relaxed_cu_lattice_constant_matches_emt() -> None:
    reference()
    a_emt = relaxed_fcc_lattice_constant(EMT())
    a_model = relaxed_fcc_lattice_constant(calculator())
    assert abs(a_model - a_emt) < 0.02, f"model a = {a_model:.4f} Å, EMT a = {a_emt:.4f} Å"


def cu_au_cell(seed: int = 3) -> Atoms:
    """32-atom random Cu16Au16 fcc cell (same recipe as models/emt_demo/evaluate.py)."""
    atoms = bulk("Cu", "fcc", a=3.82, cubic=True).repeat(2)
    rng = np.random.default_rng(seed)
    atoms.set_chemical_symbols(list(rng.permutation(["Cu"] * 16 + ["Au"] * 16)))
    return atoms


def test_nve_conserves_energy() -> None:
    """200 steps of 2 fs velocity Verlet from 300 K in float64: the total energy stays put.

    mace-torch on the same run drifts by about 1e-6 eV/atom and fluctuates by about 2e-5 eV/atom (see
    models/README.md); the bounds leave a factor of ~20 for other platforms while a wrong force (not the gradient
    of the energy) or a float32 evaluation would break them.
    """
    reference()
    atoms = cu_au_cell()
    atoms.calc = calculator()
    thermalize_momenta(atoms, 300.0, rng=np.random.default_rng(4))
    dyn = VelocityVerlet(atoms, timestep=2.0 * units.fs)
    totals = [atoms.get_total_energy()]
    for _ in range(200):
        dyn.run(1)
        totals.append(atoms.get_total_energy())
    totals = (np.array(totals) - totals[0]) / len(atoms)  # eV/atom
    assert abs(totals[-1]) < 2e-5, f"drift {totals[-1]:.2e} eV/atom"
    assert np.max(np.abs(totals)) < 5e-4, f"largest deviation {np.max(np.abs(totals)):.2e} eV/atom"
