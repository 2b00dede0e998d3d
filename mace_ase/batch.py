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
from torch import Tensor

from mace_ase.model.build import load_model, resolve_dtype
from mace_ase.model.fused import distinct_table_edges
from mace_ase.model.mace import MACE
from mace_ase.model.radial_spline import check_radial, current_radial, effective_radial, set_radial
from mace_ase.neighbours import PackedNeighbourLists, packed_neighbour_lists
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
class _Graphs:
    """Every structure's graph, packed one after another (see :class:`~mace_ase.neighbours.PackedNeighbourLists`)."""

    lists: PackedNeighbourLists
    species: np.ndarray    # [N] model species index of every atom
    positions: np.ndarray  # [N, 3] Å
    cells: np.ndarray      # [S, 3, 3] Å
    periodic: np.ndarray   # [S] bool: fully periodic (has a stress)

    def node_counts(self) -> np.ndarray:
        return np.diff(self.lists.node_offsets)

    def edge_counts(self) -> np.ndarray:
        return np.diff(self.lists.edge_offsets)


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

    graphs = _graphs(structures, net, species_of_z, known)
    budget = int(memory_budget) if memory_budget is not None else _memory_budget(torch_device)
    per_edge = bytes_per_padded_edge(net)
    # exact mode on the CPU: batches whose radial MLP runs once per distinct edge (2x less work than per chunk)
    edge_cap = distinct_table_edges(net) if torch_device.type == "cpu" else None

    n = len(structures)
    results = BatchResults(energies=np.zeros(n), forces=[np.zeros((0, 3))] * n, stresses=[None] * n,
                           node_energies=[np.zeros(0)] * n)
    for members in _plan_batches(graphs, batch_size, budget // per_edge, edge_cap):
        _evaluate_batch(net, graphs, members, head_index, torch_device, torch_dtype, results)
        results.n_batches += 1
        results.batch_sizes.append(len(members))
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


def _graphs(structures: list[Atoms], net: MACE, species_of_z: np.ndarray, known: np.ndarray) -> _Graphs:
    """The checked species and the packed neighbour lists of all structures (one filter and sort for all)."""
    species = [_species(atoms.numbers, index, species_of_z, known) for index, atoms in enumerate(structures)]
    periodic = np.array([bool(atoms.pbc.all()) for atoms in structures], dtype=bool)
    for index, atoms in enumerate(structures):
        if periodic[index] and atoms.cell.volume < 1e-9:
            raise ValueError(f"structure {index} is periodic but its cell has zero volume")
    cells = [np.asarray(atoms.cell.array, dtype=np.float64) for atoms in structures]
    lists = packed_neighbour_lists(((atoms.positions, cell, atoms.pbc) for atoms, cell in zip(structures, cells)),
                                   net.r_max_value)
    positions = [np.asarray(atoms.positions, dtype=np.float64).reshape(-1, 3) for atoms in structures]
    return _Graphs(lists, np.concatenate([np.zeros(0, dtype=np.int64), *species]),
                   np.concatenate([np.zeros((0, 3)), *positions]), np.array(cells).reshape(-1, 3, 3), periodic)


def _species(numbers: np.ndarray, index: int, species_of_z: np.ndarray, known: np.ndarray) -> np.ndarray:
    species = species_of_z[np.clip(numbers, 0, 118)]
    if (species < 0).any() or (numbers > 118).any():
        missing = sorted(set(int(z) for z, s in zip(numbers, species) if s < 0))
        raise ValueError(f"structure {index}: the model has no parameters for element(s) "
                         f"{', '.join(chemical_symbols[z] for z in missing)}; it knows "
                         f"{', '.join(chemical_symbols[int(z)] for z in known)}")
    return species


def _plan_batches(graphs: _Graphs, batch_size: Optional[int], slots: int, edge_cap: Optional[int]
                  ) -> list[np.ndarray]:
    """The structures of each model call, filled greedily while ``nodes * K`` stays within ``slots`` (the padded
    edge grid the memory budget allows), the edges within ``edge_cap`` and the count within ``batch_size``.

    Structures are taken in order of their largest neighbour count K: a batch is padded to its largest K, so
    structures of similar K together waste fewer padded slots (measured: 10-15 % less model time on the
    emt-demo benchmark than in input order). Results do not depend on the grouping.
    """
    order = np.argsort(np.maximum(graphs.lists.max_neighbours, 1), kind="stable")
    nodes_of, edges_of = graphs.node_counts(), graphs.edge_counts()
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        stop = start + 1
        nodes, edges = int(nodes_of[order[start]]), int(edges_of[order[start]])
        while stop < len(order) and (batch_size is None or stop - start < batch_size):
            s = order[stop]
            k_next = max(int(graphs.lists.max_neighbours[s]), 1)  # the largest so far: sorted
            nodes_next, edges_next = nodes + int(nodes_of[s]), edges + int(edges_of[s])
            if nodes_next * k_next > slots or (edge_cap is not None and edges_next > edge_cap):
                break
            nodes, edges, stop = nodes_next, edges_next, stop + 1
        batches.append(order[start:stop])
        start = stop
    return batches


def _ranges(offsets: np.ndarray, members: np.ndarray) -> np.ndarray:
    """The indices ``offsets[s]:offsets[s + 1]`` of every structure s in ``members``, concatenated in that order."""
    starts, counts = offsets[members], offsets[members + 1] - offsets[members]
    first = np.cumsum(counts) - counts  # where each member's run begins in the result
    return np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(starts - first, counts)


def _batch_inputs(graphs: _Graphs, members: np.ndarray, device: torch.device, dtype: torch.dtype
                  ) -> tuple[Tensor, Tensor, Tensor, list[int], list[int]]:
    """Edge vectors, edge_index (batch node numbers) and species of the members' joint graph, with the node and
    edge count of each member."""
    lists = graphs.lists
    nodes, edges = _ranges(lists.node_offsets, members), _ranges(lists.edge_offsets, members)
    node_counts, edge_counts = graphs.node_counts()[members], graphs.edge_counts()[members]
    nodes_t, edges_t = torch.from_numpy(nodes), torch.from_numpy(edges)
    # packed node numbers -> batch node numbers: each member's nodes move to where its run begins in the batch
    renumber = np.repeat(np.cumsum(node_counts) - node_counts - lists.node_offsets[members], edge_counts)
    edge_index = (torch.from_numpy(lists.edge_index).index_select(1, edges_t) + torch.from_numpy(renumber)).to(device)
    positions = torch.from_numpy(graphs.positions).index_select(0, nodes_t).to(device=device, dtype=dtype)
    # The same expression as MACE.forward, so that the vectors are bitwise those of one call each: the lattice
    # translations are one small matmul per structure (rows of its own, as the calculator makes them), the rest
    # element-wise over the batch.
    unit_shifts = torch.from_numpy(lists.unit_shifts).index_select(0, edges_t).to(device=device, dtype=dtype)
    cells = torch.from_numpy(graphs.cells[members]).to(device=device, dtype=dtype)
    shift_vectors = [shifts @ cell for shifts, cell in zip(unit_shifts.split(edge_counts.tolist()), cells)]
    vectors = positions[edge_index[1]] - positions[edge_index[0]] + torch.cat(shift_vectors)
    species = torch.from_numpy(graphs.species).index_select(0, nodes_t).to(device)
    return vectors, edge_index, species, node_counts.tolist(), edge_counts.tolist()


def _virials(vectors: Tensor, edge_grad: Tensor, edge_counts: list[int]) -> Tensor:
    """``sum_e r_e (x) dE/dr_e`` ``[S, 3, 3]`` of each structure, as MACE.forward: one ``[3, E_s] @ [E_s, 3]``
    product per structure (7x faster than an index_add of the ``[E, 3, 3]`` outer products)."""
    pairs = zip(vectors.split(edge_counts), edge_grad.split(edge_counts))
    return torch.stack([r.transpose(0, 1) @ g for r, g in pairs])


def _evaluate_batch(net: MACE, graphs: _Graphs, members: np.ndarray, head: int, device: torch.device,
                    dtype: torch.dtype, results: BatchResults) -> None:
    as_float = dict(device=device, dtype=dtype)
    vectors, edge_index, species, node_counts, edge_counts = _batch_inputs(graphs, members, device, dtype)
    n_struct, n_nodes = len(members), sum(node_counts)
    slots = torch.arange(n_struct, device=device)
    nodes_of = slots.repeat_interleave(torch.as_tensor(node_counts, device=device), output_size=n_nodes)

    node_inter, edge_grad = net.energy_and_edge_gradients(vectors, edge_index, species, head)
    node_e0 = net.atomic_energies[head][species].to(torch.float64)
    node_total = node_e0 + node_inter.to(torch.float64)
    # as MACE.forward: sum of E0 plus sum of interaction energies, each summed per structure
    energy = (torch.zeros(n_struct, dtype=torch.float64, device=device).index_add(0, nodes_of, node_e0)
              + torch.zeros(n_struct, dtype=node_inter.dtype, device=device).index_add(0, nodes_of, node_inter)
              .to(torch.float64))
    sender, receiver = edge_index[0], edge_index[1]
    forces = (torch.zeros(n_nodes, 3, **as_float).index_add(0, sender, edge_grad).index_add(0, receiver, -edge_grad))
    virial = _virials(vectors, edge_grad, edge_counts)

    energy_np = energy.detach().cpu().numpy()
    forces_np = forces.detach().cpu().to(torch.float64).numpy()
    virial_np = virial.detach().cpu().to(torch.float64).numpy()
    node_np = node_total.detach().cpu().numpy()
    # the volume of the cell the model saw (in its dtype)
    cells = torch.as_tensor(graphs.cells[members], **as_float).cpu().to(torch.float64).numpy()
    volumes = np.abs(np.linalg.det(cells))
    start = 0
    for slot, (s, count) in enumerate(zip(members.tolist(), node_counts)):
        results.energies[s] = energy_np[slot]
        results.forces[s] = forces_np[start:start + count]
        results.node_energies[s] = node_np[start:start + count]
        if graphs.periodic[s]:
            v = 0.5 * (virial_np[slot] + virial_np[slot].T)
            results.stresses[s] = full_3x3_to_voigt_6_stress(v / volumes[slot])
        start += count
