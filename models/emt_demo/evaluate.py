"""Evaluate the emt-demo model with mace-torch's own calculator and write our parity-test reference answers.

Runs in a virtualenv with mace-torch 0.3.16 (here /work/venvs/oracle); it is the oracle side of the project and is
never imported by mace_ase. It reports, in ASE units converted to meV:

* test-set errors against EMT: energy (meV/atom), forces (meV/Å, per Cartesian component) and stress
  (meV/Å³, per Voigt component, fully periodic cells only), RMSE and MAE;
* the fcc lattice constant (Å) and bulk modulus (GPa) of each of the seven metals, EMT versus model
  (Birch-Murnaghan fit, ase.eos, nine volumes spanning +-4 % in lattice constant);
* the energy drift of a short NVE run (32-atom Cu-Au, 300 K, 2 fs, 200 steps, float64);

and writes ``tests/fixtures/emt_demo_reference.json``: a few held-out test structures with mace-torch's and EMT's
answers on them, plus the test-set errors.

Usage::

    /work/venvs/oracle/bin/python models/emt_demo/evaluate.py --model models/emt-demo.model \
        --data /work/emt_data --fixture tests/fixtures/emt_demo_reference.json --results /work/emt_train/eval.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.eos import EquationOfState
from ase.io import read
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet
from mace.calculators import MACECalculator

ELEMENTS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
FIXTURE_CONFIG_TYPES = ("bulk", "vacancy", "surface", "md_bulk")


def load_calculator(model: Path) -> MACECalculator:
    return MACECalculator(model_paths=str(model), device="cpu", default_dtype="float64")


def rmse_mae(diff: np.ndarray) -> dict[str, float]:
    diff = np.asarray(diff, dtype=float).ravel()
    return {"rmse": float(np.sqrt(np.mean(diff**2))), "mae": float(np.mean(np.abs(diff)))}


def test_set_errors(calc: MACECalculator, test: list[Atoms]) -> dict[str, dict[str, float] | int]:
    """Model-minus-EMT errors on the held-out test set, in meV/atom, meV/Å and meV/Å³."""
    d_energy, d_forces, d_stress = [], [], []
    for ref in test:
        atoms = ref.copy()
        atoms.calc = calc
        d_energy.append((atoms.get_potential_energy() - ref.info["REF_energy"]) / len(atoms))
        d_forces.append(atoms.get_forces() - ref.arrays["REF_forces"])
        if "REF_stress" in ref.info:
            d_stress.append(atoms.get_stress(voigt=True) - ref.info["REF_stress"])
    return {
        "n_structures": len(test),
        "n_stress_structures": len(d_stress),
        "energy_meV_per_atom": rmse_mae(1e3 * np.array(d_energy)),
        "forces_meV_per_A": rmse_mae(1e3 * np.concatenate(d_forces)),
        "stress_meV_per_A3": rmse_mae(1e3 * np.array(d_stress)),
    }


def fcc_eos(symbol: str, make_calc, a_guess: float) -> dict[str, float]:
    """Lattice constant (Å) and bulk modulus (GPa) from a Birch-Murnaghan fit on the primitive fcc cell."""
    volumes, energies = [], []
    for a in np.linspace(0.96, 1.04, 9) * a_guess:
        atoms = bulk(symbol, "fcc", a=a)
        atoms.calc = make_calc()
        volumes.append(atoms.get_volume())
        energies.append(atoms.get_potential_energy())
    eos = EquationOfState(volumes, energies, eos="birchmurnaghan")
    v0, _, b0 = eos.fit()
    return {"a": float((4.0 * v0) ** (1.0 / 3.0)), "B_GPa": float(b0 / units.GPa)}


def lattice_table(calc: MACECalculator) -> dict[str, dict[str, dict[str, float]]]:
    table = {}
    for symbol in ELEMENTS:
        emt = fcc_eos(symbol, EMT, bulk(symbol, "fcc").cell.cellpar()[0] * np.sqrt(2.0))
        model = fcc_eos(symbol, lambda: calc, emt["a"])
        table[symbol] = {"emt": emt, "model": model}
    return table


def cu_au_cell(seed: int = 3) -> Atoms:
    """The 32-atom random Cu-Au fcc cell used for the NVE check (same recipe as tests/test_emt_demo.py)."""
    atoms = bulk("Cu", "fcc", a=3.82, cubic=True).repeat(2)  # Vegard: (a_Cu + a_Au) / 2 in EMT
    rng = np.random.default_rng(seed)
    symbols = np.array(["Cu"] * 16 + ["Au"] * 16)
    atoms.set_chemical_symbols(list(rng.permutation(symbols)))
    return atoms


def nve_drift(calc: MACECalculator, steps: int = 200, timestep_fs: float = 2.0) -> dict[str, float]:
    """Energy drift (eV/atom) of a float64 NVE run of cu_au_cell() started at 300 K."""
    atoms = cu_au_cell()
    atoms.calc = calc
    thermalize_momenta(atoms, 300.0, rng=np.random.default_rng(4))
    totals = [atoms.get_total_energy()]
    dyn = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    start = time.perf_counter()
    for _ in range(steps):
        dyn.run(1)
        totals.append(atoms.get_total_energy())
    totals = np.array(totals) / len(atoms)
    return {
        "steps": steps,
        "timestep_fs": timestep_fs,
        "final_minus_initial_eV_per_atom": float(totals[-1] - totals[0]),
        "max_deviation_eV_per_atom": float(np.max(np.abs(totals - totals[0]))),
        "wall_s": time.perf_counter() - start,
    }


def fixture_entry(ref: Atoms, calc: MACECalculator) -> dict:
    """One held-out structure with mace-torch's and EMT's answers (ASE units, Voigt stress)."""
    atoms = Atoms(ref.numbers, positions=ref.positions, cell=ref.cell, pbc=ref.pbc)
    periodic = bool(atoms.pbc.all())
    atoms.calc = calc
    mace_answers = {
        "energy": float(atoms.get_potential_energy()),
        "forces": atoms.get_forces().tolist(),
        "energies": np.asarray(calc.results["energies"]).tolist(),
    }
    if periodic:
        mace_answers["stress"] = atoms.get_stress(voigt=True).tolist()
    atoms.calc = EMT()
    emt_answers = {"energy": float(atoms.get_potential_energy()), "forces": atoms.get_forces().tolist()}
    if periodic:
        emt_answers["stress"] = atoms.get_stress(voigt=True).tolist()
    return {
        "config_type": ref.info.get("config_type", ""),
        "numbers": atoms.numbers.tolist(),
        "positions": atoms.positions.tolist(),
        "cell": atoms.cell.array.tolist(),
        "pbc": [bool(p) for p in atoms.pbc],
        "mace_torch": mace_answers,
        "emt": emt_answers,
    }


def pick_fixture_structures(test: list[Atoms]) -> list[Atoms]:
    """The first test structure of each family; for bulk, the first alloy (so several species are covered)."""
    picked = []
    for config_type in FIXTURE_CONFIG_TYPES:
        candidates = [a for a in test if a.info.get("config_type") == config_type]
        if config_type == "bulk":
            candidates = [a for a in candidates if len(set(a.numbers)) >= 3] or candidates
        picked.append(candidates[0])
    return picked


def markdown(results: dict) -> str:
    err = results["test_errors"]
    lines = [
        (
            f"Test set: {err['n_structures']} held-out structures ({err['n_stress_structures']} fully periodic, "
            "with stress)."
        ),
        "",
        "| quantity | RMSE | MAE |",
        "| --- | --- | --- |",
    ]
    for key, label in (
        ("energy_meV_per_atom", "energy (meV/atom)"),
        ("forces_meV_per_A", "forces (meV/Å, per component)"),
        ("stress_meV_per_A3", "stress (meV/Å³, per component)"),
    ):
        lines.append(f"| {label} | {err[key]['rmse']:.2f} | {err[key]['mae']:.2f} |")
    lines += [
        "",
        "| metal | a EMT (Å) | a model (Å) | B EMT (GPa) | B model (GPa) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for symbol, row in results["lattice"].items():
        lines.append(
            f"| {symbol} | {row['emt']['a']:.4f} | {row['model']['a']:.4f} | "
            f"{row['emt']['B_GPa']:.1f} | {row['model']['B_GPa']:.1f} |"
        )
    nve = results["nve"]
    lines += [
        "",
        (
            f"NVE (32-atom Cu-Au, 300 K, {nve['steps']} x {nve['timestep_fs']} fs, float64): "
            f"final - initial total energy {nve['final_minus_initial_eV_per_atom']:.2e} eV/atom, "
            f"largest deviation {nve['max_deviation_eV_per_atom']:.2e} eV/atom."
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/emt-demo.model"))
    parser.add_argument("--data", type=Path, default=Path("/work/emt_data"))
    parser.add_argument("--fixture", type=Path, default=None, help="write the parity-test reference JSON here")
    parser.add_argument("--results", type=Path, default=None, help="write all numbers as JSON here")
    args = parser.parse_args()

    calc = load_calculator(args.model)
    test = read(args.data / "test.xyz", ":")
    results = {
        "test_errors": test_set_errors(calc, test),
        "lattice": lattice_table(calc),
        "nve": nve_drift(calc),
    }
    print(markdown(results))
    if args.results is not None:
        args.results.write_text(json.dumps(results, indent=1))
    if args.fixture is not None:
        # A fresh calculator per structure so nothing cached leaks between them.
        structures = [fixture_entry(ref, load_calculator(args.model)) for ref in pick_fixture_structures(test)]
        args.fixture.parent.mkdir(parents=True, exist_ok=True)
        args.fixture.write_text(
            json.dumps({"structures": structures, "test_errors": results["test_errors"], "nve": results["nve"]})
        )
        print(f"wrote {len(structures)} reference structures to {args.fixture}")


if __name__ == "__main__":
    main()
