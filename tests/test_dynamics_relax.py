"""relax() with ASE's EMT: positions, cell (FrechetCellFilter), pressure, symmetry."""

from __future__ import annotations

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from scipy.optimize import minimize_scalar

from mace_ase.dynamics import RelaxResult, relax


@pytest.fixture(scope="module")
def emt_cu_lattice_constant() -> float:
    """EMT's fcc Cu lattice constant, Å, by a 1-D minimisation independent of relax()."""

    def energy(a: float) -> float:
        atoms = bulk("Cu", "fcc", a=a)
        atoms.calc = EMT()
        return atoms.get_potential_energy()

    return float(minimize_scalar(energy, bracket=(3.5, 3.6, 3.7), tol=1e-10).x)  # 3.5898 Å


@pytest.mark.parametrize("optimizer", ["FIRE", "BFGS"])
def test_strained_cell_relaxes_to_emt_lattice_constant(optimizer, emt_cu_lattice_constant):
    atoms = bulk("Cu", "fcc", a=3.75, cubic=True)  # +4.5 % strain
    result = relax(atoms, EMT(), cell=True, optimizer=optimizer, fmax=1e-3)
    assert isinstance(result, RelaxResult) and result.converged
    assert np.abs(atoms.cell.lengths() - emt_cu_lattice_constant).max() < 0.005
    assert result.fmax < 1e-3 and result.energy == pytest.approx(atoms.get_potential_energy())


def test_fix_symmetry_keeps_cubic_cell(emt_cu_lattice_constant):
    atoms = bulk("Cu", "fcc", a=3.5, cubic=True) * (2, 1, 1)
    relax(atoms, EMT(), cell=True, fix_symmetry=True, fmax=1e-3)
    lengths = atoms.cell.lengths()
    np.testing.assert_allclose(lengths / [2, 1, 1], emt_cu_lattice_constant, atol=0.005)
    np.testing.assert_allclose(atoms.cell.angles(), 90.0, atol=1e-6)


def test_pressure_compresses_to_target():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    relax(atoms, EMT(), cell=True, pressure_gpa=10.0, fmax=1e-4)
    pressure = -atoms.get_stress()[:3].mean() / units.GPa
    assert pressure == pytest.approx(10.0, abs=0.05)


def test_positions_only_relax_vacancy(tmp_path):
    atoms = bulk("Cu", "fcc", a=3.59, cubic=True) * (2, 2, 2)
    del atoms[0]
    atoms.rattle(0.05, seed=1)
    cell = atoms.cell.copy()
    result = relax(atoms, EMT(), fmax=0.01, trajectory=tmp_path / "r.traj", logfile=tmp_path / "r.log")
    assert result.converged and result.steps > 0
    np.testing.assert_array_equal(atoms.cell, cell)
    assert (tmp_path / "r.traj").stat().st_size > 0 and "FIRE" in (tmp_path / "r.log").read_text()


def test_not_converged_is_reported():
    atoms = bulk("Cu", "fcc", a=3.59, cubic=True) * (2, 1, 1)
    atoms.rattle(0.1, seed=0)
    result = relax(atoms, EMT(), fmax=1e-6, steps=2)
    assert not result.converged and result.steps == 2 and "NOT converged" in repr(result)


def test_bad_arguments():
    atoms = bulk("Cu", "fcc", a=3.6)
    with pytest.raises(ValueError, match="available: FIRE"):
        relax(atoms, EMT(), optimizer="SGD")
    with pytest.raises(ValueError, match="cell=True"):
        relax(atoms, EMT(), pressure_gpa=1.0)
    with pytest.raises(ValueError, match="no calculator"):
        relax(bulk("Cu"))
