"""Harmonic phonons with phonopy: band structure along ASE's high-symmetry path, and DOS.

Finite displacements: phonopy displaces symmetry-inequivalent atoms of a supercell by
``displacement`` Å, the calculator gives the forces, and phonopy builds the force constants
``Phi_ij = -dF_i/du_j`` (eV/Å²) and the dynamical matrix. Frequencies are in THz
(1 THz = 4.136 meV = 33.36 cm⁻¹); imaginary modes are shown as negative frequencies.

The structure should be relaxed first (``relax(atoms, cell=True, fmax=1e-3)``): residual
forces show up as spurious (often imaginary) modes. Needs the optional extra ``phonons``
(``phonopy``, ``matplotlib``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import BaseCalculator

log = logging.getLogger(__name__)

DEFAULT_MIN_SUPERCELL_LENGTH = 10.0  # Å; each supercell vector at least this long


@dataclass(repr=False)
class PhononResult:
    """Band structure and DOS.

    ``path_x`` has shape ``(n_k,)``, ``band_frequencies_thz`` ``(n_k, 3 * n_primitive)``;
    ``special_x`` and ``special_labels`` mark the high-symmetry points. The DOS is
    ``dos_frequencies_thz`` and ``dos`` (states/THz), both ``(n_freq,)``. ``phonopy`` is the
    underlying ``phonopy.Phonopy`` object (force constants, thermal properties, ...).
    """

    path_x: np.ndarray
    band_frequencies_thz: np.ndarray
    special_x: np.ndarray
    special_labels: list[str]
    dos_frequencies_thz: np.ndarray
    dos: np.ndarray
    supercell: tuple[int, int, int]
    phonopy: Any

    def __repr__(self) -> str:
        lo, hi = self.band_frequencies_thz.min(), self.band_frequencies_thz.max()
        path = "".join(self.special_labels)
        return f"PhononResult(supercell {self.supercell}, path {path}, {lo:.2f} to {hi:.2f} THz)"

    def plot(self, path: str | Path | None = None):
        """Band structure (left) and DOS (right); saved to ``path`` if given. Returns the Figure."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4))
        bands, dos = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 1]})
        bands.plot(self.path_x, self.band_frequencies_thz, color="tab:blue", lw=1)
        for x in self.special_x:
            bands.axvline(x, color="0.7", lw=0.5)
        bands.axhline(0.0, color="0.3", lw=0.5)
        bands.set_xticks(self.special_x, [_pretty(label) for label in self.special_labels])
        bands.set_xlim(self.path_x[0], self.path_x[-1])
        bands.set_ylabel("frequency (THz)")
        dos.plot(self.dos, self.dos_frequencies_thz, color="tab:blue", lw=1)
        dos.fill_betweenx(self.dos_frequencies_thz, self.dos, alpha=0.3)
        dos.set_xlabel("DOS (1/THz)")
        dos.set_xlim(left=0)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120, bbox_inches="tight")
        return fig


def phonons(
    atoms: Atoms,
    calc: BaseCalculator | None = None,
    supercell: Sequence[int] | None = None,
    displacement: float = 0.01,
    mesh: int | Sequence[int] = 20,
    npoints: int = 200,
    plot: str | Path | None = None,
) -> PhononResult:
    """Phonon band structure and DOS of ``atoms`` with phonopy.

    Args:
        atoms: periodic, relaxed structure (unit cell; phonopy finds the primitive cell).
        calc: calculator for the displaced supercells; ``None`` uses ``atoms.calc``.
        supercell: repetitions ``(n1, n2, n3)``; ``None`` picks the smallest with every
            supercell vector at least 10 Å long.
        displacement: finite displacement, Å.
        mesh: q-point mesh for the DOS (``n`` means ``n x n x n``).
        npoints: q-points along the band path (ASE's ``cell.bandpath``).
        plot: write the band + DOS figure to this file (png, pdf, svg, ...).
    """
    try:
        from phonopy import Phonopy
        from phonopy.structure.atoms import PhonopyAtoms
    except ImportError as error:
        raise ImportError("phonons() needs phonopy: pip install 'mace-ase[phonons]'") from error

    calc = calc if calc is not None else atoms.calc
    if calc is None:
        raise ValueError("No calculator: pass calc=... or set atoms.calc first.")
    if not (atoms.pbc.all() and atoms.cell.rank == 3):
        raise ValueError("Phonons need a fully periodic 3-D cell.")
    if supercell is None:
        lengths = atoms.cell.lengths()
        supercell = tuple(int(np.ceil(DEFAULT_MIN_SUPERCELL_LENGTH / length)) for length in lengths)
    supercell = tuple(int(n) for n in supercell)

    unitcell = PhonopyAtoms(
        symbols=atoms.get_chemical_symbols(), cell=atoms.cell[:], scaled_positions=atoms.get_scaled_positions()
    )
    phonon = Phonopy(unitcell, supercell_matrix=np.diag(supercell), primitive_matrix="auto")
    phonon.generate_displacements(distance=displacement)
    displaced = phonon.supercells_with_displacements
    log.info("Phonons: %d displaced supercell(s) of %d atoms", len(displaced), len(displaced[0]))
    phonon.forces = [_forces(cell, calc) for cell in displaced]
    phonon.produce_force_constants(show_drift=False)

    primitive = _to_ase(phonon.primitive)
    bandpath = primitive.cell.bandpath(npoints=npoints)
    phonon.run_qpoints(bandpath.kpts)
    frequencies = np.asarray(phonon.qpoints.frequencies)  # (n_k, 3 n_prim), THz
    path_x, special_x, labels = bandpath.get_linear_kpoint_axis()
    special_x, labels = _merge_breaks(special_x, labels)

    phonon.run_mesh([mesh] * 3 if np.isscalar(mesh) else list(mesh), is_gamma_center=True)
    phonon.run_total_dos()
    dos = phonon.total_dos  # frequency_points (THz), dos (states/THz)

    result = PhononResult(
        path_x=np.asarray(path_x),
        band_frequencies_thz=frequencies,
        special_x=np.asarray(special_x),
        special_labels=list(labels),
        dos_frequencies_thz=np.asarray(dos.frequency_points),
        dos=np.asarray(dos.dos),
        supercell=supercell,
        phonopy=phonon,
    )
    if frequencies.min() < -0.1:
        log.warning(
            "Imaginary modes down to %.2f THz: the structure may not be relaxed, or the supercell is too small.",
            frequencies.min(),
        )
    if plot is not None:
        result.plot(plot)
    return result


def _to_ase(cell) -> Atoms:
    return Atoms(symbols=cell.symbols, cell=cell.cell, scaled_positions=cell.scaled_positions, pbc=True)


def _forces(cell, calc: BaseCalculator) -> np.ndarray:
    atoms = _to_ase(cell)
    atoms.calc = calc
    return atoms.get_forces()


def _merge_breaks(special_x: np.ndarray, labels: list[str]) -> tuple[np.ndarray, list[str]]:
    """A jump in the path (``K,U``) gives two labels at one x: show them as ``K|U``."""
    xs: list[float] = []
    merged: list[str] = []
    for x, label in zip(special_x, labels):
        if xs and np.isclose(x, xs[-1]):
            merged[-1] = f"{merged[-1]}|{label}"
        else:
            xs.append(float(x))
            merged.append(label)
    return np.array(xs), merged


def _pretty(label: str) -> str:
    return label.replace("G", "Γ")
