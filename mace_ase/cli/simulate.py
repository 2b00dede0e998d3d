"""``mace-ase eval | relax | md``: single points, relaxations and MD from the command line.

Structures are read with ``ase.io.read`` (any format ASE knows: extxyz, cif, POSCAR, ...).
``--model`` takes a foundation-model name (see ``mace-ase models list``), a path to a
``.model`` file, or ``emt`` for ASE's EMT potential (metals only; for trying the commands
without a model). Units: eV, Å, GPa, K, fs.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the ``eval``, ``relax`` and ``md`` sub-commands."""
    from mace_ase.dynamics.ensembles import ENSEMBLES
    from mace_ase.dynamics.relax import OPTIMIZERS

    p = subparsers.add_parser("eval", help="energy, forces and stress of every frame in a file")
    _add_common(p, default_dtype="float64")
    p.add_argument("--index", default=":", help="frames to evaluate, ASE index syntax (default: all)")
    p.add_argument("-o", "--output", help="write the frames with their results (extxyz recommended)")
    p.set_defaults(func=_eval)

    p = subparsers.add_parser("relax", help="relax positions (and the cell with --cell)")
    _add_common(p, default_dtype="float64")
    p.add_argument("--cell", action="store_true", help="also relax the cell (FrechetCellFilter)")
    p.add_argument("--pressure", type=float, default=0.0, help="pressure for --cell, GPa (default 0)")
    p.add_argument("--fmax", type=float, default=0.02, help="force threshold, eV/Å (default 0.02)")
    p.add_argument("--steps", type=int, default=1000, help="maximum optimiser steps (default 1000)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="FIRE")
    p.add_argument("--fix-symmetry", action="store_true", help="keep the space group (needs spglib)")
    p.add_argument("--traj", help="trajectory of the optimisation (.traj)")
    p.add_argument("-o", "--output", required=True, help="relaxed structure (any ASE format)")
    p.set_defaults(func=_relax)

    p = subparsers.add_parser("md", help="molecular dynamics (NVE, NVT, NPT)")
    _add_common(p, default_dtype="float32")
    p.add_argument("--ensemble", choices=list(ENSEMBLES), default="nvt-langevin")
    p.add_argument("--steps", type=int, required=True, help="number of MD steps")
    p.add_argument("--temperature", type=float, default=300.0, help="K (default 300)")
    p.add_argument("--timestep", type=float, default=1.0, help="fs (default 1)")
    p.add_argument("--pressure", type=float, default=None, help="GPa, npt-* only (default 0)")
    p.add_argument("--traj", help="trajectory file (.traj, or .xyz for extended XYZ)")
    p.add_argument("--log", help="text log of time, T, energies, volume, pressure")
    p.add_argument("--loginterval", type=int, default=10, help="steps between log rows and frames")
    p.add_argument("--seed", type=int, default=None, help="random seed (velocities, thermostat)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-o", "--output", help="final structure (any ASE format)")
    p.set_defaults(func=_md)


def _add_common(parser: argparse.ArgumentParser, default_dtype: str) -> None:
    parser.add_argument("file", help="structure file (any format ASE reads)")
    parser.add_argument("--model", default=None, help="foundation model name, .model path, or 'emt'")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    parser.add_argument(
        "--dtype", choices=("float32", "float64"), default=default_dtype, help=f"default {default_dtype}"
    )
    parser.add_argument("--d3", action="store_true", help="add DFT-D3(BJ) dispersion (extra 'd3')")


def load_calculator(model: str | None, device: str | None, dtype: str, d3: bool = False):
    """The calculator the CLI flags describe."""
    if model == "emt":
        from ase.calculators.emt import EMT

        calc = EMT()
    else:
        from mace_ase.foundations import mace_mp

        calc = mace_mp(model=model, device=device, default_dtype=dtype)  # model=None: the default model
    if d3:
        from mace_ase.dispersion import add_d3

        calc = add_d3(calc)
    return calc


def _read(path: str, index: str = "-1"):
    from ase.io import read

    frames = read(path, index=index)
    return frames if isinstance(frames, list) else [frames]


def _eval(args: argparse.Namespace) -> int:
    from ase import units
    from ase.calculators.calculator import PropertyNotImplementedError
    from ase.calculators.singlepoint import SinglePointCalculator

    calc = load_calculator(args.model, args.device, args.dtype, args.d3)
    frames = _read(args.file, args.index)
    print(f"{'frame':>5} {'atoms':>6} {'energy/eV':>16} {'eV/atom':>12} {'fmax/eV/Å':>10} {'P/GPa':>9}")
    for i, atoms in enumerate(frames):
        atoms.calc = calc
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        results = {"energy": energy, "free_energy": energy, "forces": forces}
        pressure = float("nan")
        if atoms.pbc.all() and atoms.cell.rank == 3:
            try:
                results["stress"] = atoms.get_stress()
                pressure = -results["stress"][:3].mean() / units.GPa
            except PropertyNotImplementedError:
                pass
        fmax = float(np.sqrt((forces**2).sum(axis=1).max())) if len(atoms) else 0.0
        print(f"{i:5d} {len(atoms):6d} {energy:16.6f} {energy / len(atoms):12.6f} {fmax:10.4f} {pressure:9.3f}")
        atoms.calc = SinglePointCalculator(atoms, **results)  # freeze results for writing
    if args.output:
        from ase.io import write

        write(args.output, frames)
        print(f"wrote {len(frames)} frame(s) with results to {args.output}")
    return 0


def _relax(args: argparse.Namespace) -> int:
    from ase.io import write

    from mace_ase.dynamics.relax import relax

    atoms = _read(args.file)[0]
    calc = load_calculator(args.model, args.device, args.dtype, args.d3)
    result = relax(
        atoms, calc, fmax=args.fmax, steps=args.steps, optimizer=args.optimizer, cell=args.cell,
        pressure_gpa=args.pressure, fix_symmetry=args.fix_symmetry, trajectory=args.traj, logfile="-",
    )
    atoms.set_constraint()  # FixSymmetry is not storable in most formats
    write(args.output, atoms)
    print(f"{result}\nwrote {args.output}")
    return 0 if result.converged else 1


def _md(args: argparse.Namespace) -> int:
    from ase.io import write

    from mace_ase.dynamics.md import run_md
    from mace_ase.dynamics.watchdog import WatchdogStop

    atoms = _read(args.file)[0]
    calc = load_calculator(args.model, args.device, args.dtype, args.d3)
    try:
        result = run_md(
            atoms, calc, ensemble=args.ensemble, temperature_k=args.temperature, timestep_fs=args.timestep,
            steps=args.steps, pressure_gpa=args.pressure, trajectory=args.traj, loginterval=args.loginterval,
            seed=args.seed, progress=False if args.no_progress else None, logfile=args.log,
        )
    except WatchdogStop as stop:
        print(f"stopped: {stop}")
        return 3
    print(result)
    if args.output:
        write(args.output, atoms)
        print(f"wrote {args.output}")
    return 0
