"""Add DFT-D3(BJ) dispersion to a calculator (pip install 'mace-ase[d3]').

With MACE-MP the short form is ``mace_mp(dispersion=True)``; ``add_d3`` works for any ASE
calculator and returns an ASE SumCalculator (energies, forces and stress are summed).

    python examples/d3_dispersion.py --model emt
"""

import argparse

from ase.calculators.emt import EMT
from ase.build import bulk

from mace_ase import mace_mp
from mace_ase.dispersion import add_d3

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None, help="MACE model name or .model path, or 'emt'")
args = parser.parse_args()

base = EMT() if args.model == "emt" else mace_mp(model=args.model)

atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 2, 2)
atoms.calc = base
e_base = atoms.get_potential_energy()
atoms.calc = add_d3(base, xc="pbe", damping="bj")  # two-body cutoff 21.2 Å (40 bohr), as MACE-MP's D3
e_total = atoms.get_potential_energy()
print(f"energy without D3: {e_base:.4f} eV, with D3: {e_total:.4f} eV, "
      f"dispersion: {(e_total - e_base) / len(atoms):.4f} eV/atom")
