"""DFT-D3 add-on (optional extra 'd3', backend: the dftd3 package)."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.calculators.emt import EMT

from mace_ase.dispersion import DEFAULT_CUTOFF, add_d3, d3_calculator


def test_sum_is_base_plus_d3():
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 2, 2)
    atoms.rattle(0.02, seed=0)
    parts = []
    for calc in (EMT(), d3_calculator()):
        atoms.calc = calc
        parts.append((atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()))
    atoms.calc = add_d3(EMT())
    np.testing.assert_allclose(atoms.get_potential_energy(), parts[0][0] + parts[1][0], rtol=1e-12)
    np.testing.assert_allclose(atoms.get_forces(), parts[0][1] + parts[1][1], atol=1e-12)
    np.testing.assert_allclose(atoms.get_stress(), parts[0][2] + parts[1][2], atol=1e-12)
    assert parts[1][0] < 0  # dispersion binds


def test_d3_forces_are_energy_gradients():
    atoms = molecule("CH3CH2OH")
    atoms.calc = d3_calculator()
    forces = atoms.get_forces()
    delta = 1e-4
    for atom, axis in [(0, 0), (3, 2)]:
        energies = []
        for sign in (1, -1):
            probe = atoms.copy()
            probe.positions[atom, axis] += sign * delta
            probe.calc = d3_calculator()
            energies.append(probe.get_potential_energy())
        assert forces[atom, axis] == pytest.approx(-(energies[0] - energies[1]) / (2 * delta), abs=1e-7)


def test_cutoff_and_damping_choices():
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.calc = d3_calculator(cutoff=10.0)
    short = atoms.get_potential_energy()
    atoms.calc = d3_calculator()
    assert DEFAULT_CUTOFF == pytest.approx(21.167, abs=1e-3)
    assert atoms.get_potential_energy() < short  # a longer cutoff adds more (negative) pairs
    atoms.calc = d3_calculator(damping="zero")
    assert atoms.get_potential_energy() < 0


def test_bad_options_refused():
    with pytest.raises(ValueError, match="available: bj"):
        d3_calculator(damping="becke")
    with pytest.raises(TypeError, match="dispersion_xc"):
        add_d3(EMT(), dispersion_xc="pbe")


def test_mace_mp_with_dispersion_adds_d3():
    """mace_mp(dispersion=True) is the MACE calculator plus D3(BJ, PBE) with mace-torch's 40 bohr cutoff."""
    from conftest import fixture_model

    from mace_ase import mace_mp

    path = str(fixture_model("mp0a_small"))
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.rattle(0.05, seed=1)
    atoms.calc = mace_mp(model=path, device="cpu", default_dtype="float64")
    e_mace, f_mace = atoms.get_potential_energy(), atoms.get_forces()
    atoms.calc = d3_calculator()
    e_d3, f_d3 = atoms.get_potential_energy(), atoms.get_forces()
    atoms.calc = mace_mp(model=path, device="cpu", default_dtype="float64", dispersion=True)
    assert atoms.get_potential_energy() == pytest.approx(e_mace + e_d3, abs=1e-9)
    np.testing.assert_allclose(atoms.get_forces(), f_mace + f_d3, atol=1e-9)
