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


# ---------------------------------------------------------------------------------------------------------------
# The direct search of small structures (compiled) against the linked-cell search: the same arrays, bit for bit
# ---------------------------------------------------------------------------------------------------------------


def _both_searches(positions, cell, pbc, cutoff):
    from mace_ase import neighbours

    positions, cell, pbc = neighbours._as_arrays(positions, cell, pbc)
    offsets = np.array([0, len(positions)])
    reach = neighbours._direct_reaches(positions, offsets, cell[None], pbc[None], cutoff)
    assert (reach >= 0).all(), "this structure should take the direct search"
    direct = neighbours._direct_search(positions, offsets, cell[None], reach, cutoff)
    return direct[:2], neighbours._linked_cell_search(positions, cell, pbc, cutoff)


def _agree_on_random_cells(search_pair, pbc, seed: int, structures: int, atoms: tuple[int, int],
                           scales: tuple[float, ...]) -> int:
    """Runs ``search_pair`` (two searches of one structure) on random triclinic cells, atoms up to a cell length
    outside the cell, and cutoffs placed exactly on a pair's length and one float step either side of it; asserts
    that both give the same arrays and returns how many pairs were compared."""
    rng = np.random.default_rng(seed)
    checked = 0
    for _ in range(structures):
        cell = random_cell(rng) * rng.choice(scales)
        positions = rng.uniform(-1.0, 2.0, (int(rng.integers(*atoms)), 3)) @ cell
        cutoffs = [float(rng.uniform(1.0, 8.0))]
        if len(positions) > 1:
            length = float(np.linalg.norm(positions[1] - positions[0] + np.array(pbc, dtype=float) @ cell))
            cutoffs += [length, float(np.nextafter(length, 0.0)), float(np.nextafter(length, 20.0))]
        for cutoff in cutoffs:
            (edges, shifts), (edges_ref, shifts_ref) = search_pair(positions, cell, pbc, cutoff)
            np.testing.assert_array_equal(edges, edges_ref)
            np.testing.assert_array_equal(shifts, shifts_ref)
            assert edges.dtype == shifts.dtype == np.int64
            checked += edges.shape[1]
    return checked


@pytest.mark.parametrize("pbc", list(itertools.product([False, True], repeat=3)), ids=str)
def test_direct_search_is_the_linked_cell_search_bit_for_bit(pbc):
    """Cells smaller than the cutoff (many images): the pairs at the cutoff are decided by the same arithmetic in
    both searches."""
    assert _agree_on_random_cells(_both_searches, pbc, sum(pbc) * 17 + 3, 12, (1, 30), (1.0,)) > 1000


def test_direct_search_edge_cases():
    """No atoms, one atom alone and with its own images, two atoms on the same spot, a slab without a third vector."""
    cases = [(np.zeros((0, 3)), np.eye(3) * 4.0, [True] * 3, 5.0),
             (np.zeros((1, 3)), np.eye(3) * 20.0, [True] * 3, 5.0),
             (np.zeros((1, 3)), np.eye(3) * 2.0, [True] * 3, 5.0),
             (np.zeros((2, 3)), np.eye(3) * 3.0, [True, False, True], 4.0),
             (np.random.default_rng(2).uniform(0, 3.5, (7, 3)), [[3.9, 0, 0], [1.2, 3.5, 0], [0, 0, 0]],
              [True, True, False], 5.0)]
    for positions, cell, pbc, cutoff in cases:
        (edges, shifts), (edges_ref, shifts_ref) = _both_searches(positions, cell, pbc, cutoff)
        np.testing.assert_array_equal(edges, edges_ref)
        np.testing.assert_array_equal(shifts, shifts_ref)
    (edges, _), _ = _both_searches(np.zeros((1, 3)), np.eye(3) * 2.0, [True] * 3, 5.0)
    # the images of one atom closer than 5 Å in a 2 Å cube: the 81 integer vectors with t.t <= 6, less t = 0
    assert edges.shape[1] == 80


def _compiled_and_matscipy(positions, cell, pbc, cutoff):
    from mace_ase import neighbours

    positions, cell, pbc = neighbours._as_arrays(positions, cell, pbc)
    frame = neighbours._search_frame(positions, cell, pbc, cutoff)
    return (neighbours._linked_cell_search(positions, cell, pbc, cutoff),
            neighbours._matscipy_search(positions, cell, pbc, cutoff, *frame))


