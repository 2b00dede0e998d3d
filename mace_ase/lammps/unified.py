"""The ML-IAP "unified" model that LAMMPS calls: ``pair_style mliap unified FILE 1``.

LAMMPS (CPU build with the ML-IAP and PYTHON packages, ``MLIAP_ENABLE_PYTHON``; no Kokkos needed) unpickles FILE
and calls :meth:`MACEUnified.compute_forces` once per force evaluation on every MPI rank. What a rank gets (this
LAMMPS version's ``MLIAPDataPy``, ``src/ML-IAP/mliap_unified_couple.pyx``):

* ``ntotal`` atoms: ``nlocal`` owned atoms first, then ghosts; ``elems[k]`` is the index of atom k's element in
  :attr:`element_types` (the order of ``pair_coeff * * El1 El2 ...`` maps LAMMPS types to these names);
* ``npairs`` pairs from LAMMPS's *full, ghost-inclusive* neighbour list (the trailing ``1`` of the pair style):
  ``pair_i`` (the atom whose list it is, local or ghost), ``pair_j``, and ``rij = x_j - x_i`` (Å), every pair with
  ``|rij| < 2 * rcutfac = r_max``;
* ``update_pair_forces(fij)`` adds ``fij`` to ``f[pair_i]`` and subtracts it from ``f[pair_j]`` (ghost forces are
  then summed onto their owners by LAMMPS's reverse communication), and tallies the virial ``-rij (x) fij``.
  So ``fij = dE/d rij``.

Our graph on a rank: every atom (local and ghost) is a node; every pair is an edge *into* ``pair_i`` (receiver
``pair_i``, sender ``pair_j``, edge vector ``x_i - x_j = -rij``), so a node's messages come from its own neighbour
list. The energy is ``sum_{local i} E_i`` (node weights 1 for local atoms, 0 for ghosts): with T interaction layers,
``E_i`` of a local atom depends on atoms up to ``T * r_max`` away, so LAMMPS must keep ghosts that far
(``comm_modify cutoff`` >= T * r_max + skin) and then every local energy is exact with no feature exchange between
ranks. Edges into nodes more than T-1 hops from every local atom cannot change a local energy; they are dropped before
the model runs (this is the part of the ghost shell that costs nothing but LAMMPS's neighbour search).

Units are LAMMPS ``metal``: Å, eV, eV/Å (the same as ASE's). The pickled object holds the model file's bytes (our
safe loader rebuilds the model on first use; no mace-torch class is pickled) and plain settings.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any, Optional

import numpy as np
import torch

from mace_ase.model.build import load_model, resolve_dtype
from mace_ase.model.mace import MACE
from mace_ase.model.radial_spline import check_radial

__all__ = ["MACEUnified"]

try:  # LAMMPS's base class when its Python module is installed; the pickle only names our class, not this base
    from lammps.mliap.mliap_unified_abc import MLIAPUnified
except (ImportError, OSError):  # pragma: no cover - exercised where LAMMPS is absent (exporting needs no LAMMPS)

    class MLIAPUnified:  # type: ignore[no-redef]
        """Stand-in with the attributes LAMMPS's loader reads (``lammps.mliap.mliap_unified_abc.MLIAPUnified``)."""

        def __init__(self, interface=None, element_types=None, ndescriptors=None, nparams=None, rcutfac=None):
            self.interface = interface
            self.element_types = element_types
            self.ndescriptors = ndescriptors
            self.nparams = nparams
            self.rcutfac = rcutfac


