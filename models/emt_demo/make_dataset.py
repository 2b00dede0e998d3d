"""Generate the EMT training data for the ``emt-demo`` MACE model.

The labels come from ASE's EMT calculator (a classical effective-medium potential for Al, Cu, Ag, Au, Ni,
Pd and Pt), so the model trained on them imitates EMT -- it is NOT a DFT model.

Structures (all small, 4-32 atoms, so training stays cheap on a CPU):

* bulk fcc crystals of each element and random fcc alloys of the seven metals,
  strained isotropically (+-6 % in lattice constant) and by shear, and rattled;
* bulk cells with a vacancy;
* (111), (100) and (110) slabs, elemental and alloyed, plain and rattled (periodic in x, y only);
* snapshots from short EMT Langevin MD runs at 300-1500 K (bulk and slabs).

Labels are written with mace-torch's extxyz keys ``REF_energy`` (eV), ``REF_forces`` (eV/Å) and, for cells
periodic in all three directions only, ``REF_stress`` (eV/Å³, Voigt order of ASE's 6-vector). A held-out test set
is written separately from the training and validation sets.

Usage (any venv with ASE; deterministic for a given --seed)::

    python models/emt_demo/make_dataset.py --out /work/emt_data
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.build import bulk, fcc100, fcc110, fcc111, make_supercell
from ase.calculators.emt import EMT
from ase.io import write
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta

ELEMENTS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")

# Primitive-cell supercells: (matrix, number of atoms). Cubic fcc cells are built with cubic=True.
PRIMITIVE_SUPERCELLS = {
    "prim2x2x2": np.diag([2, 2, 2]),  # 8 atoms
    "prim3x3x3": np.diag([3, 3, 3]),  # 27 atoms
    "prim2x2x3": np.diag([2, 2, 3]),  # 12 atoms
}


def emt_lattice_constants() -> dict[str, float]:
    """EMT's own fcc lattice constants (Å), from a quick one-dimensional energy minimisation."""
    constants = {}
    for symbol in ELEMENTS:
        a0 = bulk(symbol, "fcc").cell.cellpar()[0] * np.sqrt(2.0)
        trial = np.linspace(0.94 * a0, 1.06 * a0, 61)
        energies = []
        for a in trial:
            atoms = bulk(symbol, "fcc", a=a)
            atoms.calc = EMT()
            energies.append(atoms.get_potential_energy())
        fit = np.polyfit(trial, energies, 4)
        roots = np.roots(np.polyder(fit))
        roots = roots[np.isreal(roots)].real
        constants[symbol] = float(roots[np.argmin(np.abs(roots - trial[np.argmin(energies)]))])
    return constants


