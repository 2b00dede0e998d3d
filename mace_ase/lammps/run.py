"""Run a LAMMPS input file through LAMMPS's Python module, so the ML-IAP model runs in *this* Python.

    mpirun -np 4 python -m mace_ase.lammps.run in.lammps [-var name value ...] [-log FILE] [-screen none]

Every MPI rank starts this Python; LAMMPS initialises MPI itself (no mpi4py needed) and runs the input on
``MPI_COMM_WORLD``. Arguments after the input file are passed to LAMMPS as command-line switches. The ``lmp``
executable installed by ``scripts/build_lammps.sh`` works too when the virtualenv is active; this entry point
guarantees that torch and mace-ase are importable by the embedded interpreter.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    path, switches = args[0], args[1:]
    if not os.path.isfile(path):
        print(f"error: LAMMPS input {path!r} does not exist", file=sys.stderr)
        return 2
    try:
        from lammps import lammps
    except ImportError:
        print("error: the LAMMPS Python module is not installed in this Python; build it with "
              "`bash scripts/build_lammps.sh` (see README, 'LAMMPS')", file=sys.stderr)
        return 2
    lmp = lammps(cmdargs=["-nocite"] + switches)
    if lmp.has_package("ML-IAP") and lmp.has_package("PYTHON"):
        # the lmp executable registers ML-IAP's Cython modules before starting its interpreter; a Python host
        # must do it itself, or `pair_style mliap unified` fails with "Loading mliappy unified module failure"
        import lammps.mliap

        lammps.mliap.activate_mliappy(lmp)
    try:
        lmp.file(path)
    except Exception as exc:  # LAMMPS has printed its error; tearing it down after an error can crash, so leave
        print(f"error: LAMMPS stopped: {exc}", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)
    lmp.close()
    # not lmp.finalize(): it also finalizes the Python interpreter, which is this one (a crash on exit)
    lmp.lib.lammps_mpi_finalize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