class MACEUnified(MLIAPUnified):
    """A MACE model as an ML-IAP unified model (LAMMPS ``metal`` units: Å, eV, eV/Å).

    Build it with :func:`mace_ase.lammps.export_lammps` rather than directly.

    Args:
        model_bytes: the ``.model`` file's contents (read with mace-ase's safe loader when first needed).
        element_types: chemical symbols in the model's element order (names for ``pair_coeff * * ...``).
        r_max: cutoff, Å; num_interactions: message-passing layers T (the ghost shell is T * r_max).
        dtype: ``"float64"`` or ``"float32"``; device: torch device string; head: index of the model head.
        radial: ``"auto"``, ``"exact"`` or ``"spline"`` (:mod:`mace_ase.model.radial_spline`; with tables, each
            rank builds those of the element pairs it meets at its first step).
    """

    def __init__(self, model_bytes: bytes, element_types: list[str], r_max: float, num_interactions: int,
                 dtype: str = "float64", device: str = "cpu", head: int = 0, head_name: str = "Default",
                 radial: str = "auto") -> None:
        # ndescriptors/nparams are unused by a unified model but LAMMPS requires them to be set; rcutfac is half
        # the pair cutoff (LAMMPS uses 2 * rcutfac for every element pair)
        super().__init__(None, list(element_types), 1, 1, 0.5 * float(r_max))
        self.model_bytes = bytes(model_bytes)
        self.model_sha256 = hashlib.sha256(self.model_bytes).hexdigest()
        self.r_max = float(r_max)
        self.num_interactions = int(num_interactions)
        self.dtype = str(resolve_dtype(dtype)).replace("torch.", "")
        self.device = str(device)
        self.head = int(head)
        self.head_name = head_name
        self.radial = check_radial(radial)
        self._model: Optional[MACE] = None
        self._e0: Optional[torch.Tensor] = None

    # -- pickling: only bytes and plain settings travel; the LAMMPS interface object and the model never do --
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["interface"] = None
        state["_model"] = None
        state["_e0"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def ghost_cutoff(self) -> float:
        """How far ghost atoms must reach (Å): ``num_interactions * r_max``."""
        return self.num_interactions * self.r_max

    def model(self) -> MACE:
        """The torch model, built from :attr:`model_bytes` on first use (checksum verified)."""
        if self._model is None:
            if hashlib.sha256(self.model_bytes).hexdigest() != self.model_sha256:
                raise ValueError("the model bytes in this LAMMPS model file are corrupted (checksum mismatch); "
                                 "export it again with `mace-ase export-lammps`")
            handle, path = tempfile.mkstemp(suffix=".model")
            try:
                with os.fdopen(handle, "wb") as out:
                    out.write(self.model_bytes)
                self._model = load_model(path, device=self.device, dtype=self.dtype,
                                         radial=getattr(self, "radial", "exact"))  # files from before 'radial'
            finally:
                os.unlink(path)
            self._e0 = self._model.atomic_energies[self.head].to(torch.float64)
        return self._model

    def compute_descriptors(self, data: Any) -> None:
        """Unused: the model computes everything in :meth:`compute_forces`."""

    def compute_gradients(self, data: Any) -> None:
        """Unused: the model computes everything in :meth:`compute_forces`."""

    def compute_forces(self, data: Any) -> None:
        """Per-atom energies of the local atoms, total energy and pair forces of one rank (see the module doc)."""
        model = self.model()
        nlocal, ntotal, npairs = int(data.nlocal), int(data.ntotal), int(data.npairs)
        elems = np.asarray(data.elems, dtype=np.int64)
        local_energy, fij = self.evaluate(model, elems, nlocal, ntotal, npairs,
                                          data.pair_i if npairs else None, data.pair_j if npairs else None,
                                          data.rij if npairs else None)
        nlist = int(data.nlistatoms)
        if nlist:
            atoms_in_list = np.asarray(data.iatoms, dtype=np.int64)[:nlist]
            eatoms = np.ascontiguousarray(local_energy[atoms_in_list])
            data.eatoms = eatoms
            data.energy = float(eatoms.sum())
        else:
            data.energy = 0.0
        if npairs:
            data.update_pair_forces(fij)

    def evaluate(self, model: MACE, elems: np.ndarray, nlocal: int, ntotal: int, npairs: int,
                 pair_i: Optional[np.ndarray], pair_j: Optional[np.ndarray], rij: Optional[np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Energies (eV, with E0) of the ``nlocal`` local atoms and pair forces ``dE/d rij`` ``[npairs, 3]`` (eV/Å).

        Independent of LAMMPS's data object so that it can be tested directly.
        """
        device, dtype = torch.device(self.device), resolve_dtype(self.dtype)
        mapped = elems >= 0  # atoms of types mapped to NULL in pair_coeff are not part of this potential
        species = torch.as_tensor(np.where(mapped, elems, 0), device=device)
        local = torch.zeros(ntotal, dtype=torch.bool, device=device)
        local[:nlocal] = torch.as_tensor(mapped[:nlocal], device=device)
        e0 = self._e0.to(device) if self._e0 is not None else model.atomic_energies[self.head].to(torch.float64)
        if npairs == 0:
            energies = torch.where(local[:nlocal], e0[species[:nlocal]], torch.zeros((), dtype=torch.float64))
            node_inter = model.graph_energies(torch.zeros(0, 3, dtype=dtype, device=device),
                                              torch.zeros(2, 0, dtype=torch.long, device=device),
                                              species, self.head).detach().to(torch.float64)
            energies = energies + torch.where(local, node_inter, torch.zeros_like(node_inter))[:nlocal]
            return energies.cpu().numpy(), np.zeros((0, 3))
        receiver = torch.as_tensor(np.asarray(pair_i, dtype=np.int64), device=device)
        sender = torch.as_tensor(np.asarray(pair_j, dtype=np.int64), device=device)
        vectors = -torch.as_tensor(np.asarray(rij), device=device).to(dtype)

        # nodes within T-1 hops of a local atom (hop 0 = local): only edges into them reach a local energy
        needed = local.clone()
        for _ in range(self.num_interactions - 1):
            needed = needed.index_fill(0, sender[needed[receiver]], True)
        keep = torch.nonzero(needed[receiver]).squeeze(1)
        # compact: the kept edges' endpoints and the local atoms are the graph's nodes
        used = local.clone()
        used[receiver[keep]] = True
        used[sender[keep]] = True
        nodes = torch.nonzero(used).squeeze(1)
        new_index = torch.full((ntotal,), -1, dtype=torch.long, device=device)
        new_index[nodes] = torch.arange(nodes.shape[0], device=device)
        edge_index = torch.stack([new_index[sender[keep]], new_index[receiver[keep]]])
        weights = local[nodes].to(dtype)
        node_inter, edge_grad = model.energy_and_edge_gradients(vectors[keep], edge_index, species[nodes],
                                                                self.head, weights)
        # local atoms come first in LAMMPS's order and are all kept, so they are the first nodes
        n_local_nodes = int(local.sum())
        energies = torch.zeros(nlocal, dtype=torch.float64, device=device)
        local_ids = nodes[:n_local_nodes]
        energies[local_ids] = node_inter[:n_local_nodes].to(torch.float64) + e0[species[local_ids]]
        fij = torch.zeros(npairs, 3, dtype=torch.float64, device=device)
        fij[keep] = -edge_grad.to(torch.float64)  # vectors = -rij, so dE/d rij = -dE/d vectors
        return energies.cpu().numpy(), np.ascontiguousarray(fij.cpu().numpy())
