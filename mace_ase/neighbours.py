"""Neighbour lists for MACE graphs: a direct search of small structures and a linked-cell search of the rest, both
compiled (``model/kernels/neighbours.cpp``); matscipy's linked cells where the kernel cannot be built.

Convention (the one mace-torch uses): a *full* list of directed edges ``sender -> receiver`` for every pair closer
than the cutoff (strictly), both directions present, with integer lattice translations ``unit_shifts`` such that

    edge vector = positions[receiver] - positions[sender] + unit_shifts @ cell        (Å)

Periodic images of an atom itself are edges (small cells); the zero-length self pair is not. Directions with
``pbc=False`` never get a translation. Units: Å.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from matscipy.neighbours import neighbour_list as _matscipy_neighbour_list

from mace_ase.model.fused import load_kernel

__all__ = ["neighbour_list", "packed_neighbour_lists", "PackedNeighbourLists", "VerletNeighbourList"]


def _search_frame(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Positions and cell of the linked-cell searches (ours and matscipy's), which need a non-singular box and bin
    atoms inside it.

    Along each non-periodic direction the box vector is perpendicular to the periodic lattice vectors (and to the
    other box vectors) and ``spread + 2 * cutoff`` long, where ``spread`` is the extent of the atoms along it; the
    atoms are translated so that they start ``cutoff`` inside the box. The search cost therefore depends on
    the size of the structure, not on where it sits (a molecule 1e4 Å from the origin costs what it costs at the
    origin). A common translation changes no pair vector and no lattice shift, so the result is the same graph.
    Without periodicity in a direction no image is made, so the box length there only has to hold the atoms.
    """
    if pbc.all():
        return positions, cell
    box = np.array(cell, dtype=np.float64)
    basis = [box[k] for k in range(3) if pbc[k]]  # the new box vectors must be perpendicular to all of these
    translation = np.zeros(3)
    for k in range(3):
        if pbc[k]:
            continue
        direction = _orthogonal_direction(k, basis)
        heights = positions @ direction
        low, high = (float(heights.min()), float(heights.max())) if len(heights) else (0.0, 0.0)
        box[k] = (high - low + 2.0 * cutoff) * direction
        translation += (cutoff - low) * direction
        basis.append(direction)
    return positions + translation, box


def _orthogonal_direction(k: int, basis: list[np.ndarray]) -> np.ndarray:
    """A unit vector perpendicular to every vector in ``basis``: the Cartesian axis ``k`` made perpendicular
    (Gram-Schmidt), or the axis that keeps most of its length when axis ``k`` lies in their span."""
    orthonormal: list[np.ndarray] = []
    for vector in basis:
        for unit in orthonormal:
            vector = vector - vector.dot(unit) * unit
        if np.linalg.norm(vector) > 1e-8:
            orthonormal.append(vector / np.linalg.norm(vector))

    def residual(axis: int) -> np.ndarray:
        direction = np.eye(3)[axis]
        for unit in orthonormal:
            direction = direction - direction.dot(unit) * unit
        return direction

    direction = residual(k)
    if np.linalg.norm(direction) < 1e-3:
        direction = max((residual(axis) for axis in range(3)), key=np.linalg.norm)
    return direction / np.linalg.norm(direction)


