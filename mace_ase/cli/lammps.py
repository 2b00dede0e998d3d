"""``mace-ase export-lammps``: write a model file for LAMMPS.

Two formats: ``mliap`` (default) for upstream LAMMPS's ``pair_style mliap unified FILE 1`` (CPU build with the ML-IAP
and PYTHON packages, any number of MPI ranks; see ``scripts/build_lammps.sh``), and ``pair-mace`` for the TorchScript
``pair_style mace`` of ACEsuit's LAMMPS fork. Units in LAMMPS: ``units metal`` (Å, eV).
"""

from __future__ import annotations

import argparse
from typing import Any

from mace_ase.options import DTYPE_NAMES


def register(subparsers: Any) -> None:
    """Add the ``export-lammps`` sub-command."""
    p = subparsers.add_parser("export-lammps", help="write a model file for LAMMPS (pair_style mliap unified)")
    p.add_argument("model", help="a .model file, or a foundation-model name (see `mace-ase models list`)")
    p.add_argument("-o", "--output", required=True, help="file to write (e.g. model.mliap.pkl, or model-lammps.pt)")
    p.add_argument("--format", choices=("mliap", "pair-mace"), default="mliap",
                   help="mliap: pair_style mliap unified (default); pair-mace: TorchScript for pair_style mace")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float64", help="default float64")
    p.add_argument("--device", default="cpu", help="torch device LAMMPS ranks use (mliap format; default cpu)")
    p.add_argument("--head", default=None, help="head of a multi-head model")
    p.add_argument("--radial", choices=("auto", "exact", "spline"), default="auto",
                   help="radial weights (mliap format): auto (default: tabulated on the CPU, within the exact bar; "
                        "the MLP elsewhere), exact (the MLP for every edge) or spline (always tabulated)")
    p.add_argument("--elements", nargs="+", default=None,
                   help="element of each LAMMPS atom type, in type order (only for the printed pair_coeff line)")
    p.set_defaults(func=_export)


def _model_path(name: str):
    from pathlib import Path

    if Path(name).expanduser().is_file():
        return Path(name).expanduser()
    from mace_ase.foundations import FAMILY_FUNCTIONS, resolve_model

    path, _ = resolve_model("mace_mp", tuple(FAMILY_FUNCTIONS), name)  # any catalogue name
    return path


def _export(args: argparse.Namespace) -> int:
    path = _model_path(args.model)
    if args.format == "pair-mace":
        from mace_ase.model.build import export_torchscript, load_model

        if args.radial == "spline":
            raise SystemExit("--radial spline is for the mliap format; pair_style mace files are TorchScript, "
                             "which always uses the exact radial MLP")

        model = load_model(path, device="cpu", dtype=args.dtype)
        heads = list(model.heads)
        head = 0 if args.head is None else (heads.index(args.head) if args.head in heads else None)
        if head is None:
            raise SystemExit(f"unknown head {args.head!r}; this model has heads {heads}")
        export_torchscript(model, args.output, lammps=True, head=head)
        symbols = " ".join(args.elements) if args.elements else "<element of each type>"
        print(f"wrote {args.output}\nLAMMPS input (units metal, newton on, atom_modify map yes):\n"
              f"pair_style   mace\npair_coeff   * * {args.output} {symbols}")
        return 0

    from mace_ase.lammps import export_lammps, lammps_input_lines

    unified = export_lammps(path, args.output, dtype=args.dtype, device=args.device, head=args.head,
                            radial=args.radial)
    print(f"wrote {args.output} ({', '.join(unified.element_types)}; r_max {unified.r_max:g} A, "
          f"{unified.num_interactions} interactions, {args.dtype}, head {unified.head_name!r})")
    print("LAMMPS input lines:")
    for line in lammps_input_lines(unified, args.output, args.elements):
        print("  " + line)
    return 0
