"""Vibrational frequencies of a water molecule from the Hessian.

MACE models give the Hessian by autograd (``mace_ase.hessian.hessian``); for other
calculators (here EMT with --model emt) ``finite_difference_hessian`` does 6N force calls.

    python examples/hessian_vibrations.py --model emt
"""

import argparse

from ase.build import molecule
from ase.vibrations import VibrationsData

from mace_ase import mace_off, relax
from mace_ase.hessian import finite_difference_hessian, hessian

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None, help="MACE-OFF model name or .model path, or 'emt'")
args = parser.parse_args()

atoms = molecule("H2O")
if args.model == "emt":  # EMT's H and O are for testing only, not chemistry
    from ase.calculators.emt import EMT

    calc = EMT()
    relax(atoms, calc, fmax=1e-4, optimizer="BFGS")
    matrix = finite_difference_hessian(atoms, calc)
else:
    calc = mace_off(model=args.model, default_dtype="float64") if args.model else mace_off(default_dtype="float64")
    relax(atoms, calc, fmax=1e-4, optimizer="BFGS")
    matrix = hessian(calc, atoms)  # eV/Å², shape (9, 9)

vibrations = VibrationsData.from_2d(atoms, matrix)
print("frequencies (cm^-1):", [f"{f:.0f}" for f in vibrations.get_frequencies().real[-3:]])
