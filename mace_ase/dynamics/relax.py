"""``relax``: geometry (and optionally cell) optimisation in one call.

A thin driver over ASE's optimisers. With ``cell=True`` the atoms are wrapped in
``ase.filters.FrechetCellFilter`` (ASE's recommended cell filter; ``ExpCellFilter`` is
deprecated), which minimises the enthalpy ``H = E + p V`` at the scalar pressure ``p``.
Pressure is given in GPa and passed to ASE in eV/Å³ (``p * ase.units.GPa``; 1 GPa =
0.00624 eV/Å³). ``fmax`` is in eV/Å; with a cell filter it also bounds the stress
components times the volume per atom, as ASE defines it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import BaseCalculator

log = logging.getLogger(__name__)

OPTIMIZERS = ("FIRE", "FIRE2", "BFGS", "LBFGS", "BFGSLineSearch", "LBFGSLineSearch")


@dataclass(repr=False)
class RelaxResult:
    """Outcome of :func:`relax`: the (relaxed in place) atoms, whether ``fmax`` was reached,
    optimiser steps taken, final potential energy (eV) and max force (eV/Å, atoms only)."""

    atoms: Atoms
    converged: bool
    steps: int
    energy: float
    fmax: float

    def __repr__(self) -> str:
        state = "converged" if self.converged else "NOT converged"
        return f"RelaxResult({state} in {self.steps} steps, E = {self.energy:.6f} eV, fmax = {self.fmax:.4f} eV/Å)"


def relax(
    atoms: Atoms,
    calc: BaseCalculator | None = None,
    fmax: float = 0.02,
    steps: int = 1000,
    optimizer: str = "FIRE",
    cell: bool = False,
    pressure_gpa: float = 0.0,
    fix_symmetry: bool = False,
    trajectory: str | Path | None = None,
    logfile: str | Path | None = None,
    *,
    hydrostatic_strain: bool = False,
) -> RelaxResult:
    """Relax ``atoms`` in place until every force is below ``fmax``.

    Args:
        atoms: the structure; positions (and the cell if ``cell``) change in place.
        calc: calculator to attach; ``None`` uses ``atoms.calc``.
        fmax: convergence threshold on the largest force, eV/Å.
        steps: maximum number of optimiser steps.
        optimizer: one of ``FIRE``, ``FIRE2``, ``BFGS``, ``LBFGS``, ``BFGSLineSearch``,
            ``LBFGSLineSearch`` (ASE's ``ase.optimize`` classes).
        cell: also relax the cell (``FrechetCellFilter``), to the pressure ``pressure_gpa``.
        pressure_gpa: external pressure for the cell relaxation, GPa.
        fix_symmetry: keep the space group (``ase.constraints.FixSymmetry``; needs spglib).
            The constraint stays attached to the atoms afterwards, so later MD with an
            ensemble that refuses constraints needs ``del atoms.constraints``.
        trajectory: ASE ``.traj`` file of the optimisation path.
        logfile: optimiser log (``"-"`` for stdout); ``None`` writes none.
        hydrostatic_strain: with ``cell``, keep the cell shape and relax only the volume.

    Returns:
        :class:`RelaxResult`. Not converging within ``steps`` is reported in the result
        (``converged=False``) and logged as a warning, not raised.
    """
    if calc is not None:
        atoms.calc = calc
    if atoms.calc is None:
        raise ValueError("The atoms have no calculator: pass calc=... or set atoms.calc first.")
    if pressure_gpa and not cell:
        raise ValueError(f"pressure_gpa={pressure_gpa} only acts on the cell: pass cell=True as well.")
    if cell and not (atoms.pbc.all() and atoms.cell.rank == 3):
        raise ValueError("cell=True needs a fully periodic 3-D cell.")
    optimizer_cls = _optimizer_class(optimizer)

    if fix_symmetry:
        from ase.constraints import FixSymmetry

        atoms.set_constraint(list(atoms.constraints) + [FixSymmetry(atoms)])

    target = atoms
    if cell:
        from ase.filters import FrechetCellFilter

        target = FrechetCellFilter(
            atoms, scalar_pressure=pressure_gpa * units.GPa, hydrostatic_strain=hydrostatic_strain
        )

    opt = optimizer_cls(
        target,
        logfile=str(logfile) if logfile is not None else None,
        trajectory=str(trajectory) if trajectory is not None else None,
    )
    with opt:  # closes the log and trajectory files
        converged = bool(opt.run(fmax=fmax, steps=steps))

    forces = atoms.get_forces()
    result = RelaxResult(
        atoms=atoms,
        converged=converged,
        steps=int(opt.nsteps),
        energy=float(atoms.get_potential_energy()),
        fmax=float(np.sqrt((forces**2).sum(axis=1).max())) if len(atoms) else 0.0,
    )
    if converged:
        log.info("%r", result)
    else:
        log.warning("Relaxation did not reach fmax=%g eV/Å in %d steps: %r", fmax, steps, result)
    return result


def _optimizer_class(name: str):
    import ase.optimize

    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; available: {', '.join(OPTIMIZERS)}")
    if name == "FIRE2":
        from ase.optimize.fire2 import FIRE2

        return FIRE2
    return getattr(ase.optimize, name)
