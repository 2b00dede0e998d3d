"""Table of one `compare_all.sh` run: s per call, µs/atom, memory, ratios; optionally written into RESULTS.md.

    python benchmarks/summarize.py --results benchmarks/compare_all.jsonl --run RUN [--write benchmarks/RESULTS.md]

Per (model, dtype, threads, atoms, implementation) the best time over all rounds is reported (rounds are interleaved,
so the best is the least disturbed by other load) with the range of the per-round bests. The table replaces the text
between the ``compare_all`` markers of RESULTS.md (appended at the end when the markers are missing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from collections import defaultdict

START, END = "<!-- compare_all:start -->", "<!-- compare_all:end -->"
NAMES = {"mace-torch": "mace-torch 0.3.16", "ours": "mace-ase", "ours-spline": "mace-ase (spline)",
         "ours-default": "mace-ase (default)",
         "symmetrix": "Symmetrix-XL 0.1.1"}
MODELS = {"mp0_medium_fullsize.model": "MP-0 medium", "mpa0_medium_fullsize.model": "MPA-0 medium"}


def machine() -> str:
    """CPU model (family and model number), widest SIMD level (AVX-512, AVX2 or AVX only), cores, RAM."""
    cpu, simd = platform.processor(), ""
    try:
        with open("/proc/cpuinfo") as handle:
            lines = handle.read().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        field = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines[:30])}
        if "cpu family" in field and "model" in field:  # tells apart CPUs of one marketing name
            cpu += f" (family {field['cpu family']}, model {field['model']})"
        flags = set(next(line.split(":", 1)[1] for line in lines if line.startswith("flags")).split())
        simd = next((f", {name}" for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX, no AVX2"))
                     if flag in flags), "")
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}{simd}, {os.cpu_count()} cores, {memory:.0f} GB"


def table(rows: list[dict]) -> str:
    groups: dict = defaultdict(list)
    for row in rows:
        groups[(row["model"], row["dtype"], row["threads"], row["atoms"], row["impl"])].append(row)
    best = {key: min(r["best_s"] for r in group) for key, group in groups.items()}
    cases = sorted({key[:4] for key in groups}, key=lambda k: (k[0], k[1], k[2], k[3]))
    lines = [
        "| model | dtype | threads | atoms (edges) | engine | s per call (best; range of round bests) | µs/atom "
        "| one call's peak RSS growth (kB/edge) | vs mace-torch | vs Symmetrix |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        for impl in ("mace-torch", "ours", "ours-spline", "ours-default", "symmetrix"):
            group = groups.get((*case, impl))
            if not group:
                continue
            t = best[(*case, impl)]
            bests = sorted(r["best_s"] for r in group)
            edges = group[0]["edges"]
            growth = [r.get("call_growth_mb") for r in group if r.get("call_growth_mb") is not None]
            memory = f"{max(growth) * 1024 / edges:.1f}" if growth else "-"
            torch_t = best.get((*case, "mace-torch"))
            symm_t = best.get((*case, "symmetrix"))
            vs_torch = f"{torch_t / t:.1f}x" if torch_t and impl != "mace-torch" else ""
            vs_symm = f"{symm_t / t:.2f}x" if symm_t and impl != "symmetrix" else ""
            name = {"ours": "**mace-ase, radial='exact'**", "ours-spline": "**mace-ase, radial='spline'**",
                    "ours-default": "**mace-ase, default (radial='auto')**"}.get(impl) or NAMES[impl]
            lines.append(
                f"| {MODELS.get(case[0], case[0])} | {case[1]} | {case[2]} | {case[3]} ({edges:,}) | {name} | "
                f"{t:.3f} ({bests[0]:.3f}-{bests[-1]:.3f}) | {1e6 * t / case[3]:,.0f} | {memory} | {vs_torch} | "
                f"{vs_symm} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", default="benchmarks/compare_all.jsonl")
    parser.add_argument("--run", help="run id (default: the last run in the file)")
    parser.add_argument("--write", help="RESULTS.md to update")
    args = parser.parse_args()
    with open(args.results) as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    run = args.run or rows[-1]["run"]
    rows = [row for row in rows if row.get("run") == run]
    loads = [row["load_avg"] for row in rows if "load_avg" in row]
    header = (
        f"Run {run} ({datetime.date.today().isoformat()}), `bash benchmarks/compare_all.sh`. Machine: {machine()}; "
        f"load average during the run {min(loads):.1f}-{max(loads):.1f} (the benchmark itself counts up to its "
        "thread count, more means other jobs shared the CPUs; absolute times on this VM are noisy, the ratios of "
        "interleaved runs are what count). One ASE call = energy + forces + stress "
        "on a new geometry (neighbour list included), rattled diamond Si; full-size random-weight model files."
    ) if loads else f"Run {run}."
    text = header + "\n\n" + table(rows) + "\n"
    print(text)
    if args.write:
        with open(args.write) as handle:
            document = handle.read()
        block = f"{START}\n{text}{END}"
        if START in document and END in document:
            before, rest = document.split(START, 1)
            document = before + block + rest.split(END, 1)[1]
        else:
            title = "## Side by side: mace-torch, mace-ase, Symmetrix-XL (CPU)"
            document = document.rstrip() + f"\n\n{title}\n\n" + block + "\n"
        with open(args.write, "w") as handle:
            handle.write(document)


if __name__ == "__main__":
    main()
