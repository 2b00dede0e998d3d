"""Batched evaluation: many structures per model call, for screening.

    >>> from mace_ase import evaluate
    >>> results = evaluate(list_of_atoms, model="models/emt-demo.model")       # doctest: +SKIP
    >>> results.energies[0], results.forces[0], results.stresses[0]              # doctest: +SKIP

Structures are packed into one graph with disjoint node sets (node k of structure s gets index offset_s + k), so one
call of :meth:`MACE.energy_and_edge_gradients` evaluates a whole batch: energies per structure are an ``index_add``
of node energies over the batch vector, forces are the usual edge sums, and the virial of each structure is the sum
of ``r_e (x) dE/dr_e`` over its own edges. The answers are those of one :class:`~mace_ase.MACECalculator` call per
structure (to rounding: 1e-12 eV in float64).

Batches are sized from a memory estimate: the model's work is laid out as a padded ``[N, K]`` edge grid (N nodes,
K = the largest neighbour count in the batch), so a batch costs about ``N * K * bytes_per_edge`` (see
:func:`bytes_per_padded_edge`). The budget is half the free GPU memory on CUDA, and a quarter of the available RAM
(at most 4 GiB) on the CPU, unless ``memory_budget`` says otherwise. ``batch_size`` caps the structures per batch.
In the ``radial="exact"`` mode on the CPU a batch also stays small enough for the radial MLP to run once per
distinct edge (:func:`mace_ase.model.fused.distinct_table_edges`: about 160,000 edges for the emt-demo model in
float64, 56,000 for MPA-0 medium in float32).

Units: eV, Å, eV/Å, eV/Å³ (ASE's). Stress in Voigt order (xx, yy, zz, yz, xz, xy), ASE sign, only for fully
periodic structures (``None`` otherwise).
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from ase import Atoms
from ase.data import chemical_symbols
from ase.stress import full_3x3_to_voigt_6_stress

from mace_ase.model.build import load_model, resolve_dtype
from mace_ase.model.fused import distinct_table_edges
from mace_ase.model.mace import MACE
from mace_ase.model.radial_spline import check_radial, current_radial, effective_radial, set_radial
from mace_ase.neighbours import neighbour_list
from mace_ase.options import resolve_device

log = logging.getLogger(__name__)

__all__ = ["BatchResults", "evaluate", "bytes_per_padded_edge"]

_CPU_BUDGET_CAP = 4 * 1024**3


@dataclass
class BatchResults:
    """Results of :func:`evaluate`, one entry per input structure, in input order.

    ``energies`` ``[n]`` eV (with the isolated-atom energies E0, as ``atoms.get_potential_energy()``);
    ``forces[s]`` ``[n_atoms_s, 3]`` eV/Å; ``stresses[s]`` ``(6,)`` Voigt eV/Å³ or ``None`` when structure s is not
    fully periodic; ``node_energies[s]`` ``[n_atoms_s]`` eV (E0 included, as ASE's ``energies``); ``n_batches``
    the number of model calls used.
    """

    energies: np.ndarray
    forces: list[np.ndarray]
    stresses: list[Optional[np.ndarray]]
    node_energies: list[np.ndarray]
    n_batches: int = 0
    batch_sizes: list[int] = field(default_factory=list)


def bytes_per_padded_edge(model: MACE) -> int:
    """Estimated peak memory (bytes) per slot of the padded ``[N, K]`` edge grid, forward and backward.

    Counts, for every interaction, the radial MLP activations, the per-path radial weights, the gathered sender
    features, the weighted features and the coupled spherical harmonics of each path; the backward pass keeps
    about as much again. A deliberate over-estimate (factor 2 on top) so that the first batch does not run out.
    """
    itemsize = model.embedding.dtype.itemsize
    channels = int(model.embedding.shape[1])
    floats = 16 + (model.max_ell + 1) ** 2  # lengths, radial basis, envelope, spherical harmonics
    for interaction in model.interactions:
        widths = [int(w.shape[1]) for w in getattr(interaction.radial_mlp, "weights", [])]
        floats += sum(widths)
        paths = list(getattr(interaction, "paths", []))
        floats += sum(interaction.input_dims) * channels  # gathered sender features
        for path in paths:
            floats += path.in_dim * channels + path.in_dim * path.out_dim
    return int(itemsize * floats * 2 * 2)


def _memory_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.5 * free)
    available = _CPU_BUDGET_CAP * 4
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return int(min(0.25 * available, _CPU_BUDGET_CAP))


@dataclass
class _Graph:
    species: np.ndarray       # [n] model species index
    edge_index: np.ndarray    # [2, E] (sender, receiver)
    unit_shifts: np.ndarray   # [E, 3]
    max_neighbours: int
    periodic: bool


def _resolve_model(model, device: torch.device, dtype: torch.dtype, radial: str) -> MACE:
    if isinstance(model, MACE):
        model = model.to(device=device, dtype=dtype).eval()
        if current_radial(model) != effective_radial(model, radial):  # another radial mode: on a copy, never in place
            model = copy.deepcopy(model)
            set_radial(model, radial)
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_model(model, device=device, dtype=dtype, radial=radial)
    raise TypeError(f"model must be a .model path or a loaded MACE module, not {type(model).__name__}")


def evaluate(structures: Sequence[Atoms], model, batch_size: Optional[int] = None, device: Optional[str] = None,
             dtype: str = "float64", head: Optional[str] = None, memory_budget: Optional[int] = None,
             radial: str = "auto") -> BatchResults:
    """Energies, forces and stresses of many structures, several per model call.

    Args:
        structures: ASE ``Atoms`` (any mix of sizes, elements, periodicity; each needs a non-zero-volume cell when
            fully periodic).
        model: path of a ``.model`` file or a loaded :class:`~mace_ase.model.mace.MACE` (moved to ``device``/``dtype``).
        batch_size: at most this many structures per model call (``None``: as many as the memory budget allows).
        device: ``"cpu"``, ``"cuda"``/``"cuda:N"``; ``None`` picks CUDA when available.
        dtype: ``"float64"`` or ``"float32"``.
        head: head of a multi-head model (``None``: the only head, or "Default").
        memory_budget: bytes one batch may use (default: see the module docstring).
        radial: ``"auto"`` (default), ``"exact"`` or ``"spline"``: the radial weights, as in
            :class:`~mace_ase.calculator.MACECalculator`.

    Returns:
        :class:`BatchResults` (eV, eV/Å, eV/Å³).

    Raises:
        ValueError: an element the model does not know (naming the structure), a degenerate periodic cell, or a
            bad ``batch_size``.
    """
    if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    structures = list(structures)
    if not all(isinstance(a, Atoms) for a in structures):
        raise TypeError("structures must be a sequence of ase.Atoms")
    torch_device = torch.device(resolve_device(device))
    torch_dtype = resolve_dtype(dtype)
    net = _resolve_model(model, torch_device, torch_dtype, check_radial(radial))
    head_index = _select_head(list(net.heads), head)
    species_of_z = np.full(119, -1, dtype=np.int64)
    known = net.atomic_numbers.cpu().numpy()
    species_of_z[known] = np.arange(len(known))

    graphs = [_graph(atoms, index, net, species_of_z, known) for index, atoms in enumerate(structures)]
    budget = int(memory_budget) if memory_budget is not None else _memory_budget(torch_device)
    per_edge = bytes_per_padded_edge(net)
    # exact mode on the CPU: batches whose radial MLP runs once per distinct edge (2x less work than per chunk)
    edge_cap = distinct_table_edges(net) if torch_device.type == "cpu" else None

    n = len(structures)
    results = BatchResults(energies=np.zeros(n), forces=[np.zeros((0, 3))] * n, stresses=[None] * n,
                           node_energies=[np.zeros(0)] * n)
    start = 0
    while start < n:
        stop = start + 1
        nodes, k_max = len(graphs[start].species), max(graphs[start].max_neighbours, 1)
        edges = graphs[start].edge_index.shape[1]
        while stop < n and (batch_size is None or stop - start < batch_size):
            nodes_next = nodes + len(graphs[stop].species)
            k_next = max(k_max, graphs[stop].max_neighbours, 1)
            edges_next = edges + graphs[stop].edge_index.shape[1]
            if nodes_next * k_next * per_edge > budget or (edge_cap is not None and edges_next > edge_cap):
                break
            nodes, k_max, edges, stop = nodes_next, k_next, edges_next, stop + 1
        _evaluate_batch(net, structures, graphs, range(start, stop), head_index, torch_device, torch_dtype, results)
        results.n_batches += 1
        results.batch_sizes.append(stop - start)
        start = stop
    log.debug("evaluated %d structures in %d batches", n, results.n_batches)
    return results


def _select_head(heads: list[str], head: Optional[str]) -> int:
    if head is None:
        if len(heads) == 1:
            return 0
        lowered = [name.lower() for name in heads]
        if "default" in lowered:
            return lowered.index("default")
        raise ValueError(f"this model has several heads {heads}; choose one with head=")
    if head not in heads:
        raise ValueError(f"unknown head {head!r}; this model has heads {heads}")
    return heads.index(head)


def _graph(atoms: Atoms, index: int, net: MACE, species_of_z: np.ndarray, known: np.ndarray) -> _Graph:
    numbers = atoms.numbers
    species = species_of_z[np.clip(numbers, 0, 118)]
    if (species < 0).any() or (numbers > 118).any():
        missing = sorted(set(int(z) for z, s in zip(numbers, species) if s < 0))
        raise ValueError(f"structure {index}: the model has no parameters for element(s) "
                         f"{', '.join(chemical_symbols[z] for z in missing)}; it knows "
                         f"{', '.join(chemical_symbols[int(z)] for z in known)}")
    periodic = bool(atoms.pbc.all())
    if periodic and atoms.cell.volume < 1e-9:
        raise ValueError(f"structure {index} is periodic but its cell has zero volume")
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    edge_index, unit_shifts = neighbour_list(atoms.positions, cell, atoms.pbc, net.r_max_value)
    counts = np.bincount(edge_index[1], minlength=len(atoms)) if edge_index.shape[1] else np.zeros(1, dtype=int)
    return _Graph(species, edge_index, unit_shifts, int(counts.max()) if len(counts) else 0, periodic)


def _evaluate_batch(net: MACE, structures: Sequence[Atoms], graphs: list[_Graph], members: range, head: int,
                    device: torch.device, dtype: torch.dtype, results: BatchResults) -> None:
    as_float = dict(device=device, dtype=dtype)
    vectors, edges, species, node_batch, edge_batch, cells = [], [], [], [], [], []
    offset = 0
    for slot, s in enumerate(members):
        atoms, graph = structures[s], graphs[s]
        positions = torch.as_tensor(atoms.positions, **as_float)
        cell = torch.as_tensor(np.asarray(atoms.cell.array, dtype=np.float64), **as_float)
        edge_index = torch.as_tensor(graph.edge_index, device=device)
        shifts = torch.as_tensor(graph.unit_shifts, **as_float)
        # the same expression as MACE.forward, per structure, so that the vectors are bitwise those of one call each
        vectors.append(positions[edge_index[1]] - positions[edge_index[0]] + shifts @ cell)
        edges.append(edge_index + offset)
        species.append(torch.as_tensor(graph.species, device=device))
        node_batch.append(torch.full((len(graph.species),), slot, dtype=torch.long, device=device))
        edge_batch.append(torch.full((graph.edge_index.shape[1],), slot, dtype=torch.long, device=device))
        cells.append(cell)
        offset += len(graph.species)
    vectors_all = torch.cat(vectors)
    edge_index_all = torch.cat(edges, dim=1)
    species_all = torch.cat(species)
    nodes_of, edges_of = torch.cat(node_batch), torch.cat(edge_batch)
    n_struct = len(members)

    node_inter, edge_grad = net.energy_and_edge_gradients(vectors_all, edge_index_all, species_all, head)
    node_e0 = net.atomic_energies[head][species_all].to(torch.float64)
    node_total = node_e0 + node_inter.to(torch.float64)
    # as MACE.forward: sum of E0 plus sum of interaction energies, each summed per structure
    energy = (torch.zeros(n_struct, dtype=torch.float64, device=device).index_add(0, nodes_of, node_e0)
              + torch.zeros(n_struct, dtype=node_inter.dtype, device=device).index_add(0, nodes_of, node_inter)
              .to(torch.float64))
    sender, receiver = edge_index_all[0], edge_index_all[1]
    forces = (torch.zeros(offset, 3, **as_float).index_add(0, sender, edge_grad).index_add(0, receiver, -edge_grad))
    edge_virial = vectors_all.unsqueeze(2) * edge_grad.unsqueeze(1)  # [E, 3, 3] r_e (x) g_e
    virial = torch.zeros(n_struct, 3, 3, **as_float).index_add(0, edges_of, edge_virial)

    energy_np = energy.detach().cpu().numpy()
    forces_np = forces.detach().cpu().to(torch.float64).numpy()
    virial_np = virial.detach().cpu().to(torch.float64).numpy()
    node_np = node_total.detach().cpu().numpy()
    start = 0
    for slot, s in enumerate(members):
        count = len(graphs[s].species)
        results.energies[s] = energy_np[slot]
        results.forces[s] = forces_np[start:start + count]
        results.node_energies[s] = node_np[start:start + count]
        if graphs[s].periodic:
            v = 0.5 * (virial_np[slot] + virial_np[slot].T)
            results.stresses[s] = full_3x3_to_voigt_6_stress(v / abs(np.linalg.det(cells[slot].cpu().to(
                torch.float64).numpy())))
        start += count
