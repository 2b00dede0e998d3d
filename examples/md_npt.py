"""NPT molecular dynamics (isotropic MTK barostat) of copper at 300 K and 5 GPa.

Pressure is given in GPa; mace-ase converts it to ASE's eV/Å³. The MTK integrator refuses
constrained atoms (use nvt-langevin or nvt-bussi for those).

    python examples/md_npt.py --model emt --steps 2000
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

atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 2, 2)
v_start = atoms.get_volume()
result = run_md(atoms, calc, ensemble="npt-mtk", temperature_k=300, pressure_gpa=5.0, timestep_fs=2.0,
                steps=args.steps, pdamp_fs=500, trajectory="md_npt.traj", loginterval=10, seed=0)
print(result)
print(f"volume: {v_start:.1f} -> {np.mean(result.volumes[len(result.volumes) // 2:]):.1f} Å³, "
      f"mean pressure {np.mean(result.pressures_gpa[len(result.volumes) // 2:]):.2f} GPa")
