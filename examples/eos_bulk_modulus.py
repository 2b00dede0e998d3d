"""Equation of state and bulk modulus of copper (relax first, then fit E(V)).

    python examples/eos_bulk_modulus.py --model emt
"""

import argparse

from ase.calculators.emt import EMT
from ase.build import bulk

from mace_ase import mace_mp, relax
from mace_ase.dynamics import equation_of_state

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None, help="MACE model name or .model path, or 'emt'")
args = parser.parse_args()

calc = EMT() if args.model == "emt" else mace_mp(model=args.model, default_dtype="float64")

atoms = bulk("Cu", "fcc", a=3.6)
relax(atoms, calc, cell=True, fmax=1e-3)
eos = equation_of_state(atoms, calc, strain=0.06, npoints=9)
print(eos)  # EMT: B ~ 134 GPa; experiment: 140 GPa
eos.plot("eos.png")
print("wrote eos.png")
