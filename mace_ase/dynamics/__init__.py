"""Simulation drivers: thin, documented functions over ASE's optimisers and integrators.

* :func:`relax` -- positions (and cell) relaxation, ``FrechetCellFilter``, pressure in GPa
* :func:`run_md` -- NVE/NVT/NPT molecular dynamics with progress bar, log, trajectory and
  watchdog (:class:`Watchdog`, :class:`WatchdogStop`)
* :func:`equation_of_state` -- E(V) fit and bulk modulus in GPa
* :func:`phonons` -- phonopy band structure and DOS (extra ``phonons``)

Units: eV, Å, fs, K, GPa at the boundary; ASE units inside.
"""

from mace_ase.dynamics.eos import EOSResult, equation_of_state
from mace_ase.dynamics.md import MDResult, run_md
from mace_ase.dynamics.phonons import PhononResult, phonons
from mace_ase.dynamics.relax import RelaxResult, relax
from mace_ase.dynamics.watchdog import Watchdog, WatchdogStop

__all__ = [
    "EOSResult",
    "MDResult",
    "PhononResult",
    "RelaxResult",
    "Watchdog",
    "WatchdogStop",
    "equation_of_state",
    "phonons",
    "relax",
    "run_md",
]
