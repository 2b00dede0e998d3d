"""Neighbour-list timings: matscipy (our backend) against vesin, and the Verlet skin's per-step filter.

    python benchmarks/neighbour_list.py            # needs `pip install vesin` for the comparison

Rattled diamond Si (1,000-10,000 atoms), cutoffs 5 and 6 Å, one thread, best of 5. Each backend's time includes
what ``mace_ase.neighbours.neighbour_list`` adds to it (our distance filter and the canonical edge order), so the
columns compare what a call would cost with either backend. Also checks that both give the same edges.
"""

from __future__ import annotations

import platform
import time

import numpy as np
from ase.build import bulk
from matscipy.neighbours import neighbour_list as matscipy_list

from mace_ase.neighbours import _SEARCH_MARGIN, VerletNeighbourList, _exact_canonical, neighbour_list


def best(function, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    import vesin

    rng = np.random.default_rng(0)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, numpy {np.__version__}, "
          f"vesin {vesin.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| atoms | cutoff Å | edges | matscipy ms | vesin ms | vesin / matscipy | skin filter ms (1 Å skin) |")
    print("|---|---|---|---|---|---|---|")
    for repeat in [(5, 5, 5), (7, 7, 7), (9, 9, 9), (11, 11, 11)]:
        atoms = bulk("Si", "diamond", a=5.43, cubic=True) * repeat
        atoms.rattle(0.05, rng=rng)
        positions, cell, pbc = atoms.positions, atoms.cell.array, atoms.pbc
        for cutoff in (5.0, 6.0):
            search = cutoff + _SEARCH_MARGIN

            def with_matscipy():
                i, j, s = matscipy_list("ijS", positions=positions, cell=cell, pbc=pbc, cutoff=search)
                return _exact_canonical(positions, cell, i, j, s, cutoff)

            searcher = vesin.NeighborList(cutoff=search, full_list=True, n_threads=1)

            def with_vesin():
                i, j, s = searcher.compute(positions, cell, pbc, "ijS")
                return _exact_canonical(positions, cell, i, j, s, cutoff)

            a, b = with_matscipy(), with_vesin()
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
            assert np.array_equal(a[0], neighbour_list(positions, cell, pbc, cutoff)[0])
            t_matscipy, t_vesin = best(with_matscipy), best(with_vesin)
            verlet = VerletNeighbourList(cutoff, skin=1.0)
            verlet.update(positions, cell, pbc)
            moved = positions + rng.normal(scale=0.01, size=positions.shape)
            t_filter = best(lambda: verlet.update(moved, cell, pbc))
            assert verlet.builds == 1
            print(f"| {len(atoms)} | {cutoff:g} | {a[0].shape[1]} | {t_matscipy * 1e3:.1f} | {t_vesin * 1e3:.1f} | "
                  f"{t_vesin / t_matscipy:.2f} | {t_filter * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
