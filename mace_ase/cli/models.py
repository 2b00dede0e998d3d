"""``mace-ase models list|download|verify|path|clear|info``: manage the model catalogue and the local cache.

Typical HPC use: ``mace-ase models download medium-mpa-0`` on a login node, then ``MACE_ASE_OFFLINE=1`` in jobs.
"""

from __future__ import annotations

import argparse
import os
import sys

from mace_ase.io import registry


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` command and its actions to the ``mace-ase`` parser."""
    parser = subparsers.add_parser(
        "models", help="list, download, verify, locate and clear MACE models",
        description="Manage named MACE models and their cache. Environment: MACE_ASE_CACHE_DIR (cache folder), "
                    "MACE_ASE_CACHE_PATH (read-only shared folders), MACE_ASE_OFFLINE=1, MACE_ASE_MIRROR=<base URL>.",
    )
    actions = parser.add_subparsers(dest="models_action", metavar="ACTION", required=True)
    actions.add_parser("list", help="table of catalogue models and whether they are cached").set_defaults(func=_list)
    download = actions.add_parser("download", help="download and verify models (e.g. on a login node)")
    download.add_argument("names", nargs="+", metavar="NAME")
    download.set_defaults(func=_download)
    verify = actions.add_parser("verify", help="check cached models against their checksums (all cached by default)")
    verify.add_argument("names", nargs="*", metavar="NAME")
    verify.set_defaults(func=_verify)
    path = actions.add_parser("path", help="print the path of a cached model")
    path.add_argument("name", metavar="NAME")
    path.set_defaults(func=_path)
    clear = actions.add_parser("clear", help="delete cached models (all of them by default)")
    clear.add_argument("names", nargs="*", metavar="NAME")
    clear.set_defaults(func=_clear)
    info = actions.add_parser("info", help="architecture of a model (catalogue name or .model file), read safely")
    info.add_argument("model", metavar="NAME|PATH")
    info.set_defaults(func=_info)


def _info(args: argparse.Namespace) -> int:
    from mace_ase.io.model_file import read_model_file
    from mace_ase.model.build import hyperparameters

    try:  # an unsupported catalogue model is refused here, before anything is downloaded
        path = args.model if os.path.isfile(args.model) else registry.fetch(args.model)
        summary = hyperparameters(read_model_file(path))
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary["atomic_energies"] = f"{len(summary['atomic_numbers'])} values (eV)"
    print(f"file: {path}")
    for key, value in summary.items():
        print(f"{key:22s} {value}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from mace_ase.foundations import DEFAULT_MODELS, FUNCTION_FAMILIES

    defaults = set()
    for function, history in DEFAULT_MODELS.items():
        defaults.add(registry.lookup(history[-1][1], FUNCTION_FAMILIES[function]).name)
    own = registry.cache_dir()
    rows = [("NAME", "FAMILY", "LICENCE", "SIZE", "CACHED")]
    for entry in registry.catalogue().values():
        path = registry.find_cached(entry)
        if path is None:
            where = "no"
        elif entry.is_local:
            where = "shipped"
        else:
            where = "yes" if path.parent == own else f"shared: {path.parent}"
        marker = (" *" if entry.name in defaults else "") + ("" if entry.supported else " !")
        size = _human_size(path.stat().st_size) if path else "-"
        rows.append((entry.name + marker, entry.family, entry.licence, size, where))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    print("\n! mace-ase cannot run it (`mace-ase models info NAME` says why and what to use instead)")
    print(f"* default model of its function. Cache: {own}"
          + (" (MACE_ASE_CACHE_DIR)" if os.environ.get("MACE_ASE_CACHE_DIR") else ""))
    if registry.shared_cache_dirs():
        print("Shared (read-only): " + ", ".join(map(str, registry.shared_cache_dirs())))
    if registry.offline():
        print("Offline mode (MACE_ASE_OFFLINE): nothing will be downloaded.")
    return 0


def _download(args: argparse.Namespace) -> int:
    failures = 0
    for name in args.names:
        try:
            print(f"{name}: {registry.fetch(name)}")
        except (ValueError, OSError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            failures += 1
    return 1 if failures else 0


def _verify(args: argparse.Namespace) -> int:
    try:
        entries = [registry.lookup(name) for name in args.names] or list(registry.catalogue().values())
    except registry.UnknownModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    bad = checked = 0
    for entry in entries:
        status, path, detail = registry.verify(entry)
        if status == "missing" and not args.names:
            continue  # verifying everything means everything that is cached
        checked += 1
        bad += status in ("bad", "missing")
        print(f"{entry.name}: {status.upper()}  {path or ''}  ({detail})")
    if not checked:
        print("No cached models to verify.")
    return 1 if bad else 0


def _path(args: argparse.Namespace) -> int:
    try:
        entry = registry.lookup(args.name)
    except registry.UnknownModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    path = registry.find_cached(entry)
    if path is None:
        print(f"error: {entry.name} is not cached; `mace-ase models download {entry.name}` puts it at "
              f"{registry.cache_dir() / entry.file_name}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _clear(args: argparse.Namespace) -> int:
    try:
        removed = registry.clear(args.names or None)
    except registry.UnknownModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in removed:
        print(f"deleted {path}")
    print(f"{len(removed)} file(s) deleted from {registry.cache_dir()}")
    return 0


def _human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
