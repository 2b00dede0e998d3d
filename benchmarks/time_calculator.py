"""Time one ASE energy+forces(+stress) call of a MACE calculator; run once per implementation.

    python benchmarks/time_calculator.py --impl ours  --model FILE --dtype float32 --atoms 64 216 512
    python benchmarks/time_calculator.py --impl mace-torch --model FILE ...   (in a venv with mace-torch 0.3.16)

Prints one JSON line per system: implementation, dtype, atoms, edges, best and median wall time of --repeat calls
(after one warm-up call), and peak RSS. The structures are rattled diamond-Si supercells (r_max 6 Å: ~45 neighbours).
`benchmarks/compare_cpu.sh` runs both implementations side by side and writes RESULTS rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
from ase import Atoms
from ase.build import bulk


def make_silicon(n_atoms: int) -> Atoms:
    cells = {8: (1, 1, 1), 64: (2, 2, 2), 216: (3, 3, 3), 512: (4, 4, 4), 1000: (5, 5, 5), 1728: (6, 6, 6)}
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(cells[n_atoms])
    atoms.rattle(0.05, seed=0)
    return atoms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=["ours", "mace-torch"], required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--atoms", type=int, nargs="+", default=[64, 216])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    if args.impl == "ours":
        from mace_ase.calculator import MACECalculator

        calc = MACECalculator(model_paths=args.model, device=args.device, default_dtype=args.dtype)
    else:
        from mace.calculators import MACECalculator

        calc = MACECalculator(model_paths=args.model, device=args.device, default_dtype=args.dtype)
    load_time = time.perf_counter() - start

    for n in args.atoms:
        atoms = make_silicon(n)
        atoms.calc = calc
        atoms.get_forces()  # warm-up
        times = []
        for step in range(args.repeat):
            atoms.positions += 1e-4  # a new geometry each call: nothing cached
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            atoms.get_forces()
            atoms.get_stress()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        from matscipy.neighbours import neighbour_list

        edges = len(neighbour_list("i", atoms, 6.0))
        print(json.dumps({
            "impl": args.impl, "dtype": args.dtype, "device": args.device, "atoms": n, "edges": edges,
            "best_s": min(times), "median_s": statistics.median(times), "load_s": load_time,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads(),
        }), flush=True)


if __name__ == "__main__":
    main()
