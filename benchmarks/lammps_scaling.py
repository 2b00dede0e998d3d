"""LAMMPS (pair_style mliap unified) MD speed on 1..P MPI ranks, fcc Cu-Au alloy, emt-demo model.

    OMP_NUM_THREADS=1 python benchmarks/lammps_scaling.py --atoms 2000 --ranks 1 2 --steps 5 [--dtype float64]

Needs LAMMPS from ``scripts/build_lammps.sh`` in this Python. For each rank count: ``run 1`` (setup, first call),
then ``run STEPS`` of NVE at 300 K, 1 fs; steps/s from LAMMPS's "Loop time". Also times one ASE
``MACECalculator`` force call on the same structure. Prints one JSON line per rank count.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ase.build import bulk

ROOT = Path(__file__).resolve().parents[1]
MASSES = {"Cu": 63.546, "Au": 196.97}


def structure(n_atoms: int, seed: int = 0):
    repeat = max(1, round((n_atoms / 4) ** (1 / 3)))
    atoms = bulk("Cu", "fcc", a=3.70, cubic=True).repeat(repeat)
    rng = np.random.default_rng(seed)
    atoms.numbers[rng.random(len(atoms)) < 0.25] = 79
    atoms.rattle(0.05, seed=seed)
    atoms.wrap()
    return atoms


def write_data(atoms, path: Path) -> None:
    cell = atoms.cell.array
    lines = ["bench", "", f"{len(atoms)} atoms", "2 atom types", ""]
    lines += [f"0.0 {float(cell[k, k])!r} {a}lo {a}hi" for k, a in enumerate("xyz")]
    lines += ["", "Masses", "", f"1 {MASSES['Cu']}", f"2 {MASSES['Au']}", "", "Atoms # atomic", ""]
    for k, (z, p) in enumerate(zip(atoms.numbers, atoms.positions)):
        x, y, z_ = (repr(float(v)) for v in p)
        lines.append(f"{k + 1} {1 if z == 29 else 2} {x} {y} {z_}")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--atoms", type=int, default=2000)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--model", default=str(ROOT / "models" / "emt-demo.model"))
    parser.add_argument("--ase", action="store_true", help="also time one ASE force call")
    args = parser.parse_args()

    from mace_ase.lammps import export_lammps, lammps_input_lines

    atoms = structure(args.atoms)
    ase_s = None
    if args.ase:
        from mace_ase import MACECalculator

        atoms.calc = MACECalculator(args.model, device="cpu", default_dtype=args.dtype)
        atoms.get_forces()
        atoms.rattle(0.01, seed=3)
        start = time.perf_counter()
        atoms.get_forces()
        ase_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_data(atoms, folder / "structure.data")
        model_file = folder / "model.mliap.pkl"
        unified = export_lammps(args.model, model_file, dtype=args.dtype)
        lines = lammps_input_lines(unified, model_file, ["Cu", "Au"])
        body = "\n".join([lines[0], "atom_style atomic", "atom_modify map yes", "read_data structure.data",
                          *lines[1:], "neighbor 2.0 bin", "neigh_modify delay 0 every 1 check yes",
                          "velocity all create 300 12345 loop geom", "fix md all nve", "timestep 0.001",
                          "thermo 1", "run 1", f"run {args.steps}"])
        (folder / "in.lammps").write_text(body + "\n")
        env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                   OMPI_MCA_btl="self,vader")
        for ranks in args.ranks:
            start = time.perf_counter()
            done = subprocess.run(["mpirun", "--oversubscribe", "-np", str(ranks), sys.executable, "-m",
                                   "mace_ase.lammps.run", "in.lammps", "-log", "log.lammps", "-screen", "none"],
                                  cwd=folder, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            log = (folder / "log.lammps").read_text() if (folder / "log.lammps").exists() else ""
            if done.returncode != 0:
                raise SystemExit(f"LAMMPS failed:\n{done.stderr[-2000:]}\n{log[-2000:]}")
            loops = re.findall(r"Loop time of ([0-9.eE+-]+) on (\d+) procs for (\d+) steps", log)
            loop_s, _, steps = loops[-1]
            ghosts = re.findall(r"Nghost:\s+([0-9.eE+-]+)", log)
            print(json.dumps({
                "benchmark": "lammps_mliap", "atoms": len(atoms), "ranks": ranks, "dtype": args.dtype,
                "steps": int(steps), "loop_s": float(loop_s), "steps_per_s": int(steps) / float(loop_s),
                "ms_per_atom_step": 1e3 * float(loop_s) / int(steps) / len(atoms) * ranks,
                "avg_ghosts_per_rank": float(ghosts[-1]) if ghosts else None, "wall_s": round(wall, 1),
                "ase_force_call_s": ase_s,
                "max_rss_of_a_rank_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                "load_average": os.getloadavg()[0], "cores": os.cpu_count(),
            }), flush=True)


if __name__ == "__main__":
    main()
