"""NVT molecular dynamics of copper at 600 K with a Langevin thermostat.

Writes md_nvt.traj (ASE trajectory, every 10 steps) and md_nvt.log (time, T, energies, volume,
pressure). A progress bar shows steps/s and ns/day on a terminal.

    python examples/md_nvt.py --model emt --steps 2000
"""

import argparse

import numpy as np
from ase.calculators.emt import EMT
from ase.build import bulk

from mace_ase import mace_mp, run_md

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None, help="MACE model name or .model path, or 'emt'")
parser.add_argument("--steps", type=int, default=2000)
args = parser.parse_args()

calc = EMT() if args.model == "emt" else mace_mp(model=args.model)  # mace_mp: float32, fast for MD

atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (3, 3, 3)  # 108 atoms
result = run_md(atoms, calc, ensemble="nvt-langevin", temperature_k=600, timestep_fs=2.0, steps=args.steps,
                trajectory="md_nvt.traj", logfile="md_nvt.log", loginterval=10, seed=42)
print(result)
half = result.times_ps >= result.times_ps[-1] / 2
print(f"mean T over the second half: {np.mean(result.temperatures[half]):.1f} K")
