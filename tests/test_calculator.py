"""Physics and behaviour of MACECalculator: derivatives, invariances, periodicity, errors, TorchScript export."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from ase.calculators.calculator import PropertyNotImplementedError

from conftest import fixture_model, random_triclinic
from mace_ase import export_torchscript, load_model
from mace_ase.calculator import MACECalculator

# Density blocks + Agnesi + ZBL with L=1 features: the most complete single-head fixture.
MODEL = "mpa0_density"


@pytest.fixture(scope="module")
def calc() -> MACECalculator:
    return MACECalculator(model_paths=str(fixture_model(MODEL)), device="cpu", default_dtype="float64")


@pytest.fixture(scope="module")
def elements(calc: MACECalculator) -> list[int]:
    return [int(z) for z in calc.atomic_numbers]


def _energy(atoms: Atoms, calc: MACECalculator) -> float:
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy()


def test_forces_are_minus_energy_gradient(calc, elements) -> None:
    atoms = random_triclinic(elements, seed=3)
    atoms.calc = calc
    forces = atoms.get_forces()
    h = 1e-4
    numeric = np.zeros_like(forces)
    for i in range(len(atoms)):
        for k in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[i, k] += h
            minus.positions[i, k] -= h
            numeric[i, k] = -(_energy(plus, calc) - _energy(minus, calc)) / (2 * h)
    assert np.abs(forces - numeric).max() < 1e-6 * (1 + np.abs(forces).max())
    assert np.abs(forces).max() > 1e-2  # the test is not trivially satisfied


def test_stress_is_strain_derivative_over_volume(calc, elements) -> None:
    atoms = random_triclinic(elements, seed=4)
    atoms.calc = calc
    stress = atoms.get_stress(voigt=False)
    volume = atoms.get_volume()
    h = 1e-5
    numeric = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            strain = np.zeros((3, 3))
            strain[a, b] = strain[b, a] = h / 2 if a != b else h
            energies = []
            for sign in (1, -1):
                deformed = atoms.copy()
                deformed.set_cell(atoms.cell.array @ (np.eye(3) + sign * strain), scale_atoms=True)
                energies.append(_energy(deformed, calc))
            numeric[a, b] = (energies[0] - energies[1]) / (2 * h) / volume
    assert np.abs(stress - numeric).max() < 1e-6 * (1 + np.abs(stress).max())
    assert np.abs(stress).max() > 1e-4


def test_invariances(calc, elements) -> None:
    atoms = random_triclinic(elements, seed=5)
    atoms.calc = calc
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()

    rotation, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    rotated = atoms.copy()
    rotated.set_cell(atoms.cell.array @ rotation.T)
    rotated.positions = atoms.positions @ rotation.T
    rotated.calc = calc
    assert rotated.get_potential_energy() == pytest.approx(energy, abs=1e-9)
    assert np.abs(rotated.get_forces() - forces @ rotation.T).max() < 1e-9

    translated = atoms.copy()
    translated.positions += [13.1, -2.7, 0.4]
    assert _energy(translated, calc) == pytest.approx(energy, abs=1e-9)

    imaged = atoms.copy()  # move atoms to other periodic images
    imaged.positions += atoms.cell.array[0] - 2 * atoms.cell.array[2]
    imaged.positions[0] += atoms.cell.array[1]
    assert _energy(imaged, calc) == pytest.approx(energy, abs=1e-9)

    order = np.random.default_rng(1).permutation(len(atoms))
    permuted = atoms[order]
    permuted.calc = calc
    assert permuted.get_potential_energy() == pytest.approx(energy, abs=1e-9)
    assert np.abs(permuted.get_forces() - forces[order]).max() < 1e-9


def test_molecule_slab_and_wire(calc, elements) -> None:
    z = elements[0]
    mol = Atoms([z, z, elements[1]], positions=[[0, 0, 0], [1.9, 0, 0], [0.8, 1.7, 0.2]])
    mol.calc = calc
    assert np.isfinite(mol.get_potential_energy())
    assert abs(mol.get_forces().sum(axis=0)).max() < 1e-10  # no external field: momentum conserved
    with pytest.raises(PropertyNotImplementedError, match="periodic"):
        mol.get_stress()

    slab = random_triclinic(elements, seed=6)
    slab.pbc = (True, True, False)
    slab.center(vacuum=5.0, axis=2)
    slab.calc = calc
    energy = slab.get_potential_energy()
    shifted = slab.copy()
    shifted.positions[:, 2] += 30.0  # no periodicity along z: an out-of-cell position changes nothing
    assert _energy(shifted, calc) == pytest.approx(energy, abs=1e-9)
    with pytest.raises(PropertyNotImplementedError):
        slab.get_stress()

    wire = Atoms([z] * 4, positions=[[0, 0, 0], [0, 0, 2.2], [0, 0, 4.4], [0, 0, 6.6]], cell=[0, 0, 8.8],
                 pbc=(False, False, True))
    wire.calc = calc
    assert np.isfinite(wire.get_potential_energy())
    assert np.abs(wire.get_forces()).max() < 1e-10  # equally spaced periodic chain: forces vanish by symmetry


def test_small_cell_sees_many_images(calc, elements) -> None:
    z = elements[0]
    small = Atoms([z], positions=[[0, 0, 0]], cell=np.eye(3) * 2.3, pbc=True)
    small.calc = calc
    energy = small.get_potential_energy()
    big = small.repeat((2, 3, 1))
    assert _energy(big, calc) == pytest.approx(6 * energy, abs=1e-8)
    assert np.abs(small.get_forces()).max() < 1e-10


def test_single_atom_energy_is_e0(calc, elements) -> None:
    atom = Atoms([elements[2]], positions=[[1.0, 2.0, 3.0]])
    atom.calc = calc
    energy = atom.get_potential_energy()
    # an isolated atom has no neighbours: E = E0 + scale * 0 + shift, and zero force
    assert energy == pytest.approx(atom.calc.results["energies"][0])
    assert np.abs(atom.get_forces()).max() == 0.0


def test_unknown_element_names_elements(calc, elements) -> None:
    atoms = Atoms("Xe2", positions=[[0, 0, 0], [0, 0, 2.5]])
    atoms.calc = calc
    with pytest.raises(ValueError, match="Xe") as info:
        atoms.get_potential_energy()
    assert "it knows" in str(info.value)
    # the calculator is still usable, and gives the same answers as a fresh one
    good = random_triclinic(elements, seed=12)
    expected = _energy(good, MACECalculator(model_paths=str(fixture_model(MODEL)), device="cpu"))
    assert _energy(good, calc) == pytest.approx(expected, abs=1e-12)


def test_float32_mode_does_not_touch_global_dtype(elements) -> None:
    before = torch.get_default_dtype()
    calc32 = MACECalculator(model_paths=str(fixture_model(MODEL)), device="cpu", default_dtype="float32")
    assert torch.get_default_dtype() == before
    assert all(p.dtype == torch.float32 for p in calc32.models[0].parameters())
    with pytest.raises(ValueError, match="float64"):
        MACECalculator(model_paths=str(fixture_model(MODEL)), default_dtype="float16")


def test_keyword_typos_are_errors_and_mace_backend_switches_are_accepted() -> None:
    path = str(fixture_model(MODEL))
    with pytest.raises(TypeError, match="defualt_dtype"):
        MACECalculator(model_paths=path, defualt_dtype="float32")
    with pytest.raises(ValueError, match="energy_units_to_eV"):
        MACECalculator(model_paths=path, energy_units_to_eV=1000.0)
    MACECalculator(model_paths=path, device="cpu", enable_cueq=True, compile_mode=None)  # as written for mace-torch


def test_heads_are_selected_explicitly() -> None:
    path = str(fixture_model("multihead"))
    default = MACECalculator(model_paths=path, device="cpu")
    assert default.heads[default.head].lower() == "default"
    with pytest.raises(ValueError, match="unknown head"):
        MACECalculator(model_paths=path, head="nope")
    pt = MACECalculator(model_paths=path, device="cpu", head="pt_head")
    atoms = molecule("CH4")
    atoms.calc = pt
    e_pt = atoms.get_potential_energy()
    atoms.calc = default
    assert atoms.get_potential_energy() != pytest.approx(e_pt)


def test_loaded_module_and_committee(calc, elements) -> None:
    atoms = random_triclinic(elements, seed=7)
    model = load_model(fixture_model(MODEL), device="cpu", dtype="float64")
    from_module = MACECalculator(model_paths=model, device="cpu")
    committee = MACECalculator(model_paths=[model, str(fixture_model(MODEL))], device="cpu")
    reference = _energy(atoms, calc)
    assert _energy(atoms, from_module) == pytest.approx(reference, abs=1e-12)
    atoms.calc = committee
    assert atoms.get_potential_energy() == pytest.approx(reference, abs=1e-12)
    assert committee.results["energy_var"] == pytest.approx(0.0, abs=1e-20)


def test_hessian_matches_finite_differences(calc, elements) -> None:
    atoms = random_triclinic(elements, seed=8, n=4)
    hessian = calc.get_hessian(atoms)
    h = 1e-4
    numeric = np.zeros_like(hessian)
    for index in range(3 * len(atoms)):
        i, k = divmod(index, 3)
        columns = []
        for sign in (1, -1):
            displaced = atoms.copy()
            displaced.positions[i, k] += sign * h
            displaced.calc = calc
            columns.append(-displaced.get_forces().reshape(-1))
        numeric[:, index] = (columns[0] - columns[1]) / (2 * h)
    assert np.abs(hessian - hessian.T).max() < 1e-8
    assert np.abs(hessian - numeric).max() < 1e-5 * (1 + np.abs(hessian).max())


@pytest.mark.parametrize("name", [MODEL, "mp0a_small"])  # with and without ZBL
def test_torchscript_export_runs_without_mace_ase(tmp_path, name: str) -> None:
    model = load_model(fixture_model(name), device="cpu", dtype="float64", radial="exact")  # what TorchScript runs
    elements = [int(z) for z in model.atomic_numbers]
    exported = tmp_path / "model.pt"
    export_torchscript(model, exported)
    atoms = random_triclinic(elements, seed=9)
    calc = MACECalculator(model_paths=model, device="cpu")
    graph = calc._graph(atoms)
    torch.save(graph, tmp_path / "graph.pt")
    expected = model(**graph)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["mace_ase"] = None  # importing mace_ase now fails
        import torch
        model = torch.jit.load({str(exported)!r})
        graph = torch.load({str(tmp_path / "graph.pt")!r}, weights_only=True)
        out = model(**graph)
        torch.save({{k: v for k, v in out.items()}}, {str(tmp_path / "out.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    for key in ("energy", "forces", "stress", "node_energy"):
        assert torch.allclose(got[key], expected[key], rtol=0, atol=1e-10), key
