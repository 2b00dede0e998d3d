"""Where the time of one mace-ase call goes: torch-profiler table of the model's forward + backward.

    python benchmarks/profile_model.py --model FILE --dtype float32 --atoms 216 [--threads 1] [--rows 25]
        [--radial spline] [--by-line]

Times the model call alone (graph tensors prepared once), best of --repeat, with the page faults and system time
per call (fresh multi-megabyte buffers fault a page at a time), then prints the profiler's self-CPU-time table of
one call; with ``--by-line`` instead the time of every torch operation by the mace_ase source line that issued it
(backward-pass operations are attributed to the ``autograd.grad`` call). Structures are the rattled diamond-Si cells
of ``time_calculator.py``.
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import sys
import time
import traceback

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
    parser.add_argument("--by-line", action="store_true", help="torch operations' time by mace_ase source line")
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
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        model(**graph, head=0, compute_stress=True)
        times.append(time.perf_counter() - t0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    edges = int(graph["edge_index"].shape[1])
    print(f"model call, {args.atoms} atoms, {edges} edges, {args.dtype}, {args.threads} thread(s): "
          f"best {min(times):.4f} s, median {sorted(times)[len(times) // 2]:.4f} s; per call "
          f"{(after.ru_minflt - before.ru_minflt) / args.repeat:.0f} page faults, "
          f"{(after.ru_stime - before.ru_stime) / args.repeat * 1e3:.1f} ms system time; load {os.getloadavg()[0]:.2f}")
    if args.by_line:
        by_line(model, graph, args.rows)
        return
    if args.no_profile:
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(**graph, head=0, compute_stress=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


def by_line(model, graph, rows: int) -> None:
    """One call under a dispatch mode that times each torch operation and files it under the innermost mace_ase
    source line on the Python stack (the compiled kernels' own time is not included: they are not torch ops)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    stats = collections.defaultdict(lambda: [0.0, 0])

    class Timer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            t0 = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            elapsed = time.perf_counter() - t0
            frames = [f for f in traceback.extract_stack() if f"{os.sep}mace_ase{os.sep}" in f.filename]
            where = f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else "(outside)"
            first = args[0] if args else None
            if isinstance(first, (list, tuple)) and first:
                first = first[0]
            shape = tuple(first.shape) if isinstance(first, torch.Tensor) else ()
            entry = stats[(str(func), where, shape)]
            entry[0] += elapsed
            entry[1] += 1
            return out

    with Timer():
        model(**graph, head=0, compute_stress=True)
    print(f"torch operations: {sum(v[0] for v in stats.values()) * 1e3:.1f} ms in all")
    for (name, where, shape), (seconds, count) in sorted(stats.items(), key=lambda kv: -kv[1][0])[:rows]:
        print(f"{seconds * 1e3:8.2f} ms  x{count:<4d} {name:40s} {where:24s} {shape}")


if __name__ == "__main__":
    main()
