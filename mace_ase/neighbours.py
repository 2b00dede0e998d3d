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


def _cell_for_search(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> np.ndarray:
    """matscipy needs a non-singular cell; along non-periodic directions any box larger than the system works.

    The box vector along a non-periodic direction is chosen perpendicular to the periodic ones and longer than the
    extent of the atoms plus the cutoff, so that no spurious image can come within the cutoff.
    """
    if pbc.all():
        return cell
    extent = float(np.abs(positions).max(initial=0.0)) + 1.0
    length = 5.0 * (extent + cutoff)
    box = np.array(cell, dtype=np.float64)
    periodic = [box[k] for k in range(3) if pbc[k]]
    for k in range(3):
        if pbc[k]:
            continue
        direction = np.eye(3)[k]
        for vector in periodic:  # make it perpendicular to the periodic lattice vectors (Gram-Schmidt)
            unit = vector / np.linalg.norm(vector)
            direction = direction - direction.dot(unit) * unit
        if np.linalg.norm(direction) < 1e-8:  # e_k lies in the periodic plane: take the normal of that plane
            direction = np.cross(periodic[0], periodic[1]) if len(periodic) == 2 else np.eye(3)[(k + 1) % 3]
        box[k] = length * direction / np.linalg.norm(direction)
        periodic.append(box[k])
    return box


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
    search_cell = _cell_for_search(positions, cell, pbc, cutoff)
    sender, receiver, shifts = _matscipy_neighbour_list(
        "ijS", positions=positions, cell=search_cell, pbc=pbc, cutoff=float(cutoff)
    )
    keep = ~((sender == receiver) & ~shifts.any(axis=1))
    edge_index = np.stack([sender[keep], receiver[keep]]).astype(np.int64)
    return edge_index, shifts[keep].astype(np.int64)
