"""Bad input never gives a silent wrong answer: each case is a correct answer or a clear error, and afterwards the
calculator still matches mace-torch's reference (issue 11.1, issue 13)."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.calculator import PropertyNotImplementedError

from conftest import fixture_model, references, structure
from mace_ase.calculator import MACECalculator
from mace_ase.validation import InsufficientMemoryError, estimate_edges

MODEL = "mp0a_small"


@pytest.fixture(scope="module")
def calc() -> MACECalculator:
    return MACECalculator(model_paths=str(fixture_model(MODEL)), device="cpu", default_dtype="float64")


def _reference(name: str) -> dict:
    return next(case for case in references()["models"][MODEL]["cases"]
                if case["structure"] == name and case["dtype"] == "float64")


def assert_matches_reference(calc: MACECalculator, name: str = "bulk_rattled") -> None:
    """A good call after the bad one still gives mace-torch's answer."""
    atoms = structure(name)
    atoms.calc = calc
    case = _reference(name)
    assert abs(atoms.get_potential_energy() - case["energy"]) <= 1e-9 * len(atoms)
    assert np.abs(atoms.get_forces() - np.array(case["forces"])).max() <= 1e-8
    if case["stress"] is not None:
        assert np.abs(atoms.get_stress() - np.array(case["stress"])).max() <= 1e-9


def _bad(calc: MACECalculator, atoms: Atoms, error: type, match: str) -> str:
    atoms.calc = calc
    with pytest.raises(error, match=match) as info:
        atoms.get_potential_energy()
    assert_matches_reference(calc)
    return str(info.value)


def test_empty_atoms_follow_ase_convention(calc) -> None:
    for atoms in (Atoms(), Atoms(cell=[5.0, 5.0, 5.0], pbc=True)):
        atoms.calc = calc
        assert atoms.get_potential_energy() == 0.0
        assert atoms.get_forces().shape == (0, 3)
        assert calc.results["energies"].shape == (0,)
        if atoms.pbc.all():
            assert np.array_equal(atoms.get_stress(), np.zeros(6))
    assert_matches_reference(calc)


def test_empty_atoms_descriptors_hessian_and_atomic_stresses() -> None:
    calc = MACECalculator(model_paths=str(fixture_model("mp0a_medium")), device="cpu")
    full = calc.get_descriptors(structure("triclinic"), invariants_only=False)
    assert calc.get_descriptors(Atoms(), invariants_only=False).shape == (0, full.shape[1])
    assert calc.get_descriptors(Atoms()).shape == (0, calc.get_descriptors(structure("triclinic")).shape[1])
    assert calc.get_hessian(Atoms()).shape == (0, 0)
    assert Atoms(cell=[3.0, 3.0, 3.0], pbc=True, calculator=calc).get_stresses().shape == (0, 6)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_position_names_the_atom(calc, value) -> None:
    atoms = structure("bulk_rattled")
    atoms.positions[3, 1] = value
    message = _bad(calc, atoms, ValueError, "non-finite positions")
    assert "atom(s) 3 " in message


def test_non_finite_cell_is_refused(calc) -> None:
    atoms = structure("bulk_rattled")
    cell = atoms.cell.array.copy()
    cell[2, 2] = np.nan
    atoms.set_cell(cell)
    _bad(calc, atoms, ValueError, "non-finite entries")


def test_atoms_on_top_of_each_other_are_named(calc) -> None:
    atoms = structure("molecule")
    atoms.positions[5] = atoms.positions[2]
    message = _bad(calc, atoms, ValueError, "atoms 2 and 5 are 0 Å apart")
    assert "min_distance" in message
    close = structure("molecule")
    close.positions[5] = close.positions[2] + [0.05, 0.0, 0.0]
    _bad(calc, close, ValueError, "atoms 2 and 5 are 0.05 Å apart")


