"""Equation of state and bulk modulus from energy-volume points (``ase.eos``).

The cell is scaled isotropically to ``npoints`` volumes in ``[1 - strain, 1 + strain] * V``
(fractional positions kept), the energies are fitted with ``ase.eos.EquationOfState``
(Birch-Murnaghan by default) and the bulk modulus ``B = V d²E/dV²`` at the minimum is
reported in GPa (ASE returns eV/Å³; 1 eV/Å³ = 160.2 GPa). For a meaningful B, start from a
relaxed structure (``relax(atoms, cell=True)``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import BaseCalculator

log = logging.getLogger(__name__)


@dataclass(repr=False)
class EOSResult:
    """Fitted equation of state: ``v0`` (Å³), ``e0`` (eV), ``bulk_modulus_gpa`` (GPa), and the
    sampled ``volumes`` (Å³) and ``energies`` (eV), both shape ``(npoints,)``."""

    volumes: np.ndarray
    energies: np.ndarray
    v0: float
    e0: float
    bulk_modulus_gpa: float
    eos: str

    def __repr__(self) -> str:
        return (
            f"EOSResult({self.eos}: V0 = {self.v0:.4f} Å³, E0 = {self.e0:.6f} eV, "
            f"B = {self.bulk_modulus_gpa:.2f} GPa)"
        )

    def plot(self, path: str | Path | None = None, ax=None):
        """Plot E(V) with the fit; save to ``path`` if given. Returns the matplotlib Figure."""
        from ase.eos import EquationOfState
        from matplotlib.figure import Figure

        fig = ax.figure if ax is not None else Figure(figsize=(5, 4))
        ax = ax if ax is not None else fig.add_subplot()
        fit = EquationOfState(self.volumes, self.energies, eos=self.eos)
        fit.fit()
        v = np.linspace(self.volumes.min(), self.volumes.max(), 200)
        ax.plot(v, fit.func(v, *fit.eos_parameters), "-", label=f"{self.eos} fit")
        ax.plot(self.volumes, self.energies, "o", label="calculated")
        ax.set_xlabel("volume (Å³)")
        ax.set_ylabel("energy (eV)")
        ax.set_title(f"B = {self.bulk_modulus_gpa:.1f} GPa, V0 = {self.v0:.3f} Å³")
        ax.legend()
        if path is not None:
            fig.savefig(path, dpi=120, bbox_inches="tight")
        return fig


def equation_of_state(
    atoms: Atoms,
    calc: BaseCalculator | None = None,
    strain: float = 0.06,
    npoints: int = 9,
    eos: str = "birchmurnaghan",
) -> EOSResult:
    """Fit E(V) around the current cell of ``atoms`` (which is left unchanged).

    Args:
        atoms: periodic structure, ideally relaxed.
        calc: calculator; ``None`` uses ``atoms.calc``.
        strain: largest relative volume change, e.g. 0.06 for ±6 %.
        npoints: number of volumes (>= 5 for a stable fit).
        eos: any ``ase.eos`` form: ``birchmurnaghan``, ``murnaghan``, ``vinet``, ``sj``, ...
    """
    from ase.eos import EquationOfState

    calc = calc if calc is not None else atoms.calc
    if calc is None:
        raise ValueError("No calculator: pass calc=... or set atoms.calc first.")
    if not (atoms.pbc.all() and atoms.cell.rank == 3):
        raise ValueError("An equation of state needs a fully periodic 3-D cell.")
    if npoints < 5 or not 0 < strain < 0.5:
        raise ValueError(f"Need npoints >= 5 and 0 < strain < 0.5, got npoints={npoints}, strain={strain}.")

    volumes, energies = [], []
    for factor in np.linspace(1.0 - strain, 1.0 + strain, npoints):
        scaled = atoms.copy()
        scaled.set_cell(atoms.cell[:] * factor ** (1.0 / 3.0), scale_atoms=True)
        scaled.calc = calc
        volumes.append(scaled.get_volume())
        energies.append(scaled.get_potential_energy())
    volumes, energies = np.array(volumes), np.array(energies)

    fit = EquationOfState(volumes, energies, eos=eos)
    v0, e0, bulk_modulus = fit.fit()  # Å³, eV, eV/Å³
    result = EOSResult(volumes, energies, float(v0), float(e0), float(bulk_modulus / units.GPa), eos)
    if not volumes.min() <= v0 <= volumes.max():
        log.warning("The E(V) minimum %.3f Å³ lies outside the sampled volumes; relax the cell first.", v0)
    log.info("%r", result)
    return result
