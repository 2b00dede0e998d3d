"""Saving a model to run without mace-ase: TorchScript (for LAMMPS) and ``torch.export`` programs.

**TorchScript** (:func:`save_torchscript`, used by ``mace_ase.export_torchscript``) is what LAMMPS's
``pair_style mace`` loads, so it stays, although torch 2.13 deprecates ``torch.jit.script``/``save``/``load``: the
deprecation warnings are silenced inside these calls only (``warnings.catch_warnings``), never process-wide.

**torch.export** (:func:`export_program`) writes an ``ExportedProgram`` (``.pt2``, ``torch.export.save``) that
``torch.export.load`` reads back with torch alone. What is exported, and why:

* Not :meth:`MACE.forward`: forces come from an ``autograd.grad`` inside it, and its graph layout (sorting atoms by
  element, the ``[N, K]`` neighbour grid) has shapes that depend on the *values* of the inputs (element counts, the
  largest neighbour count), which ``torch.export`` cannot trace symbolically.
* Exported is the node-energy function on the padded layout, differentiable in its inputs: ``program(vectors,
  senders) -> node energies`` (eV, without E0) where, for the b-th exported element ``e`` (model order; all of the
  model's, or those named by ``elements=``), ``vectors[b]`` is ``[n_e, K, 3]`` (Å) and ``senders[b]`` ``[n_e, K]``
  (int64): the edge vectors and global sender indices of the ``n_e`` receivers of element ``e``. Nodes are numbered
  element block by element block; each receiver has ``K`` neighbour slots, unused ones hold the dummy edge
  ``(2 r_max + 10 Å, 0, 0)`` from the node to itself (zero contribution). The numbers of atoms of each element
  (``n_e >= 1``: add an isolated phantom node for an absent element and drop its energy) and ``K`` are dynamic.
  Forces and stress follow from one backward pass through the loaded program
  (``F_i = sum_{sender=i} g - sum_{receiver=i} g``, ``virial = sum r (x) g``).
* :func:`load_program` returns :class:`ExportedMACE`, which does that layout and the backward pass and has the
  inputs and outputs of :meth:`MACE.forward`; the ``.pt2`` also carries ``mace_ase.json`` (elements, r_max, head,
  E0, dtype) so that any other caller can do the same.

AOTInductor packaging (``torch._inductor.aoti_compile_and_package`` on the loaded program) is not done here: it
compiles C++ for one device and one torch version (minutes per model on a small machine), while the ``.pt2`` above
is portable; a site that wants it can compile the exported program itself.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from mace_ase.model.mace import MACE

__all__ = ["ExportedMACE", "NodeEnergyProgram", "export_program", "load_program", "save_torchscript"]

METADATA = "mace_ase.json"  # extra file in the .pt2 archive
FORMAT = "mace-ase node-energy program 1"


def save_torchscript(module: nn.Module, path: str | os.PathLike) -> None:
    """``torch.jit.script`` ``module`` and save it, with torch 2.13's TorchScript deprecation warnings silenced here
    only (TorchScript is what LAMMPS ``pair_style mace`` loads)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        torch.jit.save(torch.jit.script(module), os.fspath(path))


class NodeEnergyProgram(nn.Module):
    """What :func:`export_program` exports: node energies (eV, E0 excluded) of one head from the padded, per-element
    layout described in the module docstring. Uses the plain reference code of the model (no compiled kernels)."""

    def __init__(self, model: MACE, head: int, elements: List[int]) -> None:
        super().__init__()
        self.model = model
        self.head = head
        self.elements = elements  # model indices of the exported elements, increasing; one input block each

    def forward(self, vectors: List[Tensor], senders: List[Tensor]) -> Tensor:
        # counts are shapes of the inputs: symbolic when exported, not data-dependent; elements not exported have
        # a constant count of 0 (the model skips them)
        counts = [0] * int(self.model.atomic_numbers.shape[0])
        for block, element in enumerate(self.elements):
            counts[element] = vectors[block].shape[0]
        species = torch.cat([torch.full((v.shape[0],), element, dtype=torch.long, device=v.device)
                             for v, element in zip(vectors, self.elements)])
        flat_vectors = torch.cat(vectors).reshape(-1, 3)
        flat_senders = torch.cat(senders).reshape(-1)
        return self.model.node_energies(flat_vectors, species, flat_senders, self.head, counts)


def _reference_copy(model: MACE) -> MACE:
    """A copy of ``model`` on the reference code path, with its own contiguous tensors (none shares storage)."""
    reference = copy.deepcopy(model).eval()
    for module in reference.modules():
        if hasattr(module, "fused"):  # the fast path's compiled kernels cannot be traced
            module.fused = False
    with torch.no_grad():
        for tensor in [*reference.parameters(), *reference.buffers()]:
            tensor.data = tensor.data.contiguous().clone()
    return reference


