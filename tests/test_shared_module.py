"""One loaded MACE module given to several calculators: none of them changes it for the others."""

from __future__ import annotations

import numpy as np
import torch
from ase.build import bulk
from conftest import fixture_model, threaded_matches_sequential

from mace_ase.calculator import MACECalculator
from mace_ase.model.build import load_model


def test_calculators_of_different_dtypes_share_one_module():
    module = load_model(fixture_model("mp0a_small"), device="cpu", dtype="float64")
    atoms = bulk("NaCl", "rocksalt", a=5.6) * (2, 1, 1)
    atoms.rattle(0.05, seed=3)

    calc64 = MACECalculator(module, device="cpu", default_dtype="float64")
    energy64 = calc64.get_potential_energy(atoms.copy())
    calc32 = MACECalculator(module, device="cpu", default_dtype="float32")
    energy32 = calc32.get_potential_energy(atoms.copy())

    assert calc64.models[0] is module  # already float64 on the CPU: used as it is, not copied
    assert calc32.models[0] is not module
    assert all(p.dtype == torch.float64 for p in module.parameters())  # the caller's module is unchanged
    moved = atoms.copy()
    moved.rattle(0.01, seed=4)
    assert np.isfinite(calc64.get_potential_energy(moved))  # the first calculator still works (was: double != float)
    assert calc64.get_potential_energy(atoms.copy()) == energy64
    assert abs(energy32 - energy64) < 1e-4 * len(atoms)


def test_a_module_in_training_mode_is_not_switched_to_eval():
    module = load_model(fixture_model("mp0a_small"), device="cpu", dtype="float64").train()
    calculator = MACECalculator(module, device="cpu", default_dtype="float64")
    assert module.training and not calculator.models[0].training


def test_one_module_in_two_threads_matches_sequential_runs():
    """Calculators in two threads sharing one module: each call's exact-mode tables (whose storage the module keeps
    between calls) are its own thread's, so the results are those of sequential runs."""

    module = load_model(fixture_model("mpa0_density"), device="cpu", dtype="float64")
    structures = []
    for seed in range(2):
        atoms = bulk("NaCl", "rocksalt", a=5.6) * (2, 2, 1)
        atoms.rattle(0.1, seed=seed)
        structures.append(atoms)

    def run(atoms, out: list) -> None:
        calc = MACECalculator(module, device="cpu", default_dtype="float64")
        for step in range(4):
            moved = atoms.copy()
            moved.positions += 0.01 * step
            moved.calc = calc
            out.append((moved.get_potential_energy(), moved.get_forces().copy()))

    threaded_matches_sequential(run, [(atoms,) for atoms in structures], tolerance=1e-10)