def test_min_distance_can_be_lowered() -> None:
    calc = MACECalculator(model_paths=str(fixture_model(MODEL)), device="cpu", min_distance=0.01)
    atoms = structure("molecule")
    atoms.positions[5] = atoms.positions[2] + [0.05, 0.0, 0.0]
    atoms.calc = calc
    assert np.isfinite(atoms.get_potential_energy())


@pytest.mark.parametrize("numbers", [[0, 1], [1, 119], [1, -3]])
def test_atomic_numbers_outside_the_periodic_table(calc, numbers) -> None:
    atoms = Atoms(numbers=numbers, positions=[[0, 0, 0], [1.0, 0, 0]])
    message = _bad(calc, atoms, ValueError, "not chemical elements")
    assert f"[{[z for z in numbers if not 1 <= z <= 118][0]}]" in message


def test_element_the_model_lacks(calc) -> None:
    _bad(calc, Atoms("Xe2", positions=[[0, 0, 0], [3.0, 0, 0]]), ValueError, "no parameters for element")


def test_periodic_axis_without_a_cell_vector(calc) -> None:
    atoms = structure("bulk_rattled")
    cell = atoms.cell.array.copy()
    cell[1] = 0.0
    atoms.set_cell(cell)
    _bad(calc, atoms, ValueError, "cell vector 1 has length 0")


def test_flat_periodic_cell(calc) -> None:
    atoms = structure("bulk_rattled")
    cell = atoms.cell.array.copy()
    cell[2] = cell[0] + cell[1]  # coplanar: no volume
    atoms.set_cell(cell)
    _bad(calc, atoms, ValueError, "linearly dependent")


def test_left_handed_cell_is_valid(calc) -> None:
    """A negative determinant is a mirror-image basis of the same lattice: same energy, forces, stress."""
    atoms = structure("bulk_rattled")
    atoms.calc = calc
    energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    left = atoms.copy()
    left.set_cell(atoms.cell.array[[1, 0, 2]])  # swapped vectors: det < 0
    assert np.linalg.det(left.cell.array) < 0
    left.calc = calc
    assert left.get_potential_energy() == pytest.approx(energy, abs=1e-10)
    assert np.abs(left.get_forces() - forces).max() < 1e-10
    assert np.abs(left.get_stress() - stress).max() < 1e-12


def test_exploding_neighbour_count_is_refused_before_allocation(calc) -> None:
    """A 0.5 Å periodic cell has ~4000 images of every atom within 5 Å; a skewed cell as well."""
    tiny = Atoms("Cu", cell=[0.5, 0.5, 0.5], pbc=True)
    limited = MACECalculator(model_paths=str(fixture_model(MODEL)), device="cpu", memory_limit_gb=0.002)
    message = _bad(limited, tiny, InsufficientMemoryError, "neighbour pairs")
    assert "GB" in message and "memory_limit_gb" in message
    skewed = Atoms("Cu", cell=[[3.0, 0, 0], [2.999, 0.001, 0], [0, 0, 3.0]], pbc=True)
    _bad(limited, skewed, ValueError, "so small or skewed")


def test_million_atoms_are_refused_before_allocation(calc, monkeypatch) -> None:
    """Estimated from density x sphere volume, before the neighbour list: returns at once, allocates nothing."""

    def fail(*args, **kwargs):
        raise AssertionError("the neighbour list was built")

    rng = np.random.default_rng(0)
    n = 1_000_000
    side = (n / 0.08) ** (1 / 3)  # a liquid's density, 0.08 atoms/Å^3
    atoms = Atoms(numbers=np.full(n, 29), positions=rng.random((n, 3)) * side, cell=[side] * 3, pbc=True)
    estimate = estimate_edges(atoms.positions, atoms.cell.array, atoms.pbc, calc.r_max)
    assert 2e7 < estimate < 1e8  # 0.08 * 4/3 pi 5^3 = 42 neighbours each
    limited = MACECalculator(model_paths=str(fixture_model(MODEL)), device="cpu", memory_limit_gb=4.0)
    monkeypatch.setattr(limited._neighbours, "update", fail)
    atoms.calc = limited
    with pytest.raises(InsufficientMemoryError, match="1000000 atoms"):
        atoms.get_potential_energy()
    monkeypatch.undo()
    assert_matches_reference(limited)


