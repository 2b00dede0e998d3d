"""Ensemble names -> ASE integrators, with the defaults and units in one table.

Every ensemble is one current (ASE 3.29) integrator class. Our drivers speak in
user units and convert once, here:

    ensemble          ASE class                                       damping times
    ----------------  ----------------------------------------------  ---------------------------------
    nve               ase.md.verlet.VelocityVerlet                    --
    nvt-langevin      ase.md.langevin.Langevin                        friction = 1 / tdamp_fs
    nvt-bussi         ase.md.bussi.Bussi                              taut = tdamp_fs
    nvt-nose-hoover   ase.md.nose_hoover_chain.NoseHooverChainNVT     tdamp = tdamp_fs
    npt-mtk           ase.md.nose_hoover_chain.IsotropicMTKNPT        tdamp, pdamp = pdamp_fs
    npt-mtk-aniso     ase.md.nose_hoover_chain.MTKNPT                 tdamp, pdamp (full cell)
    npt-langevin      ase.md.langevinbaoab.LangevinBAOAB              T_tau, P_tau (hydrostatic)
    npt-berendsen     ase.md.nptberendsen.NPTBerendsen                taut, taup; compressibility
                                                                      = 1 / bulk_modulus_gpa

Defaults: ``tdamp_fs = 100`` fs (ASE's advice: about 100 time steps of 1 fs) and
``pdamp_fs = 1000`` fs (about 1000 time steps). Pressure is taken in GPa and passed to ASE
in eV/Å³ (``pressure_gpa * ase.units.GPa``). ``npt-langevin`` targets a *stress* of
``-pressure``; ASE's barostat there includes the kinetic (ideal-gas) term, as our logged
pressure does. ``npt-berendsen`` is for equilibration only (it does not sample NPT).

Constraints (``FixAtoms`` etc.) are honoured only by ``nve``, ``nvt-langevin`` and
``nvt-bussi``. The others are refused: the MTK classes raise in ASE itself, the
Nose-Hoover chain counts 3N degrees of freedom and keeps its own unconstrained copy of the
positions, ``LangevinBAOAB`` is untested with constraints, and Berendsen rescales every
position (fixed ones too) with the cell.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from ase import Atoms, units
from ase.md.md import MolecularDynamics

DEFAULT_TDAMP_FS = 100.0  # thermostat time constant, fs
DEFAULT_PDAMP_FS = 1000.0  # barostat time constant, fs
DEFAULT_BULK_MODULUS_GPA = 100.0  # only used by npt-berendsen to set its compressibility


@dataclass(frozen=True)
class MDSettings:
    """The physical settings an integrator needs, in user units."""

    timestep_fs: float
    temperature_k: float
    pressure_gpa: float | None
    tdamp_fs: float
    pdamp_fs: float
    bulk_modulus_gpa: float
    rng: np.random.Generator


@dataclass(frozen=True)
class Ensemble:
    name: str
    ase_class: str  # for messages and docs
    barostat: bool
    honours_constraints: bool
    build: Callable[[Atoms, MDSettings], MolecularDynamics]


def _nve(atoms: Atoms, s: MDSettings) -> MolecularDynamics:
    from ase.md.verlet import VelocityVerlet

    return VelocityVerlet(atoms, timestep=s.timestep_fs * units.fs)


def _nvt_langevin(atoms: Atoms, s: MDSettings) -> MolecularDynamics:
    from ase.md.langevin import Langevin

    # fixcm=True is deprecated since ASE 3.28 (it does not sample NVT exactly).
    return Langevin(
        atoms,
        timestep=s.timestep_fs * units.fs,
        temperature_K=s.temperature_k,
        friction=1.0 / (s.tdamp_fs * units.fs),
        fixcm=False,
        rng=s.rng,
    )


def _nvt_bussi(atoms: Atoms, s: MDSettings) -> MolecularDynamics:
    from ase.md.bussi import Bussi

    return Bussi(
        atoms,
        timestep=s.timestep_fs * units.fs,
        temperature_K=s.temperature_k,
        taut=s.tdamp_fs * units.fs,
        rng=s.rng,
    )


def _nvt_nose_hoover(atoms: Atoms, s: MDSettings) -> MolecularDynamics:
    from ase.md.nose_hoover_chain import NoseHooverChainNVT

    return NoseHooverChainNVT(
        atoms,
        timestep=s.timestep_fs * units.fs,
        temperature_K=s.temperature_k,
        tdamp=s.tdamp_fs * units.fs,
    )


def _npt_mtk(atoms: Atoms, s: MDSettings, *, isotropic: bool = True) -> MolecularDynamics:
    from ase.md.nose_hoover_chain import MTKNPT, IsotropicMTKNPT

    cls = IsotropicMTKNPT if isotropic else MTKNPT
    return cls(
        atoms,
        timestep=s.timestep_fs * units.fs,
        temperature_K=s.temperature_k,
        pressure_au=s.pressure_gpa * units.GPa,
        tdamp=s.tdamp_fs * units.fs,
        pdamp=s.pdamp_fs * units.fs,
    )


def _npt_langevin(atoms: Atoms, s: MDSettings) -> MolecularDynamics:
    from ase.md.langevinbaoab import LangevinBAOAB

    with warnings.catch_warnings():
        # ASE warns that it picked its heuristic barostat mass; that is our documented default.
        warnings.filterwarnings("ignore", message="Using heuristic P_mass")
        return LangevinBAOAB(
            atoms,
            timestep=s.timestep_fs * units.fs,
            temperature_K=s.temperature_k,
            externalstress=-s.pressure_gpa * units.GPa,  # stress = -pressure
            hydrostatic=True,
            T_tau=s.tdamp_fs * units.fs,
            P_tau=s.pdamp_fs * units.fs,
            rng=s.rng,
        )


def _npt_berendsen(atoms: Atoms, s: MDSettings) -> MolecularDynamics:
    from ase.md.nptberendsen import NPTBerendsen

    return NPTBerendsen(
        atoms,
        timestep=s.timestep_fs * units.fs,
        temperature_K=s.temperature_k,
        pressure_au=s.pressure_gpa * units.GPa,
        taut=s.tdamp_fs * units.fs,
        taup=s.pdamp_fs * units.fs,
        compressibility_au=1.0 / (s.bulk_modulus_gpa * units.GPa),
        fixcm=True,
    )


ENSEMBLES: dict[str, Ensemble] = {
    e.name: e
    for e in (
        Ensemble("nve", "VelocityVerlet", False, True, _nve),
        Ensemble("nvt-langevin", "Langevin", False, True, _nvt_langevin),
        Ensemble("nvt-bussi", "Bussi", False, True, _nvt_bussi),
        Ensemble("nvt-nose-hoover", "NoseHooverChainNVT", False, False, _nvt_nose_hoover),
        Ensemble("npt-mtk", "IsotropicMTKNPT", True, False, _npt_mtk),
        Ensemble(
            "npt-mtk-aniso",
            "MTKNPT",
            True,
            False,
            lambda atoms, s: _npt_mtk(atoms, s, isotropic=False),
        ),
        Ensemble("npt-langevin", "LangevinBAOAB", True, False, _npt_langevin),
        Ensemble("npt-berendsen", "NPTBerendsen", True, False, _npt_berendsen),
    )
}


def get_ensemble(name: str) -> Ensemble:
    """Look an ensemble up by name; unknown names list the valid ones."""
    try:
        return ENSEMBLES[name]
    except KeyError:
        raise ValueError(f"Unknown ensemble {name!r}; available: {', '.join(ENSEMBLES)}") from None


def check_constraints(atoms: Atoms, ensemble: Ensemble) -> None:
    """Refuse constrained atoms for integrators that cannot honour constraints."""
    if not atoms.constraints or ensemble.honours_constraints:
        return
    names = ", ".join(type(c).__name__ for c in atoms.constraints)
    able = ", ".join(e.name for e in ENSEMBLES.values() if e.honours_constraints)
    raise ValueError(
        f"Ensemble {ensemble.name!r} ({ensemble.ase_class}) cannot honour constraints, but the atoms "
        f"carry {names}. Use one of: {able}; or remove the constraints (del atoms.constraints)."
    )
