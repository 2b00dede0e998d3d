"""Checks on a structure before any model work: every bad input gets a clear error naming what is wrong.

The calculator calls :func:`check_structure` (elements, finite positions and cell, a usable periodic cell), then
:func:`check_edge_budget` (an estimate of the neighbour count and the memory it needs, *before* the neighbour list is
built), then :func:`check_close_pairs` on the built list (atoms closer than ``min_distance``). Units: Å and bytes.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Sequence

import numpy as np

from mace_ase.options import default_device

if TYPE_CHECKING:  # torch is imported only by the functions that need it
    import torch

# Peak memory of one energy-and-forces call per edge (forward and backward), per feature channel and byte of the
# float type, plus a fixed part (neighbour search, index/shift arrays, padded layout). Measured by peak RSS growth of
# one call (benchmarks/time_calculator.py, MP-0 medium, 128 channels, default mode, receivers in node blocks,
# 2026-12-04; benchmarks/RESULTS.md): float32 1.1 kB per edge at 8,000 Si atoms, 0.95 kB at 32,768, 0.84 kB at
# 97,336; float64 2.1-2.2 kB at 8,000-32,768. Rounded up: 2.5 B per edge, channel and byte plus 0.6 kB (1.9 kB in
# float32, 3.2 kB in float64), so that a 100,000-atom float32 call is accepted with ~10 GB free. Small graphs cost
# more per edge (2.9 / 5.6 kB at 1,000 atoms, float32 / float64: the radial tables and fixed buffers), far below any
# budget; so do the exact mode's distinct-edge tables (mace_ase.model.fused.PAIRED_TABLE_BYTES, at most 384 MB, only
# for graphs of up to ~1,000 Si atoms). The reference convolution needs ~80 B (MP-0 medium float64: 75-85 kB/edge).
_BYTES_PER_EDGE_PER_CHANNEL_ITEM = {True: 2.5, False: 80}
_BYTES_PER_EDGE_FIXED = 600
_DEFAULT_BUDGET_FRACTION = 0.8  # of the memory available now
MEMORY_LIMIT_ENV = "MACE_ASE_MEMORY_LIMIT_GB"


class InsufficientMemoryError(MemoryError):
    """The call would need more memory than the budget (CPU RAM or GPU memory); raised before allocating it."""


def _atom_list(indices: Sequence[int], limit: int = 10) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:limit])
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > limit else "")


def check_structure(numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> None:
    """Refuse atomic numbers outside 1..118, non-finite positions or cell, and a periodic cell without volume.

    A left-handed cell (negative determinant) is a valid cell: volumes are taken as absolute values.
    """
    numbers = np.asarray(numbers)
    bad = np.flatnonzero((numbers < 1) | (numbers > 118))
    if bad.size:
        raise ValueError(
            f"atomic number(s) {sorted(set(int(z) for z in numbers[bad]))} at atom(s) {_atom_list(bad)} are not "
            "chemical elements (1..118; ASE uses 0 for a dummy atom 'X'): remove those atoms"
        )
    finite = np.isfinite(positions).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(f"atom(s) {_atom_list(bad)} have non-finite positions (NaN or infinity), e.g. atom "
                         f"{bad[0]} at {positions[bad[0]].tolist()}: fix the structure before evaluating it")
    if not np.isfinite(cell).all():
        raise ValueError(f"the cell has non-finite entries (NaN or infinity): {cell.tolist()}")
    periodic = np.flatnonzero(pbc)
    if periodic.size == 0:
        return
    lengths = np.linalg.norm(cell[periodic], axis=1)
    for axis, length in zip(periodic, lengths):
        if length < 1e-6:
            raise ValueError(f"cell vector {axis} has length {length:.3g} Å but pbc[{axis}] is True: give a cell "
                             "(atoms.set_cell) or make that direction non-periodic (atoms.pbc)")
    # Volume (area, length) of the periodic lattice relative to the product of its vector lengths: ~0 means the
    # periodic vectors are (nearly) linearly dependent, so the lattice has no volume along some direction.
    vectors = cell[periodic]
    measure = math.sqrt(max(float(np.linalg.det(vectors @ vectors.T)), 0.0))
    if measure < 1e-9 * float(np.prod(lengths)):
        raise ValueError(f"the periodic cell vectors {periodic.tolist()} are linearly dependent (the cell has no "
                         f"volume): {cell.tolist()}; give a valid cell or set pbc False along the degenerate axes")


def plane_spacings(cell: np.ndarray, pbc: np.ndarray) -> list[float]:
    """Distance between neighbouring lattice planes (Å) along each periodic axis (the lattice of periodic vectors)."""
    if np.all(pbc):  # the common case, directly: V / |a_j x a_k|
        volume = abs(float(np.linalg.det(cell)))
        return [volume / float(np.linalg.norm(np.cross(cell[(k + 1) % 3], cell[(k + 2) % 3]))) for k in range(3)]
    periodic = cell[np.asarray(pbc, dtype=bool)]
    full = math.sqrt(max(float(np.linalg.det(periodic @ periodic.T)), 0.0)) if periodic.shape[0] else 1.0
    spacings = []
    for axis in range(periodic.shape[0]):
        others = np.delete(periodic, axis, axis=0)
        rest = math.sqrt(max(float(np.linalg.det(others @ others.T)), 0.0)) if others.shape[0] else 1.0
        spacings.append(full / rest)
    return spacings


# The neighbour search visits about N * prod(1 + 2 cutoff / spacing) cell images (about a microsecond each): past
# this a small or needle-like cell would take minutes, for a lattice that a reduced cell describes at once.
MAX_SEARCH_IMAGES = 2e7


def check_search_cost(n_atoms: int, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> None:
    """Refuse a periodic cell so small or skewed that the neighbour search would scan too many images."""
    spacings = plane_spacings(cell, pbc)
    cost = float(n_atoms) * math.prod(1.0 + 2.0 * cutoff / spacing for spacing in spacings)
    if cost > MAX_SEARCH_IMAGES:
        raise ValueError(
            f"the periodic cell is so small or skewed (lattice-plane spacings {[round(d, 4) for d in spacings]} Å "
            f"against a {cutoff:g} Å cutoff) that the neighbour search would scan about {cost:.2g} cell images: "
            "describe the same lattice with a compact cell first (ase.build.niggli_reduce(atoms) or "
            "atoms.cell.minkowski_reduce()), or check the cell"
        )


def estimate_edges(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> int:
    """An estimate of the number of directed edges within ``cutoff`` (Å), without building the list.

    ``N * density * (4/3) pi cutoff^3``, with the density over the periodic cell and, along non-periodic
    directions, the extent of the atoms (at least 2 cutoff); capped by ``N^2`` times the number of periodic images
    within reach. Right to within a small factor for bulk, slabs and clusters; meant to catch requests that are
    off by orders of magnitude (a tiny or very skewed cell, a huge cutoff, millions of atoms).
    """
    n = positions.shape[0]
    if n == 0:
        return 0
    periodic = cell[np.asarray(pbc, dtype=bool)]
    if periodic.shape[0] == 3:
        volume = abs(float(np.linalg.det(cell)))
    else:
        if periodic.shape[0]:
            _, _, vt = np.linalg.svd(periodic)
            complement = vt[periodic.shape[0]:]
        else:
            complement = np.eye(3)
        thickness = [max(float(np.ptp(positions @ u)), 2.0 * cutoff) for u in complement]
        basis = np.vstack([periodic] + [t * u for t, u in zip(thickness, complement)])
        volume = abs(float(np.linalg.det(basis)))
    sphere = 4.0 / 3.0 * math.pi * cutoff**3
    per_atom = n * sphere / volume
    images = 1.0
    for spacing in plane_spacings(cell, pbc):
        images *= 2 * math.ceil(cutoff / spacing) + 1
    return int(min(n * per_atom, float(n) * n * images))


def bytes_per_edge(channels: int, itemsize: int, chunked: bool = True) -> int:
    """Peak memory of one energy-and-forces call per edge (bytes), for a model with ``channels`` feature channels
    and ``itemsize``-byte floats; ``chunked``: the model uses the chunked (fused) convolution."""
    return int(_BYTES_PER_EDGE_PER_CHANNEL_ITEM[bool(chunked)] * channels * itemsize) + _BYTES_PER_EDGE_FIXED


def available_memory(device: str | torch.device = "cpu") -> int:
    """Memory available now, in bytes: on CUDA the device's free memory plus what torch's caching allocator holds
    unused; else MemAvailable (Linux) or the free pages."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse


