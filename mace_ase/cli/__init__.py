"""The ``mace-ase`` command line.

Sub-commands are registered by small modules, each owning one area:

* ``mace_ase.cli.models``   -- ``mace-ase models list|download|verify|path|clear``
* ``mace_ase.cli.simulate`` -- ``mace-ase eval|relax|md``
* ``mace_ase.cli.lammps``   -- ``mace-ase export-lammps``

Each such module defines ``register(subparsers) -> None`` which adds its parsers and sets
``func=<callable(args) -> int>`` as the parser default.

Logging: warnings only by default, ``-v`` adds INFO, ``-vv`` DEBUG. An ordinary mistake (see
:mod:`mace_ase.cli.errors`) prints one line ``error: ...`` and exits with status 2; ``--debug`` (or ``-vv``) also
prints its traceback.
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
    _add_output_options(parser, top=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    for command in subparsers.choices.values():  # also accepted after the command: `mace-ase eval x.xyz -v`
        _add_output_options(command, top=False)
    return parser


def _add_output_options(parser: argparse.ArgumentParser, top: bool) -> None:
    # SUPPRESS on the sub-commands: an option not given there leaves the main parser's value alone
    parser.add_argument("-v", "--verbose", action="count", default=0 if top else argparse.SUPPRESS,
                        help="more log output: -v INFO, -vv DEBUG (and tracebacks); default: warnings only")
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="show the Python traceback of an error")


def log_level(verbose: int) -> int:
    """``-v`` count -> logging level: 0 WARNING, 1 INFO, 2 or more DEBUG."""
    return (logging.WARNING, logging.INFO, logging.DEBUG)[min(max(verbose, 0), 2)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=log_level(args.verbose), format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from mace_ase.cli.errors import ordinary_errors, report

    try:
        return int(args.func(args) or 0)
    except ordinary_errors() as error:
        return report(error, show_traceback=args.debug or args.verbose >= 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
