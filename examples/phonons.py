"""Phonon band structure and DOS of copper with phonopy (pip install 'mace-ase[phonons]').

    python examples/phonons.py --model emt
"""

import argparse

from ase.calculators.emt import EMT
from ase.build import bulk

from mace_ase import mace_mp, relax
from mace_ase.dynamics import phonons

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None, help="MACE model name or .model path, or 'emt'")
args = parser.parse_args()

calc = EMT() if args.model == "emt" else mace_mp(model=args.model, default_dtype="float64")

atoms = bulk("Cu", "fcc", a=3.6)
relax(atoms, calc, cell=True, fmax=1e-4)  # residual forces would show up as spurious modes
result = phonons(atoms, calc, supercell=(4, 4, 4), displacement=0.01, plot="phonons.png")
print(result)
print("wrote phonons.png")