def memory_budget(limit_gb: float | None, device: str | torch.device) -> int:
    """The budget in bytes: ``limit_gb`` if given, else ``$MACE_ASE_MEMORY_LIMIT_GB``, else 80 % of what is free."""
    if limit_gb is None and os.environ.get(MEMORY_LIMIT_ENV):
        try:
            limit_gb = float(os.environ[MEMORY_LIMIT_ENV])
        except ValueError:
            raise ValueError(f"${MEMORY_LIMIT_ENV}={os.environ[MEMORY_LIMIT_ENV]!r} is not a number of GB") from None
    if limit_gb is not None:
        if not limit_gb > 0:
            raise ValueError(f"memory_limit_gb must be positive, not {limit_gb!r}")
        return int(limit_gb * 1e9)
    return int(_DEFAULT_BUDGET_FRACTION * available_memory(device))


def check_edge_budget(n_edges: int, n_atoms: int, per_edge: int, budget: int, what: str = "estimated") -> None:
    """Refuse a call whose edges would need more than ``budget`` bytes, saying how many and how much."""
    need = n_edges * per_edge
    if need > budget:
        raise InsufficientMemoryError(
            f"{n_atoms} atoms with about {n_edges:.3g} neighbour pairs ({what}) would need about "
            f"{need / 1e9:.3g} GB, more than the {budget / 1e9:.3g} GB budget: use a smaller system or a larger cell "
            f"(a tiny or very skewed periodic cell has many images within the cutoff), default_dtype='float32', "
            f"or raise the budget with memory_limit_gb= or ${MEMORY_LIMIT_ENV}"
        )


