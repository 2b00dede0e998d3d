"""ASE calculator for MACE models.

Energies in eV, forces in eV/Å, stress in eV/Å³ (Voigt order xx, yy, zz, yz, xz, xy; ASE's sign, positive =
tensile), Hessian in eV/Å². The model sees only the atoms' positions, cell, periodicity and elements.

    >>> from mace_ase import MACECalculator
    >>> atoms.calc = MACECalculator(model_paths="mace-mpa-0-medium.model", device="cpu")   # doctest: +SKIP

Per call: build the neighbour list (:mod:`mace_ase.neighbours`), move positions/cell/graph to the model's device and
dtype, run the model (energy, forces and the strain derivative in one backward pass), copy the results back.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import warnings
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.data import chemical_symbols
from ase.stress import full_3x3_to_voigt_6_stress

from mace_ase.model.build import load_model, resolve_dtype
from mace_ase.model.mace import MACE
from mace_ase.model.radial_spline import (check_radial, current_radial, disable_spline, effective_radial, radial_mlp,
                                          set_radial)
from mace_ase.neighbours import VerletNeighbourList
from mace_ase import validation

log = logging.getLogger(__name__)

__all__ = ["MACECalculator"]

# mace-torch keyword arguments that select an acceleration backend or extra inputs: results are unchanged, so they
# are accepted (scripts written for mace-torch keep working) and ignored with a warning, once per process and option.
_IGNORED_MACE_OPTIONS = ("enable_cueq", "enable_oeq", "compile_mode", "fullgraph", "charges_key", "info_keys",
                         "arrays_keys")
_WARNED_OPTIONS: set[str] = set()
_OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
_UNIT_OPTIONS = ("energy_units_to_eV", "length_units_to_A")  # mace-torch unit conversions: only 1.0 is supported
_ASE_OPTIONS = ("restart", "ignore_bad_restart_file", "label", "atoms", "directory")


def _elements(numbers: Sequence[int]) -> str:
    return ", ".join(chemical_symbols[int(z)] for z in numbers)


def _accept_mace_torch_keywords(model_paths: Any, kwargs: dict[str, Any]) -> Any:
    """Take mace-torch's keywords out of ``kwargs``: ``model_path`` (deprecated spelling), backend switches (ignored,
    one warning per process each), ``model_type`` and unit conversions (only the values mace-ase computes); anything
    left that ASE's Calculator does not take is a typo. Returns ``model_paths``."""
    if "model_path" in kwargs:  # mace-torch's older, singular spelling
        warnings.warn("MACECalculator(model_path=...) is deprecated; use model_paths=...", DeprecationWarning,
                      stacklevel=3)  # the caller of MACECalculator(...)
        if model_paths is not None:
            raise TypeError("give model_paths or model_path, not both")
        model_paths = kwargs.pop("model_path")
    if model_paths is None:
        raise TypeError("MACECalculator needs model_paths: a .model file, a list of them or a loaded model")
    for option in _IGNORED_MACE_OPTIONS:
        if option in kwargs:
            value = kwargs.pop(option)
            if option not in _WARNED_OPTIONS:
                _WARNED_OPTIONS.add(option)
                log.warning("option %s=%r is a mace-torch backend switch; mace-ase ignores it (its results do "
                            "not depend on it)", option, value)
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
                        "device, default_dtype, head, skin, compute_atomic_stresses, num_threads, "
                        f"memory_limit_gb, min_distance, radial and ASE's {list(_ASE_OPTIONS)}")
    return model_paths


