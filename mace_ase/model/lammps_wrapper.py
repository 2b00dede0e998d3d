"""A TorchScript module with the interface of mace-torch's LAMMPS ``pair_style mace`` (ACEsuit's ML-MACE package).

``mace_ase.export_torchscript(model, "model-lammps.pt", lammps=True)`` scripts :class:`LammpsMACE`; the pair style
then loads it with ``torch::jit::load`` and reads (its source, summarised):

* attributes ``r_max`` (0-d, Å), ``num_interactions`` (it asks LAMMPS for ghosts up to ``num_interactions * r_max``)
  and ``atomic_numbers`` (1-d); the float dtype from the attribute named ``model.node_embedding.linear.weight``;
* ``forward(data, local_or_ghost, compute_virials)`` with ``data`` keys ``positions`` [n, 3] (Å), ``edge_index``
  [2, E] (row 0 = the atom whose neighbour list is walked, row 1 = the neighbour), ``shifts`` [E, 3] (Cartesian, Å),
  ``unit_shifts``, ``cell``, ``node_attrs`` (one-hot [n, n_elements] in ``atomic_numbers`` order), ``batch``,
  ``ptr``, ``energy``, ``forces``, ``weight`` (the last ones unused here); ``local_or_ghost`` is true for the atoms
  this rank owns;
* the result keys ``total_energy_local`` [1] (eV, sum of the site energies of local atoms), ``node_energy`` [n]
  (eV, with E0), ``forces`` [n, 3] (eV/Å, minus the gradient of the local energy, also on ghosts: LAMMPS sums
  them onto their owners) and ``virials`` [1, 3, 3] (eV, LAMMPS's ``W = sum_i x_i (x) f_i`` = ``-sum_e r_e (x)
  dE/dr_e``, zeros unless ``compute_virials``).

Its two modes: ``no_domain_decomposition`` (one rank: the local atoms are the nodes, periodic images are edges with
``shifts``) and domain decomposition (local and ghost atoms are nodes, ``shifts`` are zero, ``local_or_ghost`` masks
the energy). Both are the same computation here: edge vectors ``positions[j] - positions[i] + shifts`` into
:meth:`MACE.energy_and_edge_gradients` with node weights ``local_or_ghost``.

Units: LAMMPS ``metal`` (Å, eV), as ASE's.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor, nn

from mace_ase.model.mace import MACE

__all__ = ["LammpsMACE"]


class _DtypeMarker(nn.Module):
    """Holds the attribute whose dtype the pair style reads (``model.node_embedding.linear.weight``)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)


class _NodeEmbedding(nn.Module):
    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.linear = _DtypeMarker(weight)


class _Holder(nn.Module):
    """``model``: the MACE core plus the ``node_embedding.linear.weight`` name the pair style looks for."""

    def __init__(self, core: MACE) -> None:
        super().__init__()
        self.core = core
        self.node_embedding = _NodeEmbedding(core.embedding.detach().clone())


class LammpsMACE(nn.Module):
    """``pair_style mace``'s model interface around a :class:`MACE` (one head, its dtype)."""

    def __init__(self, model: MACE, head: int = 0) -> None:
        super().__init__()
        if not 0 <= head < len(model.heads):
            raise ValueError(f"head index {head} out of range; the model has heads {model.heads}")
        self.model = _Holder(model)
        self.head = head
        self.register_buffer("r_max", model.r_max.detach().clone())
        self.register_buffer("num_interactions", model.num_interactions.detach().clone())
        self.register_buffer("atomic_numbers", model.atomic_numbers.detach().clone())
        self.register_buffer("atomic_energies", model.atomic_energies[head].detach().clone())

    def forward(self, data: Dict[str, Tensor], local_or_ghost: Tensor, compute_virials: bool = False
                ) -> Dict[str, Tensor]:
        positions = data["positions"]
        edge_index = data["edge_index"]
        sender, receiver = edge_index[0], edge_index[1]
        vectors = positions[receiver] - positions[sender] + data["shifts"].to(positions.dtype)
        species = torch.argmax(data["node_attrs"], dim=1)
        weights = local_or_ghost.to(positions.dtype)
        node_inter, edge_grad = self.model.core.energy_and_edge_gradients(vectors, edge_index, species, self.head,
                                                                           weights)
        node_energy = node_inter + self.atomic_energies[species].to(node_inter.dtype)
        total = (node_energy * weights).sum().reshape(1)
        forces = torch.zeros_like(positions).index_add(0, sender, edge_grad).index_add(0, receiver, -edge_grad)
        virials = torch.zeros(1, 3, 3, dtype=positions.dtype, device=positions.device)
        if compute_virials:
            virials = -(vectors.transpose(0, 1) @ edge_grad).unsqueeze(0)
        return {"total_energy_local": total.detach(), "node_energy": node_energy.detach(), "forces": forces,
                "virials": virials}
