"""mace-ase: a compact, fast and safe MACE interatomic potential for ASE.

Units are ASE's throughout: energies in eV, lengths in Å, forces in eV/Å, stress in eV/Å³.

    >>> from mace_ase import mace_mp
    >>> atoms.calc = mace_mp()          # doctest: +SKIP

Public names are imported lazily so that ``import mace_ase`` (and the command line for
``mace-ase models list``) stays fast; torch is only imported when a model is needed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "MACECalculator": "mace_ase.calculator",
    "load_model": "mace_ase.model.build",
    "export_torchscript": "mace_ase.model.build",
    "export_program": "mace_ase.model.export",
    "hyperparameters": "mace_ase.model.build",
    "read_model_file": "mace_ase.io.model_file",
    "mace_mp": "mace_ase.foundations",
    "mace_off": "mace_ase.foundations",
    "mace_omol": "mace_ase.foundations",
    "mace_anicc": "mace_ase.foundations",
    "relax": "mace_ase.dynamics.relax",
    "run_md": "mace_ase.dynamics.md",
    "evaluate": "mace_ase.batch",
    "export_lammps": "mace_ase.lammps",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mace_ase' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__