def _example(model: MACE, n_elements: int) -> Tuple[List[Tensor], List[Tensor]]:
    """A small synthetic graph (2 nodes per element, 3 slots) to trace with; the traced shapes are symbolic."""
    dtype, device = model.r_max.dtype, model.r_max.device
    slots = 3
    vectors, senders = [], []
    for element in range(n_elements):
        v = torch.zeros(2, slots, 3, dtype=dtype, device=device)
        v[..., 0] = 2.0 * model.r_max_value + 10.0
        v[:, 0] = torch.tensor([0.6, 0.8, 0.4], dtype=dtype, device=device) * model.r_max_value
        vectors.append(v)
        own = torch.arange(2 * element, 2 * element + 2, device=device)
        s = own.view(2, 1).repeat(1, slots)
        s[:, 0] = (own + 2) % (2 * n_elements)  # one real edge to the next element's block
        senders.append(s)
    return vectors, senders


def export_program(model: MACE, path: str | os.PathLike, head: int | str = 0,
                   elements: Sequence[int] | None = None) -> None:
    """Write a ``torch.export`` program (``.pt2``) of ``model``'s node energies for one head (see module docstring).

    The program evaluates the radial MLP for every edge (``radial="exact"``), whatever ``model``'s radial mode:
    the tables of :mod:`mace_ase.model.radial_spline` are eager-only.

    Args:
        model: a :class:`MACE` (from :func:`mace_ase.load_model`), in the dtype and on the device to export for.
        path: the ``.pt2`` file to write (written to a temporary name, then renamed).
        head: head index or name.
        elements: atomic numbers of the elements the program takes (as LAMMPS's ``pair_coeff`` lists them; from
            symbols: ``ase.data.atomic_numbers[symbol]``); None exports every element of the model. Each exported
            element is one input block and runs on every call, so for the 89-element foundation models name the
            elements you simulate: exporting all 89 had not finished after 12 minutes on two busy cores, and
            every call pays for all of them.

    Read it back with ``torch.export.load(path)`` (torch only) or :func:`load_program` (energies, forces, stress).
    """
    if isinstance(head, str):
        if head not in model.heads:
            raise ValueError(f"head {head!r} is not one of the model's heads {model.heads}")
        head = model.heads.index(head)
    if not 0 <= head < len(model.heads):
        raise ValueError(f"head index {head} out of range for heads {model.heads}")
    model_numbers = [int(z) for z in model.atomic_numbers]
    if elements is None:
        indices = list(range(len(model_numbers)))
    else:
        wanted = {int(z) for z in elements}
        missing = sorted(wanted - set(model_numbers))
        if missing:
            raise ValueError(f"atomic numbers {missing} are not in the model (it has {model_numbers})")
        indices = [i for i, z in enumerate(model_numbers) if z in wanted]
    program = NodeEnergyProgram(_reference_copy(model), head, indices)
    slots = torch.export.Dim("neighbour_slots", min=1)
    nodes = [torch.export.Dim(f"nodes_of_Z{model_numbers[i]}", min=1) for i in indices]
    dynamic = {"vectors": [{0: dim, 1: slots} for dim in nodes], "senders": [{0: dim, 1: slots} for dim in nodes]}
    exported = torch.export.export(program, _example(model, len(indices)), dynamic_shapes=dynamic)
    metadata = {
        "format": FORMAT,
        "atomic_numbers": model_numbers,  # all of the model's, in model order (species indices refer to these)
        "exported": indices,  # model indices of the exported elements: one input block each, in this order
        "r_max": model.r_max_value,
        "dummy_edge_length": 2.0 * model.r_max_value + 10.0,
        "head": model.heads[head],
        "atomic_energies": model.atomic_energies[head].tolist(),  # E0 per element, eV
        "dtype": str(model.r_max.dtype).replace("torch.", ""),
    }
    path = os.fspath(path)
    partial = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.part.pt2")
    try:
        torch.export.save(exported, partial, extra_files={METADATA: json.dumps(metadata)})
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