def neighbour_list(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """All directed pairs closer than ``cutoff``.

    Args:
        positions: ``(n_atoms, 3)`` Å.
        cell: ``(3, 3)`` lattice vectors as rows, Å (ignored along non-periodic directions).
        pbc: ``(3,)`` periodicity flags.
        cutoff: radius in Å; pairs at exactly the cutoff are excluded.

    Returns:
        ``edge_index`` ``(2, n_edges)`` int64 (sender, receiver) and ``unit_shifts`` ``(n_edges, 3)`` int64, sorted
        by (sender, receiver, shift): one order whatever the search algorithm (see :class:`VerletNeighbourList`).

    Small structures are searched directly by the compiled kernel (see :func:`_direct_reaches`), larger ones with
    linked cells (compiled, or matscipy's without a compiler); all give the same arrays, bit for bit.
    """
    positions, cell, pbc = _as_arrays(positions, cell, pbc)
    _check_cells(cell[None], pbc[None])
    edge_index, unit_shifts, _ = _search(positions, np.array([0, len(positions)]), cell[None], pbc[None],
                                         float(cutoff))
    return edge_index, unit_shifts


@dataclass
class PackedNeighbourLists:
    """The :func:`neighbour_list` of several structures, one after another in one graph.

    Structure s owns the nodes ``node_offsets[s]:node_offsets[s + 1]`` (its atoms, in order) and the edges
    ``edge_offsets[s]:edge_offsets[s + 1]``: exactly its own list's edges, in the same order, with node indices
    shifted by ``node_offsets[s]``.
    """

    edge_index: np.ndarray      # (2, E) int64, packed node indices
    unit_shifts: np.ndarray     # (E, 3) int64
    node_offsets: np.ndarray    # (S + 1,)
    edge_offsets: np.ndarray    # (S + 1,)
    max_neighbours: np.ndarray  # (S,) each structure's largest neighbour count (0 without edges)


def packed_neighbour_lists(structures: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], cutoff: float
                           ) -> PackedNeighbourLists:
    """:func:`neighbour_list` of every ``(positions, cell, pbc)`` in ``structures``, packed (see
    :class:`PackedNeighbourLists`).

    The small structures are searched directly in one kernel call (parallel over structures), the others one by one
    with linked cells; each structure's list is exactly its :func:`neighbour_list`.
    """
    arrays = [_as_arrays(positions, cell, pbc) for positions, cell, pbc in structures]
    cells = np.array([cell for _, cell, _ in arrays]).reshape(-1, 3, 3)
    pbcs = np.array([pbc for _, _, pbc in arrays], dtype=bool).reshape(-1, 3)
    _check_cells(cells, pbcs)
    node_offsets = np.concatenate([[0], np.cumsum([len(p) for p, _, _ in arrays], dtype=np.int64)]).astype(np.int64)
    positions = np.concatenate([np.zeros((0, 3)), *(p for p, _, _ in arrays)])
    edge_index, unit_shifts, edge_offsets = _search(positions, node_offsets, cells, pbcs, float(cutoff))
    return PackedNeighbourLists(edge_index, unit_shifts, node_offsets, edge_offsets,
                                _max_neighbours(edge_index[1], node_offsets))


def _as_arrays(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.ascontiguousarray(positions, dtype=np.float64).reshape(-1, 3),
            np.ascontiguousarray(cell, dtype=np.float64).reshape(3, 3), np.asarray(pbc, dtype=bool).reshape(3))


def _check_cells(cells: np.ndarray, pbcs: np.ndarray) -> None:
    """ValueError for the first cell that is degenerate along its periodic directions (one batched SVD for the
    fully periodic ones)."""
    full = pbcs.all(axis=1)
    degenerate = np.zeros(len(cells), dtype=bool)
    if full.any():
        degenerate[full] = np.linalg.matrix_rank(cells[full], tol=1e-8) < 3
    for s in np.flatnonzero(~full & pbcs.any(axis=1)):
        degenerate[s] = np.linalg.matrix_rank(cells[s][pbcs[s]], tol=1e-8) < pbcs[s].sum()
    if degenerate.any():
        s = int(np.flatnonzero(degenerate)[0])
        raise ValueError(f"the cell {cells[s].tolist()} is degenerate along its periodic directions "
                         f"{pbcs[s].tolist()}")


