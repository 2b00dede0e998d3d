"""ASE calculator for MACE models.

Energies in eV, forces in eV/Å, stress in eV/Å³ (Voigt order xx, yy, zz, yz, xz, xy; ASE's sign, positive =
tensile), Hessian in eV/Å². The model sees only the atoms' positions, cell, periodicity and elements.

    >>> from mace_ase import MACECalculator
    >>> atoms.calc = MACECalculator(model_paths="mace-mpa-0-medium.model", device="cpu")   # doctest: +SKIP

Per call: build the neighbour list (:mod:`mace_ase.neighbours`), move positions/cell/graph to the model's device and
dtype, run the model (energy, forces and the strain derivative in one backward pass), copy the results back.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any, Sequence

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.data import chemical_symbols
from ase.stress import full_3x3_to_voigt_6_stress

from mace_ase.model.build import load_model, resolve_dtype
from mace_ase.model.mace import MACE
from mace_ase.neighbours import VerletNeighbourList

log = logging.getLogger(__name__)

__all__ = ["MACECalculator"]

# mace-torch keyword arguments that select an acceleration backend or extra outputs: results are unchanged, so they
# are accepted (scripts written for mace-torch keep working) and ignored with a log message.
_IGNORED_MACE_OPTIONS = ("enable_cueq", "enable_oeq", "compile_mode", "fullgraph", "compute_atomic_stresses",
                         "charges_key", "info_keys", "arrays_keys")
_UNIT_OPTIONS = ("energy_units_to_eV", "length_units_to_A")  # mace-torch unit conversions: only 1.0 is supported
_ASE_OPTIONS = ("restart", "ignore_bad_restart_file", "label", "atoms", "directory")


def _elements(numbers: Sequence[int]) -> str:
    return ", ".join(chemical_symbols[int(z)] for z in numbers)


class MACECalculator(Calculator):
    """MACE interatomic potential as an ASE calculator (mace-torch's call form).

    Args:
        model_paths: path of an official ``.model`` file, a list of paths (a committee: results are averaged and
            their variances stored as ``energy_var``, ``forces_var``, ``stress_var``), or an already loaded
            :class:`~mace_ase.model.mace.MACE` module (or a list of them). A module passed in is never changed:
            it is used as it is when it already has this device and dtype (and is in eval mode), else a copy is
            converted, so one module can serve several calculators of different dtypes or devices.
        device: ``"cpu"``, ``"cuda"``/``"cuda:N"``; ``None`` picks CUDA when available.
        default_dtype: ``"float64"`` or ``"float32"`` (float64 weights rounded to float32, as mace-torch does).
            Torch's global default dtype is never changed.
        head: which head of a multi-head model to use; ``None`` means the only head, or the one named "Default".
        skin: Verlet skin of the neighbour list, Å (see :class:`~mace_ase.neighbours.VerletNeighbourList`): the list
            is searched with ``r_max + skin`` and reused until an atom has moved more than half the skin or the
            cell has strained too far. Results are bit-identical for every skin; only the cost changes. ``0``
            (default) searches afresh at every call, the cheapest for unrelated structures; ``run_md`` uses 1 Å
            for its run when the calculator's skin is 0 (attribute ``skin``, settable).

    Properties: ``energy`` and ``free_energy`` (eV), ``forces`` (eV/Å), ``stress`` (eV/Å³, only for fully
    periodic systems), ``energies`` (per atom, including the isolated-atom energies E0, eV) and ``node_energy``
    (per atom, without E0, eV).
    """

    implemented_properties = ("energy", "free_energy", "forces", "stress", "energies", "node_energy")

    def __init__(self, model_paths: str | os.PathLike | MACE | Sequence[str | os.PathLike | MACE],
                 device: str | None = None, default_dtype: str = "float64", head: str | None = None,
                 skin: float = 0.0, **kwargs: Any) -> None:
        for option in _IGNORED_MACE_OPTIONS:
            if option in kwargs:
                log.info("option %s=%r is a mace-torch backend switch; mace-ase ignores it", option, kwargs.pop(option))
        model_type = kwargs.pop("model_type", "MACE")
        if model_type != "MACE":
            raise ValueError(f"model_type={model_type!r} is not supported: mace-ase computes energies "
                             "(model_type='MACE')")
        for option in _UNIT_OPTIONS:
            if float(kwargs.pop(option, 1.0)) != 1.0:
                raise ValueError(f"{option} other than 1.0 is not supported: MACE foundation models use eV and Å")
        unknown = sorted(set(kwargs) - set(_ASE_OPTIONS))
        if unknown:
            raise TypeError(f"MACECalculator got unexpected keyword argument(s) {unknown}; it takes model_paths, "
                            f"device, default_dtype, head, skin and ASE's {list(_ASE_OPTIONS)}")
        super().__init__(**kwargs)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = resolve_dtype(default_dtype, "default_dtype")

        sources = list(model_paths) if isinstance(model_paths, (list, tuple)) else [model_paths]
        if not sources:
            raise ValueError("model_paths is empty: give a .model file or a loaded model")
        self.models = [self._load(source) for source in sources]
        reference = self.models[0]
        for other in self.models[1:]:
            if other.r_max_value != reference.r_max_value or other.heads != reference.heads or not torch.equal(
                other.atomic_numbers.cpu(), reference.atomic_numbers.cpu()
            ):
                raise ValueError("committee models differ in r_max, heads or elements; they cannot be averaged")
        self.r_max = reference.r_max_value
        self.heads = list(reference.heads)
        self.head = self._select_head(head)
        self.atomic_numbers = reference.atomic_numbers.cpu().numpy()
        self._species_of_z = np.full(max(int(self.atomic_numbers.max()) + 1, 119), -1, dtype=np.int64)
        self._species_of_z[self.atomic_numbers] = np.arange(len(self.atomic_numbers))
        self._neighbours = VerletNeighbourList(self.r_max, skin)
        self._edge_tensors: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (list version, tensors)

    @property
    def skin(self) -> float:
        """Verlet skin of the neighbour list, Å (results do not depend on it)."""
        return self._neighbours.skin

    @skin.setter
    def skin(self, value: float) -> None:
        self._neighbours = VerletNeighbourList(self.r_max, value)
        self._edge_tensors = None

    def _load(self, source: Any) -> MACE:
        if isinstance(source, (str, os.PathLike)):
            return load_model(source, device=self.device, dtype=self.dtype)
        if isinstance(source, MACE):
            # never convert the caller's module in place: another calculator may be using it
            tensors = [*source.parameters(), *source.buffers()]
            floating = [t for t in tensors if t.is_floating_point()]
            if (not source.training and all(t.device == self.device for t in tensors)
                    and all(t.dtype == self.dtype for t in floating)):
                return source
            return copy.deepcopy(source).to(device=self.device, dtype=self.dtype).eval()
        raise TypeError("model_paths must be a path, a list of paths or a loaded MACE model, not "
                        f"{type(source).__name__}")

    def _select_head(self, head: str | None) -> int:
        if head is None:
            if len(self.heads) == 1:
                return 0
            lowered = [name.lower() for name in self.heads]
            if "default" in lowered:
                return lowered.index("default")
            raise ValueError(f"this model has several heads {self.heads}; choose one with head=")
        if head not in self.heads:
            raise ValueError(f"unknown head {head!r}; this model has heads {self.heads}")
        return self.heads.index(head)

    # ---------------------------------------------------------------------------------------------------------

    def _graph(self, atoms) -> dict[str, torch.Tensor]:
        """The model inputs for ``atoms`` on the model's device and dtype."""
        numbers = atoms.numbers
        species = self._species_of_z[np.clip(numbers, 0, len(self._species_of_z) - 1)]
        if (species < 0).any() or (numbers >= len(self._species_of_z)).any():
            missing = sorted(set(int(z) for z, s in zip(numbers, species) if s < 0))
            raise ValueError(
                f"the model has no parameters for element(s) {_elements(missing)}; it knows "
                f"{_elements(self.atomic_numbers)}"
            )
        positions = atoms.positions
        cell = np.asarray(atoms.cell.array, dtype=np.float64)
        edge_index, unit_shifts = self._neighbours.update(positions, cell, atoms.pbc, numbers)
        as_float = dict(device=self.device, dtype=self.dtype)
        version = self._neighbours.version
        if self._edge_tensors is None or self._edge_tensors[0] != version:  # unchanged graph: reuse its tensors
            self._edge_tensors = (version, torch.as_tensor(edge_index, device=self.device),
                                  torch.as_tensor(unit_shifts, **as_float))
        return {
            "positions": torch.as_tensor(positions, **as_float),
            "cell": torch.as_tensor(cell, **as_float),
            "species": torch.as_tensor(species, dtype=torch.long, device=self.device),
            "edge_index": self._edge_tensors[1],
            "unit_shifts": self._edge_tensors[2],
        }

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        periodic = bool(self.atoms.pbc.all())
        if "stress" in properties and not periodic:
            raise PropertyNotImplementedError(
                f"stress is only defined for fully periodic systems; these atoms have pbc={self.atoms.pbc.tolist()}"
            )
        if periodic and self.atoms.cell.volume < 1e-9:
            raise ValueError("the atoms are periodic but their cell has zero volume")
        graph = self._graph(self.atoms)
        outputs = [model(**graph, head=self.head, compute_stress=periodic) for model in self.models]

        def stack(key: str) -> np.ndarray:
            return np.stack([out[key].detach().cpu().to(torch.float64).numpy() for out in outputs])

        energy, forces, stress = stack("energy"), stack("forces"), stack("stress")
        node_energy = stack("node_energy")
        e0 = outputs[0]["atomic_energies"].cpu().numpy()
        self.results = {
            "energy": float(energy.mean()),
            "free_energy": float(energy.mean()),
            "forces": forces.mean(axis=0),
            "energies": e0 + node_energy.mean(axis=0),
            "node_energy": node_energy.mean(axis=0),
        }
        if periodic:
            self.results["stress"] = full_3x3_to_voigt_6_stress(stress.mean(axis=0))
        if len(self.models) > 1:
            self.results["energy_var"] = float(energy.var())
            self.results["forces_var"] = forces.var(axis=0)
            if periodic:
                self.results["stress_var"] = full_3x3_to_voigt_6_stress(stress.var(axis=0))

    def get_hessian(self, atoms=None) -> np.ndarray:
        """Second derivatives of the energy with respect to positions, ``(3N, 3N)`` in eV/Å², by autograd.

        Costs 3N backward passes (of the first model of a committee); meant for small systems (phonons at Gamma,
        vibrational analysis).
        """
        atoms = atoms if atoms is not None else self.atoms
        if atoms is None:
            raise ValueError("get_hessian needs atoms")
        graph = self._graph(atoms)
        positions = graph.pop("positions").requires_grad_(True)
        model = self.models[0]
        energy = model.interaction_energy(positions, head=self.head, **graph)
        (gradient,) = torch.autograd.grad(energy, positions, create_graph=True)
        gradient = gradient.reshape(-1)
        rows = []
        for index in range(gradient.shape[0]):
            (row,) = torch.autograd.grad(gradient[index], positions, retain_graph=True)
            rows.append(row.reshape(-1))
        return torch.stack(rows).detach().cpu().to(torch.float64).numpy()
