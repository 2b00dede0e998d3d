"""``mace-ase eval | relax | md``: single points, relaxations and MD from the command line.

Structures are read with ``ase.io.read`` (any format ASE knows: extxyz, cif, POSCAR, ...).
``--model`` takes a catalogue name of any family (see ``mace-ase models list``; the family picks
``mace_mp``, ``mace_off``, ``mace_omol`` or ``mace_anicc``), a path to a ``.model`` file, or ``emt``
for ASE's EMT potential (metals only; for trying the commands without a model). Without
``--model`` the default model of ``mace_mp`` is used (downloaded once). Units: eV, Å, GPa, K, fs.

Ordinary mistakes (a missing file, an unknown model, a device this machine lacks, no network)
raise :class:`~mace_ase.cli.errors.CommandError` or a library error whose message says what to
do; ``mace-ase`` prints it as one ``error: ...`` line (see :mod:`mace_ase.cli.errors`).
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import numpy as np

from mace_ase.cli.errors import CommandError
from mace_ase.options import DTYPE_NAMES


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
    parser.add_argument("--model", default=None,
                        help="catalogue name (`mace-ase models list`), .model path, 'emt-demo' (shipped, offline) "
                             "or 'emt' (ASE's EMT); default: mace_mp's default model")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    parser.add_argument(
        "--dtype", choices=DTYPE_NAMES, default=default_dtype, help=f"default {default_dtype}"
    )
    parser.add_argument("--d3", action="store_true", help="add DFT-D3(BJ) dispersion (extra 'd3')")
    parser.add_argument("--radial", choices=("auto", "exact", "spline"), default="auto",
                        help="radial weights: auto (default: tabulated on the CPU, ~2x faster, in float64 within "
                             "1.1e-11 eV/atom and 1.2e-9 eV/Å of mace-torch on the test models; the MLP on GPUs "
                             "and for Hessians), exact (the MLP for every edge) or spline (always tabulated)")


def load_calculator(model: str | None, device: str | None, dtype: str, d3: bool = False, radial: str = "auto"):
    """The calculator the CLI flags describe.

    A catalogue name is loaded by the function of its family (``off23-medium`` by ``mace_off``, ...); anything
    else (None for the default, a path, a URL) by ``mace_mp``.
    """
    if model == "emt":
        from ase.calculators.emt import EMT

        calc = EMT()
    else:
        calc = _load_mace(model, check_device(device), dtype, radial)
    if d3:
        from mace_ase.dispersion import add_d3

        calc = add_d3(calc)
    return calc


def _load_mace(model: str | None, device: str | None, dtype: str, radial: str = "auto"):
    from mace_ase import foundations
    from mace_ase.io.registry import DownloadError, OfflineError, UnknownModelError, lookup

    function, name = foundations.mace_mp, model
    if model is not None and not model.startswith(("https://", "http://")) and not os.path.exists(model):
        try:
            entry = lookup(model)  # every family: the CLI has one --model for all of them
        except UnknownModelError as error:
            if os.sep not in model and not os.path.splitext(model)[1]:  # meant as a name, not as a file
                raise CommandError(f"{error} (`mace-ase models list` describes them); --model also takes the "
                                   "path of a .model file") from None
            # a path that does not exist: mace_mp says so
        else:
            function, name = getattr(foundations, foundations.function_for(entry)), entry.name
    try:
        return function(model=name, device=device, default_dtype=dtype, radial=radial)
    except (OfflineError, DownloadError) as error:
        if model is not None:
            raise
        default = foundations.DEFAULT_MODELS["mace_mp"][-1][1]
        raise CommandError(
            f"{error} No --model was given, so the default model {default!r} is needed; without network use "
            "`--model emt-demo` (shipped with mace-ase, for trying the commands) or --model PATH of a .model file."
        ) from error


def check_device(device: str | None) -> str | None:
    """``device`` if this machine has it (None: the best available), else a CommandError saying what to do.

    The checks are the calculator's own (:func:`mace_ase.validation.resolve_torch_device`), worded for the CLI.
    """
    if device is None:
        return None
    from mace_ase.validation import resolve_torch_device

    try:
        resolve_torch_device(device)
    except (RuntimeError, ValueError) as error:
        message = str(error).replace(f"device={device!r}", f"--device {device}").replace("device='cpu'",
                                                                                       "--device cpu")
        raise CommandError(message) from None
    return device


def check_elements(frames: list, calc: Any, path: str) -> None:
    """A CommandError when the model has no parameters for an element in ``frames`` (before any step is taken)."""
    from ase.data import chemical_symbols

    parts = [calc, *calc.mixer.calcs] if hasattr(calc, "mixer") else [calc]  # with --d3: a SumCalculator
    for part in parts:
        known = getattr(part, "atomic_numbers", None)
        if known is None:
            continue
        missing = sorted(set(int(z) for atoms in frames for z in atoms.numbers) - set(int(z) for z in known))
        if missing:
            name = part.parameters.get("model_name", "this model")
            raise CommandError(
                f"{path} contains {', '.join(chemical_symbols[z] for z in missing)}, for which {name} has no "
                f"parameters (it knows {', '.join(chemical_symbols[int(z)] for z in known)}); choose a model trained "
                "on these elements (`mace-ase models list`)."
            )


def _read(path: str, index: str = "-1"):
    """The frames of a structure file; a CommandError naming the file when it cannot be read."""
    from ase.io import read

    if os.path.isdir(path):
        raise CommandError(f"{path} is a directory; give a structure file (extxyz, cif, POSCAR, ... any format ASE "
                           "reads)")
    if not os.path.isfile(path):
        raise CommandError(f"no structure file {path}; give the path of a file ASE can read (extxyz, cif, POSCAR)")
    try:
        frames = read(path, index=index)
    except Exception as error:  # any parser failure is a problem with this file, whatever the format's reader raises
        raise CommandError(f"cannot read {path} as a structure ({type(error).__name__}: {error}); check the file "
                           "and its format (ASE guesses it from the name; e.g. .xyz, .cif, POSCAR)") from error
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise CommandError(f"{path} holds no structure (index {index!r})")
    return frames


def _eval(args: argparse.Namespace) -> int:
    from ase import units
    from ase.calculators.calculator import PropertyNotImplementedError
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = _read(args.file, args.index)  # before the model: a wrong file name fails at once
    calc = load_calculator(args.model, args.device, args.dtype, args.d3, args.radial)
    check_elements(frames, calc, args.file)
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
    calc = load_calculator(args.model, args.device, args.dtype, args.d3, args.radial)
    check_elements([atoms], calc, args.file)
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
    calc = load_calculator(args.model, args.device, args.dtype, args.d3, args.radial)
    check_elements([atoms], calc, args.file)
    # run_md's progress lines (INFO, when no terminal shows a bar) are this command's output even without -v
    md_log = logging.getLogger("mace_ase.dynamics.md")
    level = md_log.level
    if md_log.getEffectiveLevel() > logging.INFO:
        md_log.setLevel(logging.INFO)
    try:
        result = run_md(
            atoms, calc, ensemble=args.ensemble, temperature_k=args.temperature, timestep_fs=args.timestep,
            steps=args.steps, pressure_gpa=args.pressure, trajectory=args.traj, loginterval=args.loginterval,
            seed=args.seed, progress=False if args.no_progress else None, logfile=args.log,
        )
    except WatchdogStop as stop:
        print(f"stopped: {stop}")
        return 3
    finally:
        md_log.setLevel(level)
    print(result)
    if args.output:
        write(args.output, atoms)
        print(f"wrote {args.output}")
    return 0
