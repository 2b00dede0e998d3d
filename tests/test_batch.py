"""Batched evaluation (mace_ase.evaluate) gives each structure exactly what one MACECalculator call gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule

from conftest import fixture_model
from mace_ase import MACECalculator, batch, evaluate, load_model
from mace_ase.batch import bytes_per_padded_edge
from mace_ase.neighbours import neighbour_list

EMT_DEMO = Path(__file__).resolve().parents[1] / "models" / "emt-demo.model"


def metal_structures() -> list[Atoms]:
    """Periodic cells of different sizes and compositions, a cluster (no pbc) and a slab (pbc in x, y only)."""
    rng = np.random.default_rng(3)
    out = []
    for k, (element, repeat) in enumerate([("Cu", (1, 1, 1)), ("Au", (2, 1, 1)), ("Ni", (1, 2, 2)),
                                           ("Pt", (2, 2, 1)), ("Al", (1, 1, 2))]):
        atoms = bulk(element, "fcc", a={"Cu": 3.61, "Au": 4.08, "Ni": 3.52, "Pt": 3.92, "Al": 4.05}[element],
                     cubic=True).repeat(repeat)
        swap = rng.random(len(atoms)) < 0.3
        atoms.numbers[swap] = rng.choice([28, 29, 46, 47, 78, 79], swap.sum())
        atoms.rattle(0.08, seed=k)
        out.append(atoms)
    triclinic = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 2))  # primitive (non-orthogonal) cell
    triclinic.rattle(0.05, seed=9)
    out.append(triclinic)
    cluster = bulk("Ag", "fcc", a=4.09, cubic=True).repeat((2, 2, 1))
    cluster.pbc = False
    cluster.rattle(0.05, seed=5)
    out.append(cluster)
    slab = fcc111("Pd", size=(2, 2, 3), vacuum=6.0)
    slab.pbc = (True, True, False)
    slab.rattle(0.05, seed=7)
    out.append(slab)
    return out


def one_by_one(structures: list[Atoms], model, dtype: str = "float64") -> list[dict]:
    calc = MACECalculator(model, device="cpu", default_dtype=dtype)
    out = []
    for atoms in structures:
        atoms = atoms.copy()
        atoms.calc = calc
        entry = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
        entry["stress"] = atoms.get_stress() if atoms.pbc.all() else None
        out.append(entry)
    return out


@pytest.fixture(scope="module")
def structures() -> list[Atoms]:
    return metal_structures()


@pytest.fixture(scope="module")
def references(structures) -> list[dict]:
    return one_by_one(structures, EMT_DEMO)


@pytest.mark.parametrize("batch_size", [None, 1, 3])
def test_identical_to_one_calculator_call_each(structures, references, batch_size) -> None:
    results = evaluate(structures, model=EMT_DEMO, batch_size=batch_size, device="cpu")
    assert results.n_batches == (1 if batch_size is None else -(-len(structures) // batch_size))
    assert len(results.energies) == len(results.forces) == len(results.stresses) == len(structures)
    for s, (atoms, ref) in enumerate(zip(structures, references)):
        assert results.energies[s] == pytest.approx(ref["energy"], abs=1e-12)
        assert results.forces[s].shape == (len(atoms), 3)
        np.testing.assert_allclose(results.forces[s], ref["forces"], rtol=0, atol=1e-12)
        if ref["stress"] is None:
            assert results.stresses[s] is None  # stress only for fully periodic structures
        else:
            np.testing.assert_allclose(results.stresses[s], ref["stress"], rtol=0, atol=1e-12)
        assert results.node_energies[s].sum() == pytest.approx(ref["energy"], abs=1e-10)


def test_memory_budget_splits_batches_without_changing_results(structures, references) -> None:
    model_bytes = bytes_per_padded_edge(load_model(EMT_DEMO, device="cpu"))
    # a budget for about 2 structures of 4-16 atoms with ~80 neighbours each
    results = evaluate(structures, model=EMT_DEMO, device="cpu", memory_budget=30 * 80 * model_bytes)
    assert results.n_batches > 1
    assert sum(results.batch_sizes) == len(structures)
    for s, ref in enumerate(references):
        assert results.energies[s] == pytest.approx(ref["energy"], abs=1e-12)
        np.testing.assert_allclose(results.forces[s], ref["forces"], rtol=0, atol=1e-12)


def test_gpu_batches_are_sized_from_the_free_gpu_memory(monkeypatch) -> None:
    """On CUDA the default budget is half of what the GPU has free (asked each call), on the CPU a quarter of the
    available RAM capped at 4 GiB: the sizing itself is the CPU-tested planner above."""
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: asked.append(device) or (6 * 2**30, 80 * 2**30))
    assert batch._memory_budget(torch.device("cuda:1")) == 3 * 2**30
    assert asked == [torch.device("cuda:1")]
    assert 0 < batch._memory_budget(torch.device("cpu")) <= 4 * 2**30


def test_other_architecture_with_zbl_and_molecules() -> None:
    path = fixture_model("mp0b_agnesi_zbl")
    water, methane = molecule("H2O"), molecule("CH4")
    salt = bulk("NaCl", "rocksalt", a=5.64)
    salt.rattle(0.05, seed=1)
    structures = [water, salt, methane]
    results = evaluate(structures, model=path, device="cpu")
    for s, ref in enumerate(one_by_one(structures, path)):
        assert results.energies[s] == pytest.approx(ref["energy"], abs=1e-12)
        np.testing.assert_allclose(results.forces[s], ref["forces"], rtol=0, atol=1e-12)
    assert results.stresses[0] is None and results.stresses[1] is not None


def test_float32_close_to_float64(structures, references) -> None:
    results = evaluate(structures, model=EMT_DEMO, device="cpu", dtype="float32")
    for s, ref in enumerate(references):
        assert results.energies[s] == pytest.approx(ref["energy"], abs=1e-4 * len(structures[s]))
        np.testing.assert_allclose(results.forces[s], ref["forces"], rtol=0, atol=1e-4)


def test_unknown_element_names_the_structure(structures) -> None:
    bad = structures[:2] + [molecule("H2O")]
    with pytest.raises(ValueError, match=r"structure 2: .*no parameters for element\(s\) H, O"):
        evaluate(bad, model=EMT_DEMO, device="cpu")


def test_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        evaluate([bulk("Cu")], model=EMT_DEMO, device="cpu", batch_size=0)


def test_empty_list() -> None:
    results = evaluate([], model=EMT_DEMO, device="cpu")
    assert len(results.energies) == 0 and results.n_batches == 0


def test_batch_vectors_are_bitwise_those_of_one_call_each(structures) -> None:
    """The packed batch inputs: each structure's edge vectors exactly as MACE.forward computes them for it alone
    (positions[receiver] - positions[sender] + unit_shifts @ cell), its edges renumbered to its place in the batch;
    batches take the structures in order of their largest neighbour count."""
    net = load_model(EMT_DEMO, device="cpu")
    species_of_z = np.full(119, -1, dtype=np.int64)
    known = net.atomic_numbers.numpy()
    species_of_z[known] = np.arange(len(known))
    graphs = batch._graphs(structures, net, species_of_z, known)
    plan = batch._plan_batches(graphs, 3, 10**9, None)
    order = np.concatenate(plan)
    assert sorted(order.tolist()) == list(range(len(structures)))
    assert np.all(np.diff(graphs.lists.max_neighbours[order]) >= 0)
    members = plan[1]
    vectors, edge_index, species, node_counts, edge_counts = batch._batch_inputs(graphs, members, torch.device("cpu"),
                                                                                 torch.float64)
    first_node = first_edge = 0
    for s, n_nodes, n_edges in zip(members, node_counts, edge_counts):
        atoms = structures[s]
        edges, shifts = neighbour_list(atoms.positions, atoms.cell.array, atoms.pbc, net.r_max_value)
        positions = torch.as_tensor(atoms.positions)
        edges_t = torch.as_tensor(edges)
        expected = (positions[edges_t[1]] - positions[edges_t[0]]
                    + torch.as_tensor(shifts, dtype=torch.float64) @ torch.as_tensor(atoms.cell.array))
        rows = slice(first_edge, first_edge + n_edges)
        assert n_nodes == len(atoms) and n_edges == edges.shape[1]
        assert torch.equal(vectors[rows], expected)
        assert torch.equal(edge_index[:, rows], edges_t + first_node)
        assert species[first_node:first_node + n_nodes].tolist() == species_of_z[atoms.numbers].tolist()
        first_node, first_edge = first_node + n_nodes, first_edge + n_edges
    assert first_edge == vectors.shape[0] == edge_index.shape[1]
