"""MACE inside LAMMPS, on any number of MPI ranks, through ML-IAP's Python "unified" interface.

    >>> from mace_ase.lammps import export_lammps
    >>> export_lammps("emt-demo.model", "emt-demo.mliap.pkl")        # doctest: +SKIP

then, in the LAMMPS input (``units metal``: Å, eV, eV/Å, ps, bar)::

    pair_style   mliap unified emt-demo.mliap.pkl 1
    pair_coeff   * * Cu Au                # LAMMPS types 1, 2 -> elements (must be elements of the model)
    comm_modify  cutoff 13.0              # >= num_interactions * r_max + neighbour skin (here 2 x 5.5 + 2.0)

LAMMPS itself must be built with ML-IAP and Python support (``scripts/build_lammps.sh``); exporting needs only
mace-ase. See ``docs/SCALING.md`` for how it scales and :mod:`mace_ase.lammps.unified` for the data contract.
Importing this package never imports LAMMPS.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from ase.data import chemical_symbols

from mace_ase.model.build import load_model, resolve_dtype

__all__ = ["export_lammps", "lammps_input_lines", "load_lammps_model"]


def export_lammps(model_path: str | os.PathLike, output: str | os.PathLike, dtype: str = "float64",
                  device: str = "cpu", head: Optional[str] = None, radial: str = "auto"):
    """Write the file that ``pair_style mliap unified FILE 1`` loads, and return the object written.

    Args:
        model_path: an official MACE ``.model`` file (checked by loading it here).
        output: where to write (any name; LAMMPS unpickles names ending ``.pt``/``.pth`` with ``torch.load``
            and others with ``pickle.load``, both work). Written atomically.
        dtype: ``"float64"`` (answers identical to :class:`~mace_ase.MACECalculator`) or ``"float32"``.
        device: torch device every rank uses (``"cpu"``, ``"cuda"``; with several ranks per GPU, ``"cuda"`` is
            shared).
        head: head of a multi-head model (``None``: the only head, or "Default").
        radial: ``"auto"`` (default), ``"exact"`` or ``"spline"``: the radial weights, see
            :class:`~mace_ase.calculator.MACECalculator`.

    Returns:
        the :class:`~mace_ase.lammps.unified.MACEUnified` object.
    """
    from mace_ase.lammps.unified import MACEUnified

    dtype_name = str(resolve_dtype(dtype)).replace("torch.", "")
    model_path = Path(model_path)
    model = load_model(model_path, device="cpu", dtype="float64")  # validates the file: a clear error here
    heads = list(model.heads)
    if head is None:
        lowered = [name.lower() for name in heads]
        if len(heads) == 1:
            head_index = 0
        elif "default" in lowered:
            head_index = lowered.index("default")
        else:
            raise ValueError(f"this model has several heads {heads}; choose one with head=")
    elif head in heads:
        head_index = heads.index(head)
    else:
        raise ValueError(f"unknown head {head!r}; this model has heads {heads}")
    symbols = [chemical_symbols[int(z)] for z in model.atomic_numbers.tolist()]
    unified = MACEUnified(model_path.read_bytes(), symbols, model.r_max_value, int(model.num_interactions),
                          dtype=dtype_name, device=device, head=head_index, head_name=heads[head_index],
                          radial=radial)
    output = Path(output)
    handle, tmp = tempfile.mkstemp(dir=output.parent if str(output.parent) else ".", prefix=output.name + ".",
                                   suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            pickle.dump(unified, out, protocol=4)
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return unified


def load_lammps_model(path: str | os.PathLike):
    """Read back a file written by :func:`export_lammps` (for inspection). Refuses any other pickle content."""

    class _OnlyOurs(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) == ("mace_ase.lammps.unified", "MACEUnified"):
                from mace_ase.lammps.unified import MACEUnified
                return MACEUnified
            raise pickle.UnpicklingError(f"{path} is not a mace-ase LAMMPS model file (it names {module}.{name})")

    with open(path, "rb") as handle:
        return _OnlyOurs(handle).load()


def lammps_input_lines(unified, path: str | os.PathLike, type_elements: Optional[Sequence[str]] = None,
                       skin: float = 2.0) -> list[str]:
    """The LAMMPS input lines for ``unified`` written at ``path``: pair style, pair coefficients, ghost cutoff.

    Args:
        type_elements: element of each LAMMPS atom type in order (default: every model element, in model order).
        skin: the neighbour skin of the input (``neighbor SKIN bin``, Å; LAMMPS's metal default is 2.0).
    """
    elements = list(type_elements) if type_elements is not None else list(unified.element_types)
    unknown = [e for e in elements if e not in unified.element_types]
    if unknown:
        raise ValueError(f"element(s) {unknown} are not in the model; it knows {unified.element_types}")
    cutoff = unified.ghost_cutoff + skin
    return [
        "units        metal",
        f"pair_style   mliap unified {os.fspath(path)} 1",
        f"pair_coeff   * * {' '.join(elements)}",
        f"comm_modify  cutoff {cutoff:.4f}   # >= {unified.num_interactions} interactions x r_max "
        f"{unified.r_max:g} A + skin {skin:g} A",
    ]
