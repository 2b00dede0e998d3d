"""Relax a strained copper crystal, positions and cell, to zero pressure.

    python examples/relax_structure.py                 # MACE-MP default model
    python examples/relax_structure.py --model emt     # ASE's EMT, no model download
"""

import argparse

from ase.calculators.emt import EMT
from ase.build import bulk

from mace_ase import mace_mp, relax

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None, help="MACE model name or .model path, or 'emt'")
args = parser.parse_args()

calc = EMT() if args.model == "emt" else mace_mp(model=args.model, default_dtype="float64")

atoms = bulk("Cu", "fcc", a=3.8, cubic=True)  # ~6 % too large
atoms.rattle(0.02, seed=0)
result = relax(atoms, calc, cell=True, fmax=0.005, pressure_gpa=0.0, trajectory="relax.traj")
print(result)
print("lattice constants (Å):", atoms.cell.lengths().round(4))
atoms.write("relaxed.cif")
