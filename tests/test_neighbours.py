"""Our neighbour list (matscipy in mace's convention) against ASE's reference implementation, and its cost."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.neighborlist import neighbor_list as ase_neighbor_list

from mace_ase.neighbours import _search_frame, neighbour_list, packed_neighbour_lists


def edge_set(edge_index: np.ndarray, shifts: np.ndarray) -> set[tuple[int, int, int, int, int]]:
    return {(int(i), int(j), *map(int, s)) for (i, j), s in zip(edge_index.T, shifts, strict=True)}


def ase_edge_set(atoms: Atoms, cutoff: float) -> set[tuple[int, int, int, int, int]]:
    i, j, shifts = ase_neighbor_list("ijS", atoms, cutoff, self_interaction=False)
    return edge_set(np.stack([i, j]), shifts)


def random_cell(rng: np.random.Generator) -> np.ndarray:
    """A triclinic cell, 3-6 Å vectors, far from degenerate (smaller than the cutoff: several images)."""
    while True:
        cell = np.diag(rng.uniform(3.0, 6.0, 3)) + np.triu(rng.uniform(-1.5, 1.5, (3, 3)), k=1)
        cell = cell[rng.permutation(3)] if rng.random() < 0.5 else cell
        if abs(np.linalg.det(cell)) > 0.4 * np.prod(np.linalg.norm(cell, axis=1)):
            return cell


@pytest.mark.parametrize("pbc", list(itertools.product([False, True], repeat=3)), ids=str)
@pytest.mark.parametrize("seed", range(3))
def test_same_pairs_and_shifts_as_ase(pbc, seed):
    rng = np.random.default_rng(seed)
    cell = random_cell(rng)
    fractional = rng.uniform(-0.6, 1.6, (12, 3))  # atoms inside and outside the cell, in every direction
    atoms = Atoms("H12", positions=fractional @ cell, cell=cell, pbc=pbc)
    cutoff = 4.7
    edges, shifts = neighbour_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
    ours = edge_set(edges, shifts)
    assert ours == ase_edge_set(atoms, cutoff)
    assert not shifts[:, ~np.array(pbc)].any()  # no translation along a non-periodic direction
    vectors = atoms.positions[edges[1]] - atoms.positions[edges[0]] + shifts @ cell
    assert np.linalg.norm(vectors, axis=1).max() < cutoff
    assert len(ours) > 10  # the comparison has pairs to compare


def test_slab_cell_without_a_vector_along_its_vacuum():
    """pbc (T, T, F) with a zero third cell vector, as ase.build surfaces without vacuum have."""
    rng = np.random.default_rng(7)
    cell = np.array([[3.9, 0.0, 0.0], [1.2, 3.5, 0.0], [0.0, 0.0, 0.0]])
    positions = rng.uniform(0, 1, (6, 3)) * [3.9, 3.5, 9.0]
    edges, shifts = neighbour_list(positions, cell, [True, True, False], 5.0)
    filled = cell.copy()
    filled[2] = [0.0, 0.0, 10.0]  # ASE wants a full cell; no image is made along a non-periodic direction
    assert edge_set(edges, shifts) == ase_edge_set(Atoms("H6", positions, cell=filled, pbc=[True, True, False]), 5.0)


@pytest.mark.parametrize("pbc", [(False, False, False), (True, True, False)], ids=["molecule", "slab"])
def test_structure_far_from_the_origin_gives_the_same_graph_at_the_same_cost(pbc):
    atoms = molecule("CH3CH2OH")
    atoms.cell = [[4.0, 0.0, 0.0], [0.5, 4.5, 0.0], [0.0, 0.0, 12.0]]
    atoms.pbc = pbc
    far = atoms.positions + [1.0e4, -2.0e4, 1.5e4]
    cutoff = 5.0

    def timed(positions):
        start = time.perf_counter()
        for _ in range(5):
            result = neighbour_list(positions, atoms.cell.array, atoms.pbc, cutoff)
        return result, time.perf_counter() - start

    (near_edges, near_shifts), near_time = timed(atoms.positions)
    (far_edges, far_shifts), far_time = timed(far)
    assert edge_set(far_edges, far_shifts) == edge_set(near_edges, near_shifts)
    # the search box (what matscipy bins, hence its memory and time) is the same wherever the molecule is
    near_box = _search_frame(atoms.positions, atoms.cell.array, np.array(pbc), cutoff)[1]
    far_box = _search_frame(far, atoms.cell.array, np.array(pbc), cutoff)[1]
    np.testing.assert_allclose(np.linalg.norm(far_box, axis=1), np.linalg.norm(near_box, axis=1), rtol=1e-9)
    assert np.linalg.norm(far_box, axis=1).max() < 20.0  # molecule extent + 2 cutoffs, not its distance from 0
    assert far_time < 5 * near_time + 0.05


def test_search_box_is_perpendicular_to_the_periodic_vectors():
    """Along non-periodic directions the box vectors are perpendicular to the periodic ones, so that the
    translation that puts the atoms inside the box leaves every periodic image where it was."""
    cell = np.array([[4.0, 0.3, 0.2], [0.4, 4.2, -0.3], [0.0, 0.0, 0.0]])
    positions = np.random.default_rng(1).uniform(-50, 50, (5, 3))
    shifted, box = _search_frame(positions, cell, np.array([True, True, False]), 5.0)
    np.testing.assert_allclose(box[:2], cell[:2])
    assert abs(box[2] @ cell[0]) < 1e-9 and abs(box[2] @ cell[1]) < 1e-9
    heights = shifted @ (box[2] / np.linalg.norm(box[2]))
    assert heights.min() == pytest.approx(5.0) and heights.max() == pytest.approx(np.linalg.norm(box[2]) - 5.0)


def test_packed_lists_are_the_per_structure_lists_one_after_another():
    """packed_neighbour_lists: each structure's own edges, in its own order, renumbered by its first node; empty
    structures, isolated atoms, clusters and slabs included."""
    rng = np.random.default_rng(11)
    structures = []
    for pbc in [(True, True, True), (False, False, False), (True, True, False), (True, False, True)]:
        cell = random_cell(rng)
        structures.append((rng.uniform(0, 1, (int(rng.integers(2, 14)), 3)) @ cell, cell, np.array(pbc)))
    structures.insert(1, (np.zeros((0, 3)), np.eye(3) * 5.0, np.array([True] * 3)))  # no atoms
    structures.append((np.zeros((1, 3)), np.eye(3) * 20.0, np.array([True] * 3)))  # one atom, no neighbours
    cutoff = 4.7
    packed = packed_neighbour_lists(structures, cutoff)
    assert packed.node_offsets.tolist() == np.cumsum([0] + [len(p) for p, _, _ in structures]).tolist()
    for s, (positions, cell, pbc) in enumerate(structures):
        edges, shifts = neighbour_list(positions, cell, pbc, cutoff)
        rows = slice(packed.edge_offsets[s], packed.edge_offsets[s + 1])
        np.testing.assert_array_equal(packed.edge_index[:, rows], edges + packed.node_offsets[s])
        np.testing.assert_array_equal(packed.unit_shifts[rows], shifts)
        counts = np.bincount(edges[1], minlength=len(positions))
        assert packed.max_neighbours[s] == (counts.max() if len(positions) else 0)
    assert packed.edge_index.dtype == packed.unit_shifts.dtype == np.int64
