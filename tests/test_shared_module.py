"""One loaded MACE module given to several calculators: none of them changes it for the others."""

from __future__ import annotations

import threading

import numpy as np
import pytest
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


@pytest.mark.parametrize("radial", ["exact", "auto"])
def test_one_module_in_two_threads_matches_sequential_runs(radial: str):
    """Calculators in two threads sharing one module: each call's exact-mode tables (whose storage the module keeps
    between calls) are its own thread's, so the results are those of sequential runs; likewise with the default
    radial tables, which both threads read."""

    module = load_model(fixture_model("mpa0_density"), device="cpu", dtype="float64", radial=radial)
    structures = []
    for seed in range(2):
        atoms = bulk("NaCl", "rocksalt", a=5.6) * (2, 2, 1)
        atoms.rattle(0.1, seed=seed)
        structures.append(atoms)

    def run(atoms, out: list) -> None:
        calc = MACECalculator(module, device="cpu", default_dtype="float64", radial=radial)
        for step in range(4):
            moved = atoms.copy()
            moved.positions += 0.01 * step
            moved.calc = calc
            out.append((moved.get_potential_energy(), moved.get_forces().copy()))

    threaded_matches_sequential(run, [(atoms,) for atoms in structures], tolerance=1e-10)


def test_radial_tables_built_by_two_threads_at_once_are_built_once():
    """Two threads meeting the same new element pairs at the same moment: each pair gets one table (a lock), and
    the answers are those of a module that built them alone."""
    structures = []
    for seed in range(2):
        atoms = bulk("NaCl", "rocksalt", a=5.6) * (2, 2, 1)
        atoms.rattle(0.1, seed=seed)
        structures.append(atoms)
    alone = MACECalculator(load_model(fixture_model("mpa0_density"), device="cpu", dtype="float64"), device="cpu")
    expected = [alone.get_potential_energy(atoms.copy()) for atoms in structures]
    module = load_model(fixture_model("mpa0_density"), device="cpu", dtype="float64")
    start = threading.Barrier(2)
    energies: dict = {}

    def run(index: int) -> None:
        calc = MACECalculator(module, device="cpu", default_dtype="float64")
        start.wait()
        energies[index] = calc.get_potential_energy(structures[index].copy())

    threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    spline = module.radial_spline
    assert set(spline.slots) == {(11, 11), (11, 17), (17, 17)} and len(spline.intervals) == 3
    assert spline.tables[0].shape[0] == sum(spline.intervals)
    assert [energies[0], energies[1]] == pytest.approx(expected, abs=1e-12)
