"""Where the time of one mace-ase call goes: torch-profiler table of the model's forward + backward.

    python benchmarks/profile_model.py --model FILE --dtype float32 --atoms 216 [--threads 1] [--rows 25]
        [--radial spline]

Times the model call alone (graph tensors prepared once), best of --repeat, then prints the profiler's
self-CPU-time table of one call. Structures are the rattled diamond-Si cells of ``time_calculator.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from time_calculator import make_silicon  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--atoms", type=int, default=216)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--radial", default="exact", choices=("exact", "spline"))
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--reference", action="store_true", help="profile the plain-torch reference path")
    parser.add_argument("--compare", action="store_true",
                        help="time the reference and the fast path alternately in this process (A/B under one load)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from mace_ase.calculator import MACECalculator

    calc = MACECalculator(model_paths=args.model, device=args.device, default_dtype=args.dtype, radial=args.radial)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    atoms = make_silicon(args.atoms)
    graph = calc._graph(atoms)
    model = calc.models[0]
    from mace_ase.model import fused

    kernel = fused.load_kernel()[0] is not None
    if args.compare:
        best = {"reference": [], "fast": []}
        for _ in range(args.repeat):
            for name, enabled in (("reference", False), ("fast", True)):
                fused._set(model, enabled, enabled and kernel)
                model(**graph, head=0, compute_stress=True)
                sync()
                t0 = time.perf_counter()
                model(**graph, head=0, compute_stress=True)
                sync()
                best[name].append(time.perf_counter() - t0)
        print(f"A/B {args.atoms} atoms {args.dtype} {args.threads} thread(s), load {os.getloadavg()[0]:.2f}: "
              f"reference best {min(best['reference']):.4f} s, fast best {min(best['fast']):.4f} s, "
              f"speed-up {min(best['reference']) / min(best['fast']):.2f}x")
        return
    if args.reference:
        fused._set(model, False, False)
    model(**graph, head=0, compute_stress=True)  # warm-up
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        model(**graph, head=0, compute_stress=True)
        times.append(time.perf_counter() - t0)
    edges = int(graph["edge_index"].shape[1])
    print(f"model call, {args.atoms} atoms, {edges} edges, {args.dtype}, {args.threads} thread(s): "
          f"best {min(times):.4f} s, median {sorted(times)[len(times) // 2]:.4f} s; load {os.getloadavg()[0]:.2f}")
    if args.no_profile:
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(**graph, head=0, compute_stress=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
