"""Neighbour lists for MACE graphs (matscipy's linked-cell algorithm).

Convention (the one mace-torch uses): a *full* list of directed edges ``sender -> receiver`` for every pair closer
than the cutoff (strictly), both directions present, with integer lattice translations ``unit_shifts`` such that

    edge vector = positions[receiver] - positions[sender] + unit_shifts @ cell        (Å)

Periodic images of an atom itself are edges (small cells); the zero-length self pair is not. Directions with
``pbc=False`` never get a translation. Units: Å.
"""

from __future__ import annotations

import numpy as np
from matscipy.neighbours import neighbour_list as _matscipy_neighbour_list

__all__ = ["neighbour_list"]


def _search_frame(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Positions and cell for matscipy, which needs a non-singular cell and bins atoms inside it.

    Along each non-periodic direction the box vector is a unit vector perpendicular to the periodic lattice vectors
    (and to the other box vectors), ``spread + 2 * cutoff`` long, where ``spread`` is the extent of the atoms along
    it; the atoms are translated so that they start ``cutoff`` inside the box. The search cost therefore depends on
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
        ``edge_index`` ``(2, n_edges)`` int64 (sender, receiver) and ``unit_shifts`` ``(n_edges, 3)`` int64.
    """
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    if pbc.any() and np.linalg.matrix_rank(cell[pbc], tol=1e-8) < pbc.sum():
        raise ValueError(f"the cell {cell.tolist()} is degenerate along its periodic directions {pbc.tolist()}")
    search_positions, search_cell = _search_frame(positions, cell, pbc, float(cutoff))
    sender, receiver, shifts = _matscipy_neighbour_list(
        "ijS", positions=search_positions, cell=search_cell, pbc=pbc, cutoff=float(cutoff)
    )
    keep = ~((sender == receiver) & ~shifts.any(axis=1))
    edge_index = np.stack([sender[keep], receiver[keep]]).astype(np.int64)
    return edge_index, shifts[keep].astype(np.int64)