def test_default_budget_is_the_memory_available(monkeypatch) -> None:
    """Without a limit the budget is 80 % of what the machine has free: a million atoms do not fit in 24 GB."""
    from mace_ase import validation

    monkeypatch.delenv("MACE_ASE_MEMORY_LIMIT_GB", raising=False)
    monkeypatch.setattr(validation, "available_memory", lambda device="cpu": 24_000_000_000)
    calc = MACECalculator(model_paths=str(fixture_model(MODEL)), device="cpu")
    n = 1_000_000
    side = (n / 0.08) ** (1 / 3)
    atoms = Atoms(numbers=np.full(n, 29), positions=np.random.default_rng(1).random((n, 3)) * side,
                  cell=[side] * 3, pbc=True)
    atoms.calc = calc
    with pytest.raises(InsufficientMemoryError, match="19.2 GB budget"):
        atoms.get_potential_energy()
    assert_matches_reference(calc)  # ordinary structures fit


def test_memory_limit_from_environment(monkeypatch) -> None:
    monkeypatch.setenv("MACE_ASE_MEMORY_LIMIT_GB", "1e-6")
    calc = MACECalculator(model_paths=str(fixture_model(MODEL)), device="cpu")
    atoms = structure("bulk_rattled")
    atoms.calc = calc
    with pytest.raises(InsufficientMemoryError, match="MACE_ASE_MEMORY_LIMIT_GB"):
        atoms.get_potential_energy()
    monkeypatch.setenv("MACE_ASE_MEMORY_LIMIT_GB", "lots")
    with pytest.raises(ValueError, match="not a number"):
        MACECalculator(model_paths=str(fixture_model(MODEL)), device="cpu")


def test_estimate_is_close_for_bulk_slab_and_cluster(calc) -> None:
    from mace_ase.neighbours import neighbour_list

    for name in ("bulk_rattled", "triclinic", "slab", "molecule", "wire"):
        atoms = structure(name)
        exact = neighbour_list(atoms.positions, atoms.cell.array, atoms.pbc, calc.r_max)[0].shape[1]
        estimate = estimate_edges(atoms.positions, atoms.cell.array, atoms.pbc, calc.r_max)
        assert exact / 4 <= estimate <= 4 * exact + 10, name


def test_pbc_changed_between_calls(calc) -> None:
    """ASE's system_changes includes pbc: the second call recomputes (a slab of the same atoms differs)."""
    atoms = structure("bulk_rattled")
    atoms.calc = calc
    periodic = atoms.get_potential_energy()
    atoms.pbc = [True, True, False]
    slab = atoms.get_potential_energy()
    fresh = atoms.copy()
    fresh.calc = MACECalculator(model_paths=str(fixture_model(MODEL)), device="cpu")
    assert slab == pytest.approx(fresh.get_potential_energy(), abs=1e-12)
    assert slab != pytest.approx(periodic, abs=1e-6)
    with pytest.raises(PropertyNotImplementedError, match="fully periodic"):
        atoms.get_stress()
    atoms.pbc = True
    assert atoms.get_potential_energy() == pytest.approx(_reference("bulk_rattled")["energy"], abs=1e-8)
    assert_matches_reference(calc)


def test_float32_positions_give_the_float64_answer(calc) -> None:
    atoms = structure("bulk_rattled")
    exact = atoms.positions.copy()
    atoms.arrays["positions"] = exact.astype(np.float32)
    atoms.calc = calc
    rounded = structure("bulk_rattled")
    rounded.positions = exact.astype(np.float32).astype(np.float64)
    rounded.calc = MACECalculator(model_paths=str(fixture_model(MODEL)), device="cpu")
    assert atoms.get_potential_energy() == pytest.approx(rounded.get_potential_energy(), abs=1e-10)
    assert np.abs(atoms.get_forces() - rounded.get_forces()).max() < 1e-10
    assert_matches_reference(calc)