def _search(positions: np.ndarray, node_offsets: np.ndarray, cells: np.ndarray, pbcs: np.ndarray, cutoff: float
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The lists of the structures packed in ``positions`` (``node_offsets``, checked ``cells`` and ``pbcs``):
    ``edge_index`` (packed node numbers), ``unit_shifts``, ``edge_offsets``."""
    reaches = _direct_reaches(positions, node_offsets, cells, pbcs, cutoff)
    direct = reaches[:, 0] >= 0
    if direct.any():
        edge_index, unit_shifts, edge_offsets = _direct_search(positions, node_offsets, cells, reaches, cutoff)
        if direct.all():
            return edge_index, unit_shifts, edge_offsets
    pieces_index, pieces_shifts = [], []  # the others' lists, in their places
    for s in range(len(cells)):
        if direct[s]:
            pieces_index.append(edge_index[:, edge_offsets[s]:edge_offsets[s + 1]])
            pieces_shifts.append(unit_shifts[edge_offsets[s]:edge_offsets[s + 1]])
        else:
            first, last = node_offsets[s], node_offsets[s + 1]
            edges, shifts = _linked_cell_search(positions[first:last], cells[s], pbcs[s], cutoff)
            pieces_index.append(edges + first)
            pieces_shifts.append(shifts)
    edge_offsets = np.concatenate([[0], np.cumsum([p.shape[1] for p in pieces_index], dtype=np.int64)])
    return (np.concatenate([np.zeros((2, 0), dtype=np.int64), *pieces_index], axis=1),
            np.concatenate([np.zeros((0, 3), dtype=np.int64), *pieces_shifts]), edge_offsets.astype(np.int64))


def _linked_cell_search(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
                        ) -> tuple[np.ndarray, np.ndarray]:
    """One structure by linked cells: the compiled search (``kernels/neighbours.cpp: cell_neighbour_search``, the
    pairs already tested and in canonical order, parallel over senders), or matscipy's search followed by our exact
    filter and sort: without the compiled kernel, for positions that are not finite (matscipy's error names them) and
    for a box so thin that the cutoff spans 1,000 of its images. Both give the same arrays, bit for bit (tested)."""
    search_positions, search_cell = _search_frame(positions, cell, pbc, cutoff)
    kernel = _kernel()
    if kernel is not None and np.isfinite(search_positions).all() and np.isfinite(search_cell).all():
        inverse = np.linalg.inv(search_cell)
        # a needle cell that passed the rank check would make the search visit millions of empty images
        if ((cutoff + _SEARCH_MARGIN) * np.linalg.norm(inverse, axis=0)).max() < _MAX_IMAGES:
            edge_index, unit_shifts = kernel.cell_neighbour_search(
                torch.from_numpy(positions), torch.from_numpy(np.ascontiguousarray(cell)),
                torch.from_numpy(np.ascontiguousarray(search_positions)), torch.from_numpy(inverse),
                torch.from_numpy(np.ascontiguousarray(pbc)), cutoff, _SEARCH_MARGIN)
            return edge_index.numpy(), unit_shifts.numpy()
    return _matscipy_search(positions, cell, pbc, cutoff, search_positions, search_cell)


def _matscipy_search(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float,
                     search_positions: np.ndarray, search_cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sender, receiver, shifts = _matscipy_neighbour_list(
        "ijS", positions=search_positions, cell=search_cell, pbc=pbc, cutoff=cutoff + _SEARCH_MARGIN
    )
    return _exact_canonical(positions, cell, sender, receiver, shifts, cutoff)


# ---------------------------------------------------------------------------------------------------------------
# Direct search of small structures (kernels/neighbours.cpp)
# ---------------------------------------------------------------------------------------------------------------

# Pair-translation tests (atoms^2 x translations) up to which a structure is searched directly. Measured on this
# project's 2-core Xeon (1 thread, cutoff 5-6 Å): the direct search is 4-14x faster than matscipy plus the exact
# filter and sort for 8-64-atom cells, 1.2-3.3x for 144 atoms (2.6e6 tests), and the two cost about the same at
# 6e6 tests (216 atoms of Si, cutoff 5 Å); non-periodic clusters of 300-900 atoms: 2.5-5x.
DIRECT_SEARCH_TESTS = 2**22
# Cell images within the cutoff along one axis past which the compiled searches leave a structure to matscipy
_MAX_IMAGES = 1e3


def _direct_reaches(positions: np.ndarray, node_offsets: np.ndarray, cells: np.ndarray, pbcs: np.ndarray,
                    cutoff: float) -> np.ndarray:
    """``[S, 3]``: for each structure, the range ``|t_k| <= reach_k`` of lattice translations that can hold a pair
    closer than ``cutoff``; a row of -1 where the structure takes the linked-cell search instead: past
    :data:`DIRECT_SEARCH_TESTS` pair tests, with positions that are not finite (the linked-cell search reports
    those), or without the compiled kernel.

    With ``f = x h^-1`` the fractional coordinates in the search box ``h`` (:func:`_search_frame`; the cell when
    fully periodic), a pair vector ``v`` has ``|f_r - f_s + t|_k <= |v| |h^-1 e_k|`` along each periodic axis k, so
    ``|t_k| < cutoff |h^-1 e_k| + span_k`` with ``span_k`` the extent of the atoms' ``f_k``.
    """
    n_structures = len(cells)
    reaches = np.full((n_structures, 3), -1, dtype=np.int64)
    if _kernel() is None or n_structures == 0:
        return reaches
    counts = np.diff(node_offsets)
    boxes = np.where(pbcs.any(axis=1)[:, None, None], cells, np.eye(3))
    for s in np.flatnonzero(~pbcs.all(axis=1) & pbcs.any(axis=1)):  # slabs, wires: a full box
        first, last = node_offsets[s], node_offsets[s + 1]
        boxes[s] = _search_frame(positions[first:last], cells[s], pbcs[s], cutoff)[1]
    inverses = np.linalg.inv(boxes)
    nonempty = np.flatnonzero(counts > 0)
    span = np.zeros((n_structures, 3))
    finite = np.ones(n_structures, dtype=bool)
    if len(nonempty):
        if n_structures == 1:
            fractional = positions @ inverses[0]
        else:
            fractional = np.einsum("ni,nij->nj", positions, np.repeat(inverses, counts, axis=0))
        starts = node_offsets[nonempty]
        span[nonempty] = np.maximum.reduceat(fractional, starts) - np.minimum.reduceat(fractional, starts)
        finite[nonempty] = np.logical_and.reduceat(np.isfinite(positions).all(axis=1), starts)
    with np.errstate(invalid="ignore"):
        bound = (cutoff + _SEARCH_MARGIN) * np.linalg.norm(inverses, axis=1) + span + 1e-9
        bound = np.where(pbcs, bound, 0.0)
        usable = finite & np.isfinite(bound).all(axis=1) & (bound.max(axis=1) < _MAX_IMAGES)
    reach = np.where(usable[:, None], np.ceil(np.where(usable[:, None], bound, 0.0)), 0).astype(np.int64)
    tests = counts.astype(np.float64) ** 2 * np.prod(2 * reach + 1, axis=1)
    usable &= tests <= DIRECT_SEARCH_TESTS
    reaches[usable] = reach[usable]
    return reaches


def _direct_search(positions: np.ndarray, node_offsets: np.ndarray, cells: np.ndarray, reaches: np.ndarray,
                   cutoff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The lists of every structure whose ``reaches`` row is not negative, packed (edge_index, unit_shifts,
    edge_offsets; structures with a negative row get no edges)."""
    edge_index, unit_shifts, edge_offsets = _kernel().direct_neighbour_search(
        torch.from_numpy(positions), torch.from_numpy(cells), torch.from_numpy(node_offsets.astype(np.int64)),
        torch.from_numpy(reaches), cutoff)
    return edge_index.numpy(), unit_shifts.numpy(), edge_offsets.numpy()


def _kernel():
    return load_kernel()[0]


def _max_neighbours(receiver: np.ndarray, node_offsets: np.ndarray) -> np.ndarray:
    """Each structure's largest receiver count (0 for a structure without edges or atoms)."""
    counts = np.bincount(receiver, minlength=int(node_offsets[-1]))
    out = np.zeros(len(node_offsets) - 1, dtype=np.int64)
    nonempty = np.flatnonzero(np.diff(node_offsets) > 0)
    if len(nonempty):
        out[nonempty] = np.maximum.reduceat(counts, node_offsets[nonempty])
    return out


# ---------------------------------------------------------------------------------------------------------------
# One edge set, one order: what makes a cached (Verlet) list give bit-identical results to a fresh one
# ---------------------------------------------------------------------------------------------------------------

# The backend searches slightly beyond the cutoff; which pairs are kept is then decided by our own arithmetic
# (_squared_lengths), the same for a fresh list and for a filtered Verlet list, so both hold exactly the same pairs.
_SEARCH_MARGIN = 1e-6  # Å, far above the backend's rounding error


def _squared_lengths(positions: np.ndarray, cell: np.ndarray, edge_index: np.ndarray, shift_vectors: np.ndarray
                     ) -> np.ndarray:
    # element-wise ufuncs only (no BLAS): the value for an edge never depends on how many edges there are
    vectors = positions[edge_index[1]] - positions[edge_index[0]] + shift_vectors
    return vectors[:, 0] * vectors[:, 0] + vectors[:, 1] * vectors[:, 1] + vectors[:, 2] * vectors[:, 2]


def _shift_vectors(unit_shifts: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """``unit_shifts @ cell``, element-wise (the value of a row never depends on the other rows), computed once per
    possible shift (a few dozen) and gathered."""
    if len(unit_shifts) == 0:
        return np.zeros((0, 3))
    reach = int(np.abs(unit_shifts).max())
    base = 2 * reach + 1
    if base**3 > len(unit_shifts):  # huge shifts (a cutoff many cells long): direct
        table, index = unit_shifts.astype(np.float64), slice(None)
    else:
        table = _shift_grid(reach)
        index = ((unit_shifts[:, 0] + reach) * base + unit_shifts[:, 1] + reach) * base + unit_shifts[:, 2] + reach
    table = table[:, 0:1] * cell[0] + table[:, 1:2] * cell[1] + table[:, 2:3] * cell[2]
    return table[index]


@functools.lru_cache(maxsize=8)
def _shift_grid(reach: int) -> np.ndarray:
    """Every shift with components in ``[-reach, reach]`` as floats, row ``((s0 + r) b + s1 + r) b + s2 + r``
    (``b = 2 reach + 1``); cached (read-only): making it was a tenth of the cost of a small structure's list."""
    grid = np.arange(-reach, reach + 1, dtype=np.float64)
    table = np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), axis=-1).reshape(-1, 3)
    table.flags.writeable = False
    return table


def _exact_canonical(positions: np.ndarray, cell: np.ndarray, sender: np.ndarray, receiver: np.ndarray,
                     shifts: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """The pairs strictly closer than ``cutoff`` (zero-length self pairs dropped), sorted by (sender, receiver,
    shift): the order of the sums in the model then never depends on the search algorithm or its bin size."""
    edge_index = np.stack([sender, receiver]).astype(np.int64)
    shifts = shifts.astype(np.int64)
    keep = _squared_lengths(positions, cell, edge_index, _shift_vectors(shifts, cell)) < cutoff * cutoff
    keep &= ~((edge_index[0] == edge_index[1]) & ~shifts.any(axis=1))
    edge_index, shifts = edge_index[:, keep], shifts[keep]
    order = _canonical_order(edge_index, shifts, len(positions))
    return np.ascontiguousarray(edge_index[:, order]), np.ascontiguousarray(shifts[order])


def _canonical_order(edge_index: np.ndarray, shifts: np.ndarray, n_atoms: int) -> np.ndarray:
    if edge_index.shape[1] == 0:
        return np.zeros(0, dtype=np.int64)
    reach = int(np.abs(shifts).max())
    base = 2 * reach + 1
    if float(n_atoms) ** 2 * base**3 < 2.0**62:  # one int64 key (the backend's output is already nearly sorted)
        code = ((shifts[:, 0] + reach) * base + shifts[:, 1] + reach) * base + shifts[:, 2] + reach
        key = (edge_index[0] * n_atoms + edge_index[1]) * base**3 + code
        return np.argsort(key, kind="stable")
    return np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], edge_index[1], edge_index[0]))


