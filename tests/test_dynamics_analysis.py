"""Equation of state, phonons (phonopy) and the Hessian, checked with ASE's EMT."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from conftest import fixture_model

from mace_ase.dynamics import equation_of_state
from mace_ase.hessian import finite_difference_hessian, hessian


def test_bulk_modulus_of_emt_copper(tmp_path):
    atoms = bulk("Cu", "fcc", a=3.5898)
    cell = atoms.cell.copy()
    result = equation_of_state(atoms, EMT())
    assert result.volumes.shape == result.energies.shape == (9,)
    assert result.v0 == pytest.approx(3.5898**3 / 4, rel=1e-3)
    assert 125 < result.bulk_modulus_gpa < 145  # EMT Cu: ~134 GPa (experiment 140 GPa)
    np.testing.assert_array_equal(atoms.cell, cell)  # input untouched
    result.plot(tmp_path / "eos.png")
    assert (tmp_path / "eos.png").stat().st_size > 0


def test_phonons_of_emt_copper(tmp_path):
    from mace_ase.dynamics import phonons  # phonopy and matplotlib: in the [test] extra, so always there in CI

    result = phonons(bulk("Cu", "fcc", a=3.5898), EMT(), supercell=(3, 3, 3), mesh=8, npoints=60,
                     plot=tmp_path / "phonons.png")
    assert result.band_frequencies_thz.shape == (60, 3)
    gamma = result.special_labels.index("G")
    np.testing.assert_allclose(result.band_frequencies_thz[0], 0.0, atol=0.05)  # acoustic modes at Γ
    assert gamma == 0
    assert result.band_frequencies_thz.min() > -0.05  # stable crystal: no imaginary modes
    assert 6.5 < result.band_frequencies_thz.max() < 9.0  # EMT Cu tops at ~8 THz (experiment 7.2 THz)
    assert result.dos.shape == result.dos_frequencies_thz.shape and result.dos.max() > 0
    assert (tmp_path / "phonons.png").stat().st_size > 0


def test_finite_difference_hessian_is_symmetric_and_translation_invariant():
    atoms = bulk("Cu", "fcc", a=3.59, cubic=True)
    atoms.rattle(0.02, seed=0)
    h = finite_difference_hessian(atoms, EMT())
    assert h.shape == (12, 12)
    np.testing.assert_allclose(h, h.T, atol=1e-10)
    # a rigid translation costs no energy: each row sums to zero over the atoms, per direction
    np.testing.assert_allclose(h.reshape(12, 4, 3).sum(axis=1), 0.0, atol=1e-4)


def test_hessian_refuses_calculators_without_autograd():
    with pytest.raises(TypeError, match="finite_difference_hessian"):
        hessian(EMT(), bulk("Cu"))


def test_hessian_uses_analytic_d3_hessian():
    from mace_ase.dispersion import d3_calculator

    atoms = molecule("CH4")
    atoms.rattle(0.05, seed=0)
    calc = d3_calculator()
    np.testing.assert_allclose(hessian(calc, atoms), finite_difference_hessian(atoms, calc, delta=1e-4), atol=1e-6)


def _mace_calculator():
    from mace_ase.calculator import MACECalculator

    return MACECalculator(model_paths=str(fixture_model("mp0a_small")), device="cpu", default_dtype="float64")


def test_autograd_hessian_matches_finite_differences():
    calc = _mace_calculator()
    atoms = molecule("H2O")
    atoms.rattle(0.05, seed=0)
    h = hessian(calc, atoms)
    reference = finite_difference_hessian(atoms, calc, delta=1e-4)
    assert h.shape == (9, 9)
    np.testing.assert_allclose(h, reference, atol=1e-5 * max(1.0, np.abs(reference).max()))