class MACECalculator(Calculator):
    """MACE interatomic potential as an ASE calculator (mace-torch's call form).

    Args:
        model_paths: path of an official ``.model`` file, a list of paths (a committee: results are averaged and
            their variances stored as ``energy_var``, ``forces_var``, ``stress_var``), or an already loaded
            :class:`~mace_ase.model.mace.MACE` module (or a list of them). A module passed in is never changed:
            it is used as it is when it already has this device and dtype (and is in eval mode), else a copy is
            converted, so one module can serve several calculators of different dtypes or devices.
        device: ``"cpu"``, ``"cuda"``/``"cuda:N"``; ``None`` or ``"auto"`` picks CUDA when available. A CUDA
            device this torch cannot use (a CPU-only build, no visible GPU) is refused here, saying what to do.
        default_dtype: ``"float64"`` or ``"float32"`` (float64 weights rounded to float32, as mace-torch does).
            Torch's global default dtype is never changed.
        head: which head of a multi-head model to use; ``None`` means the only head, or the one named "Default".
        skin: Verlet skin of the neighbour list, Å (see :class:`~mace_ase.neighbours.VerletNeighbourList`): the list
            is searched with ``r_max + skin`` and reused until an atom has moved more than half the skin or the
            cell has strained too far. Results are bit-identical for every skin; only the cost changes. ``0``
            (default) searches afresh at every call, the cheapest for unrelated structures; ``run_md`` uses 1 Å
            for its run when the calculator's skin is 0 (attribute ``skin``, settable).
        compute_atomic_stresses: also compute per-atom stresses ``stresses`` at every call (``atoms.get_stresses()``
            computes them on request anyway): mace-torch's definition, each edge's virial split half to each end,
            over the cell volume; they sum to ``stress``; also ``results["virials"]``, mace-torch's per-atom
            virials ``-stress_i * V`` ``(N, 3, 3)`` in eV. Fully periodic systems only.
        num_threads: CPU threads torch uses during this calculator's calls (the caller's setting is restored after
            each call; torch's setting is per process, so two calculators with different values should not run
            at the same time in two threads). ``None``: leave torch's setting alone.
        memory_limit_gb: memory budget per call (GB); a structure whose estimated neighbour count needs more is
            refused before anything is allocated. ``None``: ``$MACE_ASE_MEMORY_LIMIT_GB``, else 80 % of the memory
            available at the call (GPU memory on CUDA).
        min_distance: atoms closer than this (Å) are refused, naming them (duplicated atoms give NaN in MACE);
            ``0`` turns the check off.
        radial: how the radial weights (the radial MLP of the file, a fixed function of the edge length and
            element pair) are evaluated. ``"auto"`` (default): on the CPU with the compiled kernel, tabulated once
            per element pair as piecewise quintic polynomials (:mod:`mace_ase.model.radial_spline`), 2-2.5x
            faster per call; in float64 on the test fixtures at most 1.1e-11 eV/atom, 1.2e-9 eV/Å and
            2.4e-10 eV/Å³ from mace-torch, inside the bar of 1e-9 eV/atom and 1e-8 eV/Å that the tests assert
            (in float32 the tables are 1e-9 relative, far below float32's own rounding); forces and stresses are
            the exact derivatives of that energy, so MD conserves energy. Tables cost 0.1-0.6 s and 10-40 MB
            per element pair at first use (MACE-MPA-0 medium; MP-0 models have one set for all pairs); past
            1 GB of them, and for :meth:`get_hessian`, calls evaluate the MLP. On CUDA (or without the
            compiler) ``"auto"`` is ``"exact"``. ``"exact"``: the MLP for every (distinct) edge, mace-torch's
            numbers to 1e-14. ``"spline"``: always the tables, Hessians included (~1e-4 relative there).
            ``calc.parameters["radial"]`` records the choice.
        model_path: mace-torch's older singular spelling of ``model_paths`` (deprecated).

    Bad input (NaN/inf positions or cell, atomic numbers outside 1..118, elements the model lacks, a periodic cell
    without volume, atoms on top of each other, a request too large for memory) raises a clear error before any
    model work, and the calculator stays usable. An empty ``Atoms`` gives zero energy, ``(0, 3)`` forces and zero
    stress (ASE's convention). Provenance (model file name, its SHA-256, package and torch versions, device,
    dtype, head) is in ``calc.parameters``. A calculator made from files can be pickled (it reloads them, checking
    their SHA-256); ``copy.deepcopy`` always works. One calculator must not be used by two threads at once; two
    calculators in two threads are independent.

    Properties: ``energy`` and ``free_energy`` (eV), ``forces`` (eV/Å), ``stress`` (eV/Å³, only for fully
    periodic systems), ``stresses`` (per atom, Voigt ``(N, 6)``, eV/Å³, fully periodic only), ``energies`` (per
    atom, including the isolated-atom energies E0, eV) and ``node_energy`` (per atom, without E0, eV). Method
    :meth:`get_descriptors` gives mace's per-atom descriptors.
    """

    implemented_properties = ("energy", "free_energy", "forces", "stress", "stresses", "energies", "node_energy")

    def __init__(self, model_paths: str | os.PathLike | MACE | Sequence[str | os.PathLike | MACE] | None = None,
                 device: str | None = None, default_dtype: str = "float64", head: str | None = None,
                 skin: float = 0.0, compute_atomic_stresses: bool = False, num_threads: int | None = None,
                 memory_limit_gb: float | None = None, min_distance: float = 0.1, radial: str = "auto",
                 **kwargs: Any) -> None:
        model_paths = _accept_mace_torch_keywords(model_paths, kwargs)
        self.radial = check_radial(radial)
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"num_threads must be a positive integer or None, not {num_threads!r}")
        if not float(min_distance) >= 0.0:
            raise ValueError(f"min_distance must be >= 0 Å, not {min_distance!r}")
        validation.memory_budget(memory_limit_gb, "cpu")  # a bad limit fails now, not at the first call
        super().__init__(**kwargs)
        self.device = validation.resolve_torch_device(device)
        self.dtype = resolve_dtype(default_dtype, "default_dtype")
        self.compute_atomic_stresses = bool(compute_atomic_stresses)
        self.num_threads = num_threads
        self.memory_limit_gb = memory_limit_gb
        self.min_distance = float(min_distance)

        sources = list(model_paths) if isinstance(model_paths, (list, tuple)) else [model_paths]
        if not sources:
            raise ValueError("model_paths is empty: give a .model file or a loaded model")
        self.models = [self._load(source) for source in sources]
        self._sources = [os.fspath(source) if isinstance(source, (str, os.PathLike)) else None for source in sources]
        reference = self.models[0]
        for other in self.models[1:]:
            if other.r_max_value != reference.r_max_value or other.heads != reference.heads or not torch.equal(
                other.atomic_numbers.cpu(), reference.atomic_numbers.cpu()
            ):
                raise ValueError("committee models differ in r_max, heads or elements; they cannot be averaged")
        self.r_max = reference.r_max_value
        self.heads = list(reference.heads)
        self.head = self._select_head(head)
        self._record_provenance()
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

    def _record_provenance(self) -> None:
        """What produced the results, in ``calc.parameters`` (written to trajectories and ``calc.todict()``)."""
        import mace_ase

        def sha256(path: str | None) -> str | None:
            if path is None:
                return None
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            return digest.hexdigest()

        names = [os.path.basename(path) if path else "in-memory MACE module" for path in self._sources]
        digests = [sha256(path) for path in self._sources]
        self.model_sha256 = digests
        one = len(names) == 1
        self.parameters.update(
            model=names[0] if one else names, model_path=self._sources[0] if one else self._sources,
            model_sha256=digests[0] if one else digests, head=self.heads[self.head],
            mace_ase_version=mace_ase.__version__, torch_version=torch.__version__, device=str(self.device),
            dtype=str(self.dtype).replace("torch.", ""), radial=self.radial,
        )

    def _load(self, source: Any) -> MACE:
        if isinstance(source, (str, os.PathLike)):
            return load_model(source, device=self.device, dtype=self.dtype, radial=self.radial)
        if isinstance(source, MACE):
            # never convert the caller's module in place: another calculator may be using it
            tensors = [*source.parameters(), *source.buffers()]
            floating = [t for t in tensors if t.is_floating_point()]
            if (not source.training and all(t.device == self.device for t in tensors)
                    and all(t.dtype == self.dtype for t in floating)
                    and current_radial(source) == effective_radial(source, self.radial)):
                return source
            converted = copy.deepcopy(source)
            disable_spline(converted)  # tables are per device and dtype: made afresh below when wanted
            converted = converted.to(device=self.device, dtype=self.dtype).eval()
            set_radial(converted, self.radial)
            return converted
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
        """The model inputs for ``atoms`` on the model's device and dtype, after the checks of
        :mod:`mace_ase.validation` (a clear error for a broken structure, before any model work)."""
        self._check(atoms)
        numbers = atoms.numbers
        species = self._species_of_z[np.clip(numbers, 0, len(self._species_of_z) - 1)]
        if (species < 0).any() or (numbers >= len(self._species_of_z)).any():
            missing = sorted(set(int(z) for z, s in zip(numbers, species) if s < 0))
            raise ValueError(
                f"the model has no parameters for element(s) {_elements(missing)}; it knows "
                f"{_elements(self.atomic_numbers)}"
            )
        positions = np.asarray(atoms.positions, dtype=np.float64)  # float32 arrays too
        cell = np.asarray(atoms.cell.array, dtype=np.float64)
        edge_index, unit_shifts = self._neighbours.update(positions, cell, atoms.pbc, numbers)
        self._check_edges(positions, cell, edge_index, unit_shifts)
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

    def _check(self, atoms) -> None:
        """Structure checks and the edge-count/memory estimate, before the neighbour list is built."""
        positions = np.asarray(atoms.positions, dtype=np.float64)
        cell = np.asarray(atoms.cell.array, dtype=np.float64)
        validation.check_structure(atoms.numbers, positions, cell, atoms.pbc)
        validation.check_search_cost(len(atoms), cell, atoms.pbc, self.r_max + self.skin)
        estimate = validation.estimate_edges(positions, cell, atoms.pbc, self.r_max + self.skin)
        self._budget = self._memory_budget()  # read once per call, used again on the built list
        validation.check_edge_budget(estimate, len(atoms), self._bytes_per_edge(), self._budget)

    def _check_edges(self, positions: np.ndarray, cell: np.ndarray, edge_index: np.ndarray,
                     unit_shifts: np.ndarray) -> None:
        """On the built list: the exact edge count against the budget, and no atoms closer than min_distance."""
        validation.check_edge_budget(edge_index.shape[1], len(positions), self._bytes_per_edge(), self._budget,
                                     what="counted")
        if edge_index.shape[1] and self.min_distance > 0:
            vectors = positions[edge_index[1]] - positions[edge_index[0]] + unit_shifts @ cell
            validation.check_close_pairs(np.einsum("ij,ij->i", vectors, vectors), edge_index, self.min_distance)

    def _bytes_per_edge(self) -> int:
        model = self.models[0]
        chunked = all(getattr(interaction, "fused", False) for interaction in model.interactions)
        return validation.bytes_per_edge(int(model.embedding.shape[1]), torch.finfo(self.dtype).bits // 8, chunked)

    def _memory_budget(self) -> int:
        return validation.memory_budget(self.memory_limit_gb, self.device)

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        """``num_threads`` CPU threads for the duration of a call; the caller's setting is restored afterwards."""
        if self.num_threads is None:
            yield
            return
        previous = torch.get_num_threads()
        torch.set_num_threads(self.num_threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        try:
            with self._threads():
                self.results = self._evaluate(self.atoms, properties)
        except BaseException:
            self.reset()  # no half-set atoms or results: the next call computes afresh
            raise

    def _evaluate(self, atoms, properties) -> dict[str, Any]:
        periodic = bool(atoms.pbc.all())
        for name in ("stress", "stresses"):
            if name in properties and not periodic:
                raise PropertyNotImplementedError(
                    f"{name} is only defined for fully periodic systems; these atoms have pbc={atoms.pbc.tolist()}"
                )
        atomic = periodic and (self.compute_atomic_stresses or "stresses" in properties)
        if len(atoms) == 0:
            self._check(atoms)
            return self._empty_results(periodic, atomic)
        graph = self._graph(atoms)
        outputs = [self._run(model, graph, periodic, atomic) for model in self.models]

        def stack(key: str) -> np.ndarray:
            return np.stack([out[key].detach().cpu().to(torch.float64).numpy() for out in outputs])

        energy, forces, stress = stack("energy"), stack("forces"), stack("stress")
        node_energy = stack("node_energy")
        e0 = outputs[0]["atomic_energies"].cpu().numpy()
        results = {
            "energy": float(energy.mean()),
            "free_energy": float(energy.mean()),
            "forces": forces.mean(axis=0),
            "energies": e0 + node_energy.mean(axis=0),
            "node_energy": node_energy.mean(axis=0),
        }
        if periodic:
            results["stress"] = full_3x3_to_voigt_6_stress(stress.mean(axis=0))
        if atomic:  # per atom as mace-torch: "stresses" Voigt (N, 6) eV/Å³, "virials" (N, 3, 3) eV = -stress * V
            atomic_stresses = stack("atomic_stresses").mean(axis=0)
            results["stresses"] = full_3x3_to_voigt_6_stress(atomic_stresses)
            results["virials"] = -atomic_stresses * abs(float(np.linalg.det(atoms.cell.array)))
        if len(self.models) > 1:
            results["energy_var"] = float(energy.var())
            results["forces_var"] = forces.var(axis=0)
            if periodic:
                results["stress_var"] = full_3x3_to_voigt_6_stress(stress.var(axis=0))
        return results

    def _run(self, model: MACE, graph: dict[str, torch.Tensor], periodic: bool, atomic: bool
             ) -> dict[str, torch.Tensor]:
        """One model call; out-of-memory becomes :class:`~mace_ase.validation.InsufficientMemoryError`."""
        message = None
        try:
            return model(**graph, head=self.head, compute_stress=periodic, compute_atomic_stresses=atomic)
        except (_OutOfMemoryError, RuntimeError) as exc:
            if not isinstance(exc, _OutOfMemoryError) and "can't allocate memory" not in str(exc):
                raise
            # Only the text is kept: the exception's traceback would hold the call's tensors alive.
            message = (f"out of memory on {self.device} evaluating {graph['species'].shape[0]} atoms with "
                       f"{graph['edge_index'].shape[1]} edges ({str(exc).splitlines()[0][:200]}); try "
                       "default_dtype='float32', a smaller system, or evaluating it in chunks (fewer atoms per "
                       "call); the calculator is still usable")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        raise validation.InsufficientMemoryError(message)

    def _empty_results(self, periodic: bool, atomic: bool) -> dict[str, Any]:
        """ASE's convention for a structure without atoms: zero energy, ``(0, 3)`` forces, zero stress."""
        results: dict[str, Any] = {"energy": 0.0, "free_energy": 0.0, "forces": np.zeros((0, 3)),
                                   "energies": np.zeros(0), "node_energy": np.zeros(0)}
        if periodic:
            results["stress"] = np.zeros(6)
        if atomic:
            results["stresses"] = np.zeros((0, 6))
        if len(self.models) > 1:
            results.update(energy_var=0.0, forces_var=np.zeros((0, 3)))
            if periodic:
                results["stress_var"] = np.zeros(6)
        return results

    def get_descriptors(self, atoms=None, invariants_only: bool = True, num_layers: int = -1
                        ) -> np.ndarray | list[np.ndarray]:
        """Per-atom MACE descriptors: the node features after each layer, as mace-torch's ``get_descriptors``.

        Args:
            atoms: the structure (default: the last one calculated).
            invariants_only: only the scalar (l = 0) channels of each layer: ``(N, C * num_layers)``. Otherwise every
                component, e3nn's layout per layer (irreps in order, channel-major, m minor): ``(N, sum_t D_t C)``;
                the last layer has scalars only.
            num_layers: how many layers, from the first; -1 means all.

        Returns:
            An array ``(N, features)`` in the model's dtype, or a list of them (one per model) for a committee.
        """
        atoms = atoms if atoms is not None else self.atoms
        if atoms is None:
            raise ValueError("get_descriptors needs atoms")
        available = len(self.models[0].interactions)
        if num_layers == -1:
            num_layers = available
        if not isinstance(num_layers, int) or not 1 <= num_layers <= available:
            raise ValueError(f"num_layers must be -1 or 1..{available} (this model has {available} layers), "
                             f"not {num_layers!r}")
        if len(atoms) == 0:  # the widths come from the layers' output shapes
            self._check(atoms)
            linears = [product.linear for product in self.models[0].products[:num_layers]]
            width = sum(int(linear.weights[0].shape[1]) * (1 if invariants_only else sum(linear.out_dims))
                        for linear in linears)
            empty = np.zeros((0, width), dtype=np.float32 if self.dtype == torch.float32 else np.float64)
            return empty if len(self.models) == 1 else [empty.copy() for _ in self.models]
        with self._threads(), torch.no_grad():
            graph = self._graph(atoms)
            positions, edge_index = graph["positions"], graph["edge_index"]
            vectors = positions[edge_index[1]] - positions[edge_index[0]] + graph["unit_shifts"] @ graph["cell"]
            descriptors = []
            for model in self.models:
                features = model.node_features(vectors, edge_index, graph["species"])[:num_layers]
                if invariants_only:
                    pieces = [h[:, 0, :] for h in features]
                else:  # [N, D, C] -> per irrep l: [N, C, 2l+1] flattened (e3nn's "mul x ir" layout)
                    pieces = [h[:, l * l:(l + 1) * (l + 1), :].transpose(1, 2).reshape(h.shape[0], -1)
                              for h in features for l in range(int(round(h.shape[1] ** 0.5)))]
                descriptors.append(torch.cat(pieces, dim=1).cpu().numpy())
        return descriptors[0] if len(descriptors) == 1 else descriptors

    # Pickling and copying ---------------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """A pickled calculator is its construction arguments; unpickling reloads the model file(s) and checks that
        their SHA-256 is unchanged. Cached results and atoms are not carried over."""
        if any(source is None for source in self._sources):
            raise TypeError("this MACECalculator was made from an in-memory MACE module, which cannot be pickled: "
                            "make it from the .model file(s) (model_paths=...) to pickle it or send it to another "
                            "process (copy.deepcopy works either way)")
        options = dict(default_dtype=str(self.dtype).replace("torch.", ""), skin=self.skin,
                       compute_atomic_stresses=self.compute_atomic_stresses, num_threads=self.num_threads,
                       memory_limit_gb=self.memory_limit_gb, min_distance=self.min_distance, radial=self.radial)
        return {"model_paths": self._sources, "model_sha256": self.model_sha256, "device": str(self.device),
                "head": self.heads[self.head], "options": options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        paths = state["model_paths"]
        self.__init__(paths if len(paths) > 1 else paths[0], device=state["device"], head=state["head"],
                      **state["options"])
        if self.model_sha256 != state["model_sha256"]:
            raise ValueError(f"the model file(s) {paths} changed since this calculator was pickled (SHA-256 "
                             f"{state['model_sha256']} then, {self.model_sha256} now)")

    def __deepcopy__(self, memo: dict) -> "MACECalculator":
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            setattr(new, key, copy.deepcopy(value, memo))
        return new

    def get_hessian(self, atoms=None) -> np.ndarray:
        """Second derivatives of the energy with respect to positions, ``(3N, 3N)`` in eV/Å², by autograd.

        Costs 3N backward passes (of the first model of a committee); meant for small systems (phonons at Gamma,
        vibrational analysis).
        """
        atoms = atoms if atoms is not None else self.atoms
        if atoms is None:
            raise ValueError("get_hessian needs atoms")
        if len(atoms) == 0:
            self._check(atoms)
            return np.zeros((0, 0))
        with self._threads(), radial_mlp():  # radial="auto": exact second derivatives from the MLP
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
