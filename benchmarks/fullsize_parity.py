"""The full-size timing files against mace-torch's own answers, in every radial mode (a check, not a test: the
files are generated, ~100 MB, and not committed).

    python tests/fixtures/make_fixtures.py --full-size DIR     # in the mace-torch 0.3.16 virtualenv, once
    python benchmarks/fullsize_parity.py [DIR]                 # default DIR: /work/fullsize

Prints, per model, radial mode and float64 reference case (``DIR/references_fullsize.json``), the largest energy
(eV/atom), force (eV/Å) and stress (eV/Å³) differences from mace-torch 0.3.16.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from ase import Atoms

from mace_ase import MACECalculator


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/fullsize")
    references = json.loads((folder / "references_fullsize.json").read_text())
    for name, entry in references["models"].items():
        for radial in ("auto", "exact"):
            calc = MACECalculator(str(folder / entry["file"]), device="cpu", default_dtype="float64", radial=radial)
            for case in entry["cases"]:
                if case["dtype"] != "float64":
                    continue
                structure = references["structures"][case["structure"]]
                atoms = Atoms(numbers=structure["numbers"], positions=structure["positions"],
                              cell=structure.get("cell"), pbc=structure.get("pbc", False))
                atoms.calc = calc
                energy = abs(atoms.get_potential_energy() - case["energy"]) / len(atoms)
                forces = np.abs(atoms.get_forces() - np.array(case["forces"])).max()
                stress = (np.abs(atoms.get_stress() - np.array(case["stress"])).max()
                          if case.get("stress") is not None else 0.0)
                print(f"{name} radial={radial} {case['structure']}: {energy:.1e} eV/atom, {forces:.1e} eV/Å, "
                      f"{stress:.1e} eV/Å³", flush=True)


if __name__ == "__main__":
    main()
