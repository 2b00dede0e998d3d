"""Quick start, offline: NVT then NVE molecular dynamics of a Cu3Au alloy on the shipped `emt-demo` MACE model.

    python examples/quickstart.py [--model emt-demo|medium-mpa-0|PATH] [--steps 200]

Runs `--steps` of Langevin NVT at 600 K, then `--steps`/2 of NVE (float64, to show energy conservation), writes
quickstart.traj, and prints the mean temperature and the NVE energy drift per atom. `emt-demo` imitates ASE's EMT
potential; it is not a DFT model. With internet, `--model medium-mpa-0` runs the same on MACE-MPA-0.
"""

import argparse

import numpy as np
from ase.build import bulk

from mace_ase import mace_mp, run_md

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="emt-demo")
parser.add_argument("--steps", type=int, default=200)
args = parser.parse_args()

# L1_2 Cu3Au: an fcc cube with Au on the corners, 3x3x3 cubes = 108 atoms
atoms = bulk("Cu", "fcc", a=3.75, cubic=True) * (3, 3, 3)
atoms.numbers[[i for i, p in enumerate(atoms.get_scaled_positions() * 3) if np.allclose(p % 1.0, 0.0)]] = 79
calc = mace_mp(model=args.model, default_dtype="float64", device="cpu")

nvt = run_md(atoms, calc, ensemble="nvt-langevin", temperature_k=600, timestep_fs=2.0, steps=args.steps,
             trajectory="quickstart.traj", loginterval=10, seed=1)
nve = run_md(atoms, calc, ensemble="nve", timestep_fs=2.0, steps=max(args.steps // 2, 1), loginterval=10)

half = len(nvt.temperatures) // 2
drift = (nve.total_energies[-1] - nve.total_energies[0]) / len(atoms)
print(f"{atoms.get_chemical_formula()}: mean T (NVT, second half) = {np.mean(nvt.temperatures[half:]):.0f} K "
      f"(target 600 K); NVE energy drift = {drift:+.2e} eV/atom over {nve.times_ps[-1]:.2f} ps; "
      f"trajectory in quickstart.traj")
