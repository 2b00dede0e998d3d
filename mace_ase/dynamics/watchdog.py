"""A watchdog that stops molecular dynamics going wrong, before it wastes hours.

Typical failures of machine-learning potentials in MD are a temperature that runs away,
forces that blow up when atoms enter a region the model never saw, and atoms collapsing
onto each other ("holes" in the potential). The watchdog checks three bounds every
``interval`` steps:

* temperature (K) above ``max_temperature_k``;
* largest force on any atom (eV/Å) above ``max_force``;
* shortest interatomic distance (Å) below ``min_distance``.

``run_md`` keeps a copy of the last frame that passed every check. When a check fails it
resets the atoms to that frame, writes it next to the trajectory and raises
:class:`WatchdogStop`, which carries the partial result and says what went wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from ase import Atoms
from ase.neighborlist import neighbor_list

if TYPE_CHECKING:
    from mace_ase.dynamics.md import MDResult


@dataclass(frozen=True)
class Watchdog:
    """Bounds that stop a run. ``None`` switches a bound off.

    Args:
        max_temperature_k: stop above this temperature, K. ``None`` in :func:`run_md` is
            resolved to ``5 * temperature_k + 1000`` K.
        max_force: stop when any atom's force exceeds this, eV/Å. 50 eV/Å is far beyond
            anything physical near equilibrium.
        min_distance: stop when two atoms come closer than this, Å (0.5 Å: even an H-H bond
            is 0.74 Å).
        interval: check every ``interval`` steps; ``None`` means the log interval.
    """

    max_temperature_k: float | None = None
    max_force: float | None = 50.0
    min_distance: float | None = 0.5
    interval: int | None = None

    def resolved(self, temperature_k: float, loginterval: int) -> Watchdog:
        """Fill the ``None`` defaults that depend on the run."""
        max_t = self.max_temperature_k
        if max_t is None:
            max_t = 5.0 * temperature_k + 1000.0
        return Watchdog(max_t, self.max_force, self.min_distance, self.interval or loginterval)

    def check(self, atoms: Atoms) -> str | None:
        """Return why the frame is bad, or ``None`` if it is within every bound.

        A non-finite temperature or force always fails. On a watchdog that was not :meth:`resolved`,
        ``max_temperature_k=None`` means no temperature bound (only the run knows its target temperature).
        """
        temperature = atoms.get_temperature()
        if not np.isfinite(temperature):
            return f"temperature {temperature} K is not finite (velocities became NaN or infinite)"
        if self.max_temperature_k is not None and temperature > self.max_temperature_k:
            return f"temperature {temperature:.1f} K exceeds the bound {self.max_temperature_k:.1f} K"
        if self.max_force is not None:
            forces = atoms.get_forces()
            fmax = float(np.sqrt((forces**2).sum(axis=1).max())) if len(atoms) else 0.0
            if not np.isfinite(fmax) or fmax > self.max_force:
                return f"max force {fmax:.3g} eV/Å exceeds the bound {self.max_force:.3g} eV/Å"
        if self.min_distance is not None and len(atoms) > 1:
            distances = neighbor_list("d", atoms, self.min_distance)
            if len(distances):
                return (
                    f"two atoms are {distances.min():.3f} Å apart, below the bound "
                    f"{self.min_distance:.3f} Å"
                )
        return None


class WatchdogStop(RuntimeError):
    """Raised by :func:`run_md` when the watchdog stops a run.

    Attributes:
        result: the :class:`MDResult` up to the stop, with ``stopped_reason`` set.
        last_good_atoms: a copy of the last frame that passed every check (the atoms passed
            to ``run_md`` are also reset to it).
        last_good_path: where that frame was written (next to the trajectory), or ``None``
            when the run had no trajectory.
    """

    def __init__(self, message: str, result: MDResult, last_good_atoms: Atoms, last_good_path: Any):
        super().__init__(message)
        self.result = result
        self.last_good_atoms = last_good_atoms
        self.last_good_path = last_good_path