def check_close_pairs(squared_lengths: np.ndarray, edge_index: np.ndarray, min_distance: float) -> None:
    """Refuse atoms closer than ``min_distance`` Å (the model is not meant for them; at 0 it is undefined).

    ``squared_lengths``: the squared length of every edge (Å²), so that the common case needs no square root."""
    if squared_lengths.size == 0 or min_distance <= 0:
        return
    close = np.flatnonzero(squared_lengths < min_distance * min_distance)
    if close.size == 0:
        return
    lengths = np.zeros(squared_lengths.shape)
    lengths[close] = np.sqrt(squared_lengths[close])
    first = close[np.argmin(lengths[close])]
    i, j = int(edge_index[0, first]), int(edge_index[1, first])
    pairs = {tuple(sorted((int(edge_index[0, e]), int(edge_index[1, e])))) for e in close}
    image = " (periodic images)" if i == j else ""
    raise ValueError(
        f"atoms {i} and {j}{image} are {lengths[first]:.3g} Å apart, closer than min_distance={min_distance} Å "
        f"({len(pairs)} such pair(s)): the structure is probably broken (duplicated atoms?); fix it, or lower "
        "min_distance if this is meant"
    )


def resolve_torch_device(device: str | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when this torch sees a GPU, else CPU; a CUDA request this torch cannot serve is
    refused with what to do (instead of torch's "Torch not compiled with CUDA enabled" from deep inside a call)."""
    import torch

    if device is None or device == "auto":
        return torch.device(default_device())
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a device name: use 'cpu', 'cuda', 'cuda:N' or 'auto'") from exc
    if resolved.type != "cuda":
        return resolved
    if torch.version.cuda is None:
        raise RuntimeError(
            f"device={device!r}: this torch ({torch.__version__}) was built without CUDA. Install a CUDA build of "
            "torch (pip install torch from the CUDA wheel index for your driver; see the install selector on the "
            "PyTorch website), or use device='cpu' (device='auto' picks CUDA only where it works)"
        )
    if not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r}: this torch has CUDA {torch.version.cuda} but sees no GPU (check "
                           "the driver and CUDA_VISIBLE_DEVICES), or use device='cpu' / 'auto'")
    if resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise RuntimeError(f"device={device!r}: only {torch.cuda.device_count()} GPU(s) are visible "
                           f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return resolved
