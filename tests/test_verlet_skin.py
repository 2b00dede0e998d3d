"""The Verlet skin changes the cost, never the answer: the cached list is exactly a fresh list, in the same order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk
from ase.md.verlet import VelocityVerlet
from ase.md.velocitydistribution import Stationary

from mace_ase.calculator import MACECalculator
from mace_ase.dynamics import run_md
from mace_ase.neighbours import VerletNeighbourList, neighbour_list

EMT_DEMO = Path(__file__).resolve().parents[1] / "models" / "emt-demo.model"


def assert_same_list(verlet: VerletNeighbourList, positions, cell, pbc, numbers=None) -> None:
    cached = verlet.update(positions, cell, pbc, numbers)
    fresh = neighbour_list(positions, cell, pbc, verlet.cutoff)
    assert np.array_equal(cached[0], fresh[0]) and np.array_equal(cached[1], fresh[1])


@pytest.mark.parametrize("pbc", [(True, True, True), (True, False, True), (False, False, False)])
def test_cached_list_equals_a_fresh_list_along_a_random_walk(pbc) -> None:
    rng = np.random.default_rng(0)
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (3, 2, 2)
    positions, cell = atoms.positions.copy(), atoms.cell.array.copy()
    verlet = VerletNeighbourList(4.5, skin=0.8)
    for step in range(150):
        positions += rng.normal(scale=0.03, size=positions.shape)
        if all(pbc) and step % 4 == 0:  # NPT-like strain, sheared too
            cell = cell @ (np.eye(3) + rng.normal(scale=0.003, size=(3, 3)))
        assert_same_list(verlet, positions, cell, pbc)
    assert 1 < verlet.builds < 75  # it did rebuild, but not every step


def test_rebuilds_when_it_must() -> None:
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    positions, cell, pbc = atoms.positions.copy(), atoms.cell.array.copy(), atoms.pbc
    verlet = VerletNeighbourList(5.0, skin=1.0)
    assert_same_list(verlet, positions, cell, pbc)
    moved = positions.copy()
    moved[3] += [0.49, 0.0, 0.0]  # less than half the skin: the cache is used
    assert_same_list(verlet, moved, cell, pbc)
    assert verlet.builds == 1
    moved[3] += [0.02, 0.0, 0.0]  # past half the skin
    assert_same_list(verlet, moved, cell, pbc)
    assert verlet.builds == 2
    assert_same_list(verlet, moved, cell * 1.002, pbc)  # 0.2 % strain on a 5 Å cutoff: 0.01 Å, within the skin
    assert verlet.builds == 2
    assert_same_list(verlet, moved, cell * 0.9, pbc)  # 10 % compression brings far pairs in
    assert verlet.builds == 3
    wrapped = moved.copy()
    wrapped[0] += cell[0] * 0.9  # an atom wrapped into the cell is a large move
    assert_same_list(verlet, wrapped, cell * 0.9, pbc)
    assert verlet.builds == 4
    assert_same_list(verlet, wrapped, cell * 0.9, [True, True, False])  # pbc changed
    assert_same_list(verlet, wrapped, cell * 0.9, [True, True, False], numbers=np.arange(8))  # numbers changed
    assert verlet.builds == 6
    assert_same_list(verlet, wrapped[:5], cell * 0.9, [True, True, False])  # fewer atoms
    nan = wrapped.copy()
    nan[2, 0] = np.nan  # refused at once (a search with nan positions takes minutes)
    with pytest.raises(ValueError, match=r"atom\(s\) \[2\] are not finite"):
        verlet.update(nan, cell * 0.9, [True, True, False])
    with pytest.raises(ValueError, match="cell"):
        verlet.update(wrapped, np.diag([np.inf, 1.0, 1.0]), [True, True, False])
    assert verlet.builds == 7


def test_bad_skin_is_refused() -> None:
    for skin in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="skin"):
            VerletNeighbourList(5.0, skin)
    with pytest.raises(ValueError, match="skin"):
        MACECalculator(model_paths=EMT_DEMO, device="cpu", skin=-1.0)


def nve_trajectory(atoms: Atoms, skin: float, steps: int) -> tuple[list[np.ndarray], list[float], int]:
    atoms = atoms.copy()
    atoms.calc = MACECalculator(model_paths=EMT_DEMO, device="cpu", default_dtype="float64", skin=skin)
    dyn = VelocityVerlet(atoms, timestep=2.0 * units.fs)
    forces, energies = [], []
    for _ in range(steps):
        dyn.run(1)
        forces.append(atoms.get_forces())
        energies.append(atoms.get_potential_energy())
        energies.append(float(atoms.get_stress()[0]))
    return forces, energies, atoms.calc._neighbours.builds


def test_md_with_a_skin_is_bit_identical_to_rebuilding_every_step() -> None:
    """Hot Cu/Au (1500 K, so that the list is rebuilt several times): forces, energies, stresses equal bit for bit."""
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True) * (2, 2, 1)
    atoms.numbers[::3] = 79
    rng = np.random.default_rng(2)
    atoms.set_momenta(rng.normal(scale=np.sqrt(units.kB * 1500 * atoms.get_masses())[:, None], size=(16, 3)))
    Stationary(atoms)
    fresh_forces, fresh_energies, fresh_builds = nve_trajectory(atoms, 0.0, 40)
    skin_forces, skin_energies, skin_builds = nve_trajectory(atoms, 0.5, 40)
    assert fresh_builds >= 40 and 1 < skin_builds < 20
    assert skin_energies == fresh_energies
    assert all(np.array_equal(a, b) for a, b in zip(fresh_forces, skin_forces))


def test_run_md_uses_a_skin_for_the_run_only() -> None:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1)
    calc = MACECalculator(model_paths=EMT_DEMO, device="cpu")
    seen = []
    result = run_md(atoms.copy(), calc, ensemble="nve", temperature_k=300, steps=6, loginterval=3, seed=1,
                    progress=False, callback=lambda partial: seen.append(calc.skin))
    assert seen and all(skin == 1.0 for skin in seen) and calc.skin == 0.0
    again = run_md(atoms.copy(), calc, ensemble="nve", temperature_k=300, steps=6, loginterval=3, seed=1,
                   progress=False, neighbour_skin_a=None)
    assert np.array_equal(result.atoms.positions, again.atoms.positions)
    assert np.array_equal(result.potential_energies, again.potential_energies)