class VerletNeighbourList:
    """A neighbour list with a skin, for MD and relaxations: rebuilt only when it could have missed a pair.

    The list is built with ``cutoff + skin`` and, at every call, the pairs closer than ``cutoff`` are picked out of
    it. It is rebuilt when the number of atoms, the atomic numbers or ``pbc`` changed, or when the largest atomic
    displacement since the last build ``delta`` (measured in the cell of the last build) and the cell's strain
    could bring a pair from beyond ``cutoff + skin`` to within ``cutoff``: the test is
    ``2 delta + cutoff (1/s_min - 1) < skin`` with ``s_min`` the smallest singular value of ``h0^-1 h`` (1 for an
    unchanged cell, so the rule is then "an atom moved more than half the skin"). With a non-periodic direction
    any change of the cell rebuilds. Wrapping atoms back into the cell counts as a large move (it rebuilds).

    The result is exactly :func:`neighbour_list` at ``cutoff`` (same pairs, same order, same arrays), so a model
    gives bit-identical energies and forces with any skin; only the cost changes. ``skin=0`` searches afresh at
    every call. Units: Å.

    Attributes:
        builds: how many times the list was searched (diagnostics, tests).
        version: changes whenever the returned edge set changes (callers may cache tensors made from it).
    """

    def __init__(self, cutoff: float, skin: float = 0.0) -> None:
        if not (np.isfinite(cutoff) and cutoff > 0):
            raise ValueError(f"cutoff must be a positive length in Å, got {cutoff!r}")
        if not (np.isfinite(skin) and skin >= 0):
            raise ValueError(f"skin must be a length >= 0 in Å, got {skin!r}")
        self.cutoff = float(cutoff)
        self.skin = float(skin)
        self.builds = 0
        self.version = 0
        self._reference: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._edges: tuple[np.ndarray, np.ndarray] | None = None  # the list at cutoff + skin
        self._shift_vectors: np.ndarray | None = None
        self._shift_cell: np.ndarray | None = None
        self._mask: np.ndarray | None = None
        self._result: tuple[np.ndarray, np.ndarray] | None = None

    def reset(self) -> None:
        """Forget the cached list (the next call searches afresh)."""
        self._reference = self._edges = self._shift_vectors = self._shift_cell = self._mask = self._result = None

    def update(self, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, numbers: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """``edge_index`` ``(2, E)`` (sender, receiver) and ``unit_shifts`` ``(E, 3)``, as :func:`neighbour_list`.

        The arrays returned are shared with the cache: treat them as read-only.
        """
        positions = np.ascontiguousarray(positions, dtype=np.float64)
        cell = np.array(cell, dtype=np.float64).reshape(3, 3)
        pbc = np.asarray(pbc, dtype=bool).reshape(3)
        numbers = np.zeros(len(positions), dtype=np.int64) if numbers is None else np.asarray(numbers).copy()
        if not np.isfinite(positions).all():  # also keeps nan away from the search, which is very slow on it
            bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
            raise ValueError(f"positions of atom(s) {bad[:10].tolist()} are not finite (nan or inf)")
        if not np.isfinite(cell).all():
            raise ValueError(f"the cell {cell.tolist()} is not finite (nan or inf)")
        if self.skin == 0.0:
            self.builds += 1
            self.version += 1
            return neighbour_list(positions, cell, pbc, self.cutoff)
        if self._must_rebuild(positions, cell, pbc, numbers):
            self.reset()
            self._edges = neighbour_list(positions, cell, pbc, self.cutoff + self.skin)
            self._reference = (positions.copy(), cell.copy(), pbc.copy(), numbers)
            self.builds += 1
        edge_index, shifts = self._edges
        if self._shift_cell is None or not np.array_equal(cell, self._shift_cell):
            self._shift_vectors, self._shift_cell = _shift_vectors(shifts, cell), cell.copy()
        mask = _squared_lengths(positions, cell, edge_index, self._shift_vectors) < self.cutoff * self.cutoff
        if self._result is None or not np.array_equal(mask, self._mask):
            self._mask = mask
            self._result = (np.ascontiguousarray(edge_index[:, mask]), np.ascontiguousarray(shifts[mask]))
            self.version += 1
        return self._result

    def _must_rebuild(self, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, numbers: np.ndarray) -> bool:
        if self._reference is None:
            return True
        positions0, cell0, pbc0, numbers0 = self._reference
        if len(positions) != len(positions0) or not np.array_equal(pbc, pbc0) or not np.array_equal(numbers,
                                                                                                      numbers0):
            return True
        allowance = self.skin * (1.0 - 1e-9) - 1e-9  # room for the backend's rounding at cutoff + skin
        if np.array_equal(cell, cell0):
            mapped, strain = positions, 0.0
        elif not pbc.all():
            return True
        else:
            try:
                deformation = np.linalg.solve(cell0, cell)  # h0^-1 h (rows are lattice vectors)
                mapped = np.linalg.solve(deformation.T, positions.T).T  # x h^-1 h0: positions in the old cell
            except np.linalg.LinAlgError:
                return True
            smallest = float(np.linalg.svd(deformation, compute_uv=False).min())
            strain = self.cutoff * (1.0 / smallest - 1.0) if smallest > 0 else np.inf
        if len(positions) == 0:
            return False
        delta = float(np.sqrt(np.max(np.sum((mapped - positions0) ** 2, axis=1))))
        return not (2.0 * delta + strain < allowance)  # written so that nan rebuilds