class Generator:
    """Builds labelled structures; every random choice goes through one seeded generator."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.a0 = emt_lattice_constants()

    # --- building blocks -------------------------------------------------------------------------------
    def random_composition(self, n_atoms: int) -> list[str]:
        """Elemental (30 %) or a random alloy of 2-4 (sometimes all 7) of the metals."""
        roll = self.rng.random()
        if roll < 0.3:
            return [str(self.rng.choice(ELEMENTS))] * n_atoms
        n_species = 7 if roll > 0.9 else int(self.rng.integers(2, 5))
        species = self.rng.choice(ELEMENTS, size=n_species, replace=False)
        weights = self.rng.dirichlet(np.ones(n_species))
        return [str(s) for s in self.rng.choice(species, size=n_atoms, p=weights)]

    def fcc_cell(self) -> Atoms:
        """An fcc cell of 4-32 atoms with random species and Vegard's-law lattice constant."""
        kind = self.rng.choice(["cubic1", "cubic2", *PRIMITIVE_SUPERCELLS])
        if kind == "cubic1":
            atoms = bulk("Cu", "fcc", a=1.0, cubic=True)  # 4 atoms
        elif kind == "cubic2":
            atoms = bulk("Cu", "fcc", a=1.0, cubic=True).repeat(2)  # 32 atoms
        else:
            atoms = make_supercell(bulk("Cu", "fcc", a=1.0), PRIMITIVE_SUPERCELLS[kind])
        symbols = self.random_composition(len(atoms))
        atoms.set_chemical_symbols(symbols)
        a = float(np.mean([self.a0[s] for s in symbols]))
        atoms.set_cell(atoms.cell * a, scale_atoms=True)
        return atoms

    def strain(self, atoms: Atoms, isotropic: float, shear: float) -> None:
        """Apply a random isotropic (fractional, +-isotropic) and symmetric shear (+-shear) strain."""
        eps = np.eye(3) * (1.0 + self.rng.uniform(-isotropic, isotropic))
        off = self.rng.uniform(-shear, shear, size=(3, 3))
        eps += 0.5 * (off + off.T) * (1 - np.eye(3))
        atoms.set_cell(atoms.cell @ eps, scale_atoms=True)

    def rattle(self, atoms: Atoms, stdev: float) -> None:
        atoms.positions += self.rng.normal(0.0, stdev, size=atoms.positions.shape)

    def slab(self) -> Atoms:
        """A 12-20 atom fcc(111)/(100)/(110) slab with 6 Å of vacuum on each side, periodic in x and y."""
        builder = self.rng.choice(["111", "100", "110"])
        layers = int(self.rng.integers(3, 5))
        size = (2, 2, layers) if builder != "110" else (2, 2, layers + 1)
        make = {"111": fcc111, "100": fcc100, "110": fcc110}[builder]
        symbols = self.random_composition(int(np.prod(size)))
        a = float(np.mean([self.a0[s] for s in symbols]))
        atoms = make("Cu", size=size, a=a, vacuum=6.0)
        atoms.set_chemical_symbols(symbols)
        atoms.pbc = (True, True, False)
        return atoms

    # --- structure families ----------------------------------------------------------------------------
    def bulk_strained(self) -> Atoms:
        atoms = self.fcc_cell()
        self.strain(atoms, isotropic=0.06, shear=0.05)
        self.rattle(atoms, stdev=self.rng.uniform(0.0, 0.12))
        atoms.info["config_type"] = "bulk"
        return atoms

    def bulk_vacancy(self) -> Atoms:
        atoms = self.fcc_cell()
        while len(atoms) < 8:
            atoms = self.fcc_cell()
        del atoms[int(self.rng.integers(len(atoms)))]
        self.strain(atoms, isotropic=0.03, shear=0.02)
        self.rattle(atoms, stdev=self.rng.uniform(0.0, 0.08))
        atoms.info["config_type"] = "vacancy"
        return atoms

    def surface(self) -> Atoms:
        atoms = self.slab()
        self.rattle(atoms, stdev=self.rng.uniform(0.0, 0.1))
        atoms.info["config_type"] = "surface"
        return atoms

    def md_snapshots(self, n_snapshots: int, slab: bool) -> list[Atoms]:
        """Snapshots from one short EMT Langevin run at a random temperature in 300-1500 K."""
        if slab:
            atoms = self.slab()
        else:
            atoms = self.fcc_cell()
            while len(atoms) < 8:
                atoms = self.fcc_cell()
            self.strain(atoms, isotropic=0.02, shear=0.01)
        temperature = float(self.rng.uniform(300.0, 1500.0))
        atoms.calc = EMT()
        thermalize_momenta(atoms, temperature, rng=self.rng)
        dyn = Langevin(atoms, 3.0 * units.fs, temperature_K=temperature, friction=0.02, fixcm=False, rng=self.rng)
        dyn.run(100)  # equilibrate
        snapshots = []
        for _ in range(n_snapshots):
            dyn.run(50)
            snap = atoms.copy()
            snap.info["config_type"] = "md_slab" if slab else "md_bulk"
            snap.info["temperature_K"] = round(temperature, 1)
            snapshots.append(snap)
        return snapshots


