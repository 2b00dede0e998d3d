"""The ``mace-ase`` command line.

Sub-commands are registered by small modules, each owning one area:

* ``mace_ase.cli.models``   -- ``mace-ase models list|download|verify|path|clear``
* ``mace_ase.cli.simulate`` -- ``mace-ase eval|relax|md``
* ``mace_ase.cli.lammps``   -- ``mace-ase export-lammps``

Each such module defines ``register(subparsers) -> None`` which adds its parsers and sets
``func=<callable(args) -> int>`` as the parser default.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

_COMMAND_MODULES = ("mace_ase.cli.models", "mace_ase.cli.simulate", "mace_ase.cli.lammps")


def build_parser() -> argparse.ArgumentParser:
    from mace_ase import __version__

    parser = argparse.ArgumentParser(prog="mace-ase", description="MACE interatomic potentials for ASE.")
    parser.add_argument("--version", action="version", version=f"mace-ase {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2) if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