@pytest.mark.parametrize("pbc", list(itertools.product([False, True], repeat=3)), ids=str)
def test_compiled_linked_cells_are_matscipy_bit_for_bit(pbc):
    """The compiled linked-cell search (kernels/neighbours.cpp) against matscipy's search plus our exact filter and
    sort, on cells smaller and larger than the cutoff."""
    assert _agree_on_random_cells(_compiled_and_matscipy, pbc, sum(pbc) * 29 + 5, 10, (0, 120), (1.0, 3.0)) > 10000


def test_compiled_linked_cells_on_crystals_slabs_and_molecules():
    """Many bins: a 1,000-atom crystal, a slab with vacuum, a molecule far from the origin, no atoms at all."""
    from ase.build import bulk, fcc111

    crystal = bulk("Si", "diamond", a=5.43, cubic=True).repeat((5, 5, 5))
    crystal.rattle(0.05, seed=0)
    slab = fcc111("Cu", (6, 6, 4), vacuum=8.0)
    slab.rattle(0.05, seed=1)
    far = molecule("C60")
    far.positions += 1.0e4
    cases = [(crystal.positions, crystal.cell.array, crystal.pbc, 6.0), (slab.positions, slab.cell.array, slab.pbc, 5.5),
             (far.positions, np.zeros((3, 3)), far.pbc, 5.0), (np.zeros((0, 3)), np.eye(3) * 9.0, [True] * 3, 4.0)]
    for positions, cell, pbc, cutoff in cases:
        (edges, shifts), (edges_ref, shifts_ref) = _compiled_and_matscipy(positions, cell, pbc, cutoff)
        np.testing.assert_array_equal(edges, edges_ref)
        np.testing.assert_array_equal(shifts, shifts_ref)
    assert _compiled_and_matscipy(*cases[0])[0][0].shape[1] > 40_000  # Si at r_max 6 Å: ~45 neighbours each


def test_neighbour_list_searches_small_structures_directly_and_large_ones_with_linked_cells(monkeypatch):
    from mace_ase import neighbours

    calls = []
    linked = neighbours._linked_cell_search
    monkeypatch.setattr(neighbours, "_linked_cell_search", lambda *a: calls.append(len(a[0])) or linked(*a))
    small = Atoms("Cu4", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]],
                  cell=np.eye(3) * 3.61, pbc=True).repeat((2, 2, 2))
    large = small.repeat((4, 4, 4))  # 2,048 atoms: past DIRECT_SEARCH_TESTS
    neighbour_list(small.positions, small.cell.array, small.pbc, 5.5)
    assert calls == []
    reference, _ = neighbour_list(large.positions, large.cell.array, large.pbc, 5.5)
    assert calls == [len(large)]
    # a mixed pack: each structure takes its own search, and the packed result is the per-structure lists
    packed = packed_neighbour_lists([(a.positions, a.cell.array, a.pbc) for a in (small, large, small)], 5.5)
    assert calls == [len(large), len(large)]
    rows = slice(packed.edge_offsets[1], packed.edge_offsets[2])
    np.testing.assert_array_equal(packed.edge_index[:, rows] - len(small), reference)
    np.testing.assert_array_equal(packed.edge_index[:, packed.edge_offsets[2]:] - len(small) - len(large),
                                  packed.edge_index[:, :packed.edge_offsets[1]])


def test_without_the_compiled_kernel_every_structure_takes_the_linked_cell_search(monkeypatch):
    from mace_ase import neighbours

    rng = np.random.default_rng(5)
    cell = random_cell(rng)
    structures = [(rng.uniform(0, 1, (n, 3)) @ cell, cell, np.array([True, True, n % 2 == 0])) for n in (3, 8, 13)]
    fast = [neighbour_list(*s, 4.5) for s in structures]
    packed_fast = packed_neighbour_lists(structures, 4.5)
    monkeypatch.setattr(neighbours, "_kernel", lambda: None)
    monkeypatch.setattr(neighbours, "_direct_search", None)  # never called
    for s, (edges, shifts) in zip(structures, fast):
        edges_ref, shifts_ref = neighbour_list(*s, 4.5)
        np.testing.assert_array_equal(edges, edges_ref)
        np.testing.assert_array_equal(shifts, shifts_ref)
    packed = packed_neighbour_lists(structures, 4.5)
    np.testing.assert_array_equal(packed.edge_index, packed_fast.edge_index)
    np.testing.assert_array_equal(packed.unit_shifts, packed_fast.unit_shifts)