def label(atoms: Atoms) -> Atoms:
    """Attach EMT energy, forces and (fully periodic cells only) stress under mace-torch's REF_ keys."""
    labelled = Atoms(atoms.get_chemical_symbols(), positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    labelled.info.update({k: v for k, v in atoms.info.items() if k in ("config_type", "temperature_K")})
    labelled.calc = EMT()
    labelled.info["REF_energy"] = float(labelled.get_potential_energy())
    labelled.arrays["REF_forces"] = labelled.get_forces().copy()
    if labelled.pbc.all():
        labelled.info["REF_stress"] = labelled.get_stress(voigt=True).copy()
    labelled.calc = None
    return labelled


def isolated_atoms() -> list[Atoms]:
    """One isolated atom per element, tagged as mace-torch's IsolatedAtom (kept only for reference)."""
    out = []
    for symbol in ELEMENTS:
        atoms = Atoms(symbol, positions=[[0.0, 0.0, 0.0]], cell=[20.0, 20.0, 20.0], pbc=False)
        atoms.calc = EMT()
        atoms.info["REF_energy"] = float(atoms.get_potential_energy())
        atoms.arrays["REF_forces"] = np.zeros((1, 3))
        atoms.info["config_type"] = "IsolatedAtom"
        atoms.calc = None
        out.append(atoms)
    return out


def generate(seed: int, n_bulk: int, n_vacancy: int, n_surface: int, n_md_bulk: int, n_md_slab: int) -> list[Atoms]:
    gen = Generator(seed)
    structures: list[Atoms] = []
    structures += [gen.bulk_strained() for _ in range(n_bulk)]
    structures += [gen.bulk_vacancy() for _ in range(n_vacancy)]
    structures += [gen.surface() for _ in range(n_surface)]
    for _ in range(n_md_bulk):
        structures += gen.md_snapshots(4, slab=False)
    for _ in range(n_md_slab):
        structures += gen.md_snapshots(4, slab=True)
    return [label(a) for a in structures]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/work/emt_data"))
    parser.add_argument("--seed", type=int, default=20240605)
    parser.add_argument("--n-bulk", type=int, default=420, help="strained/rattled bulk cells")
    parser.add_argument("--n-vacancy", type=int, default=80, help="bulk cells with a vacancy")
    parser.add_argument("--n-surface", type=int, default=100, help="rattled slabs")
    parser.add_argument("--n-md-bulk", type=int, default=45, help="bulk MD runs (4 snapshots each)")
    parser.add_argument("--n-md-slab", type=int, default=15, help="slab MD runs (4 snapshots each)")
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--valid-fraction", type=float, default=0.08)
    args = parser.parse_args()

    structures = generate(args.seed, args.n_bulk, args.n_vacancy, args.n_surface, args.n_md_bulk, args.n_md_slab)
    # Shuffle MD runs' snapshots together with the rest; a separate generator keeps the split independent.
    order = np.random.default_rng(args.seed + 1).permutation(len(structures))
    n_test = round(args.test_fraction * len(structures))
    n_valid = round(args.valid_fraction * len(structures))
    test = [structures[i] for i in order[:n_test]]
    valid = [structures[i] for i in order[n_test : n_test + n_valid]]
    train = [structures[i] for i in order[n_test + n_valid :]]

    args.out.mkdir(parents=True, exist_ok=True)
    write(args.out / "train.xyz", train, format="extxyz")
    write(args.out / "valid.xyz", valid, format="extxyz")
    write(args.out / "test.xyz", test, format="extxyz")
    write(args.out / "isolated_atoms.xyz", isolated_atoms(), format="extxyz")
    sizes = [len(a) for a in structures]
    print(
        f"wrote {len(train)} train, {len(valid)} valid, {len(test)} test structures to {args.out} "
        f"({min(sizes)}-{max(sizes)} atoms, {sum(sizes)} atoms in total)"
    )


if __name__ == "__main__":
    main()