class ExportedMACE:
    """A loaded ``.pt2`` program with the inputs and outputs of :meth:`MACE.forward` (energy eV, forces eV/Å,
    stress eV/Å³): the layout is done here, the node energies by the program, forces by its backward pass."""

    # The same graph layout as the model: sort by element, pad to a [N, K] grid (the methods need only
    # ``atomic_numbers`` and ``r_max_value``).
    group_by_element = MACE.group_by_element
    pad_edges = MACE.pad_edges

    def __init__(self, program: torch.export.ExportedProgram, metadata: Dict[str, Any]) -> None:
        if metadata.get("format") != FORMAT:
            raise ValueError(f"not a mace-ase node-energy program (format {metadata.get('format')!r}, "
                             f"expected {FORMAT!r})")
        self.program = program.module()
        self.metadata = metadata
        self.dtype = getattr(torch, metadata["dtype"])
        self.atomic_numbers = torch.tensor(metadata["atomic_numbers"], dtype=torch.long)  # on the CPU: only its
        # length is used (group_by_element's bincount)
        self.exported = [int(i) for i in metadata["exported"]]
        self.r_max_value = float(metadata["r_max"])
        self.atomic_energies = torch.tensor(metadata["atomic_energies"], dtype=torch.float64)

    def node_energies(self, vectors: Tensor, species: Tensor, edge_index: Tensor) -> Tensor:
        """Node interaction energies [N] (eV, input order), differentiable in ``vectors`` (edge vectors, Å)."""
        n_nodes, n_elements = int(species.shape[0]), int(self.atomic_numbers.shape[0])
        _, inverse, sorted_species, counts, sender, receiver = self.group_by_element(species, edge_index)
        padded_vectors, padded_sender = self.pad_edges(vectors, sender, receiver, n_nodes)
        slots = padded_vectors.shape[0] // max(n_nodes, 1)
        missing = [int(self.atomic_numbers[e]) for e in range(n_elements) if counts[e] and e not in self.exported]
        if missing:
            raise ValueError(f"atomic numbers {missing} were not exported into this program (it takes "
                             f"{[int(self.atomic_numbers[e]) for e in self.exported]})")
        # exported elements that are absent get one phantom node with only dummy edges; later blocks move up by one
        # per phantom
        absent = torch.tensor([e in self.exported and counts[e] == 0 for e in range(n_elements)], dtype=torch.long,
                              device=vectors.device)
        shift = torch.cumsum(absent, 0) - absent  # phantoms before each element's block
        padded_sender = padded_sender + shift[sorted_species[padded_sender]]
        dummy = torch.zeros(1, slots, 3, dtype=vectors.dtype, device=vectors.device)
        dummy[..., 0] = 2.0 * self.r_max_value + 10.0
        blocks_v, blocks_s, keep = [], [], []
        starts = [sum(counts[:e]) for e in range(n_elements)]
        grid_v, grid_s = padded_vectors.view(n_nodes, slots, 3), padded_sender.view(n_nodes, slots)
        for element in self.exported:
            count, start = counts[element], starts[element]
            first = start + int(shift[element])  # index of this block's first node in the program's numbering
            if count == 0:
                blocks_v.append(dummy)
                blocks_s.append(torch.full((1, slots), first, dtype=torch.long, device=vectors.device))
                keep.append(torch.zeros(1, dtype=torch.bool, device=vectors.device))
            else:
                blocks_v.append(grid_v[start:start + count])
                blocks_s.append(grid_s[start:start + count])
                keep.append(torch.ones(count, dtype=torch.bool, device=vectors.device))
        energies = self.program(blocks_v, blocks_s)[torch.cat(keep)]
        return energies[inverse]

    def __call__(self, positions: Tensor, cell: Tensor, species: Tensor, edge_index: Tensor, unit_shifts: Tensor,
                 compute_stress: bool = True) -> Dict[str, Tensor]:
        """As :meth:`MACE.forward` for the exported head: ``energy``, ``node_energy``, ``forces``, ``stress``."""
        sender, receiver = edge_index[0], edge_index[1]
        vectors = (positions[receiver] - positions[sender] + unit_shifts @ cell).detach().requires_grad_(True)
        node_inter = self.node_energies(vectors, species, edge_index)
        (edge_grad,) = torch.autograd.grad([node_inter.sum()], [vectors], allow_unused=True)
        if edge_grad is None:
            edge_grad = torch.zeros_like(vectors)
        forces = torch.zeros_like(positions).index_add(0, sender, edge_grad).index_add(0, receiver, -edge_grad)
        stress = torch.zeros(3, 3, dtype=positions.dtype, device=positions.device)
        if compute_stress:
            virial = vectors.detach().transpose(0, 1) @ edge_grad
            stress = 0.5 * (virial + virial.transpose(0, 1)) / torch.abs(torch.linalg.det(cell))
        e0 = self.atomic_energies.to(positions.device)[species]
        return {"energy": e0.sum() + node_inter.detach().to(torch.float64).sum(),
                "node_energy": node_inter.detach().to(torch.float64), "forces": forces, "stress": stress}


def load_program(path: str | os.PathLike) -> ExportedMACE:
    """Load a ``.pt2`` written by :func:`export_program` (with ``torch.export.load``: load only files you trust)."""
    extra = {METADATA: ""}
    program = torch.export.load(os.fspath(path), extra_files=extra)
    return ExportedMACE(program, json.loads(extra[METADATA] or "{}"))
