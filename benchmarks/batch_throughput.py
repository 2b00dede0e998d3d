"""Batched evaluation vs one ASE call per structure (CPU): 200 structures of 8-64 atoms.

    OMP_NUM_THREADS=1 python benchmarks/batch_throughput.py [--model models/emt-demo.model] [--dtype float64]

Structures: rattled fcc/bcc/hcp cells of the emt-demo metals (Al, Ni, Cu, Pd, Ag, Pt, Au, mixed), 8-64 atoms, all
periodic; energy + forces + stress. One warm-up pass of each method, then the best of 2 timed passes. Prints one
JSON line (times, speed-up, largest difference between the two methods).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from ase.build import bulk

from mace_ase import MACECalculator, evaluate

ROOT = Path(__file__).resolve().parents[1]


def structures(count: int = 200, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    metals = {"Al": 4.05, "Ni": 3.52, "Cu": 3.61, "Pd": 3.89, "Ag": 4.09, "Pt": 3.92, "Au": 4.08}
    out = []
    while len(out) < count:
        element = rng.choice(list(metals))
        atoms = bulk(element, "fcc", a=metals[element], cubic=True)  # 4 atoms
        repeat = [int(v) for v in rng.integers(1, 5, 3)]
        if not 2 <= np.prod(repeat) <= 16:
            continue
        atoms = atoms.repeat(repeat)
        swap = rng.random(len(atoms)) < 0.3
        atoms.numbers[swap] = [int(bulk(e).numbers[0]) for e in rng.choice(list(metals), swap.sum())]
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        out.append(atoms)
    return out


def molecules(count: int = 200, seed: int = 0) -> list:
    """Small molecules of H, C, O, Cl, Na (ASE's g2 set, 3-14 atoms) in no periodic cell, rattled copies."""
    from ase.collections import g2

    allowed = {"H", "C", "O", "Cl", "Na"}
    pool = [g2[name] for name in g2.names if set(g2[name].get_chemical_symbols()) <= allowed and len(g2[name]) >= 3]
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        atoms = pool[k % len(pool)].copy()
        atoms.rattle(0.02, seed=int(rng.integers(1 << 30)))
        out.append(atoms)
    return out


def one_by_one(items, calc):
    out = []
    for atoms in items:
        atoms = atoms.copy()
        atoms.calc = calc
        stress = atoms.get_stress() if atoms.pbc.all() else None
        out.append((atoms.get_potential_energy(), atoms.get_forces(), stress))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(ROOT / "models" / "emt-demo.model"))
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--radial", choices=("auto", "exact", "spline"), default="auto")
    parser.add_argument("--set", choices=("metals", "molecules"), default="metals",
                        help="metals: periodic cells, 8-64 atoms (emt-demo); molecules: 3-14 atoms, no cell "
                             "(use a model with H, C, O, e.g. tests/fixtures/models/mp0a_small.model)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    items = structures(args.count) if args.set == "metals" else molecules(args.count)
    calc = MACECalculator(args.model, device="cpu", default_dtype=args.dtype, radial=args.radial)
    one_by_one(items[:5], calc)
    evaluate(items[:20], model=calc.models[0], device="cpu", dtype=args.dtype, radial=args.radial)
    ase_times, batch_times = [], []
    for _ in range(2):
        start = time.perf_counter()
        reference = one_by_one(items, calc)
        ase_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        results = evaluate(items, model=calc.models[0], device="cpu", dtype=args.dtype, radial=args.radial)
        batch_times.append(time.perf_counter() - start)
    diff_e = max(abs(e - results.energies[s]) for s, (e, _, _) in enumerate(reference))
    diff_f = max(float(np.abs(f - results.forces[s]).max()) for s, (_, f, _) in enumerate(reference))
    atoms_total = sum(len(a) for a in items)
    print(json.dumps({
        "benchmark": "batch_vs_ase", "set": args.set, "model": Path(args.model).name, "dtype": args.dtype,
        "radial": args.radial,
        "structures": len(items),
        "atoms": atoms_total, "sizes": [min(len(a) for a in items), max(len(a) for a in items)],
        "ase_s": round(min(ase_times), 3), "batched_s": round(min(batch_times), 3),
        "speedup": round(min(ase_times) / min(batch_times), 2), "batches": results.n_batches,
        "max_energy_diff_eV": diff_e, "max_force_diff_eV_per_A": diff_f,
        "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0], "machine": platform.processor(),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
