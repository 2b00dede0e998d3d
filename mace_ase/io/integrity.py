"""Is this file the model it claims to be? Checksums, the model-file check and trust-on-first-use sidecars.

A file is accepted only if it matches its catalogue checksum (a git blob SHA-1 or a SHA-256). Where no checksum is
published, the SHA-256 of the first verified copy is written next to it as ``<file>.sha256`` (the format of
``sha256sum``) and every later use is checked against it (trust on first use). Functions here check and record;
deciding what to do with a bad file (delete it, report it) is ``mace_ase.io.registry``'s.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from importlib.util import find_spec
from pathlib import Path

__all__ = [
    "IntegrityError", "NotAModelFileError", "check_model_file", "file_digest", "integrity_problem", "read_sidecar",
    "sidecar_path", "write_sidecar",
]


class IntegrityError(RuntimeError):
    """A file does not match its known checksum."""


class NotAModelFileError(ValueError):
    """A file is not a MACE ``.model`` file (torch zip archive with one ``<name>/data.pkl``)."""


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file; ``algorithm`` is ``"sha256"`` or ``"gitsha1"`` (sha1 of ``b"blob <size>\\0" + bytes``)."""
    if algorithm == "gitsha1":
        digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    elif algorithm == "sha256":
        digest = hashlib.sha256()
    else:
        raise ValueError(f"unknown checksum algorithm {algorithm!r}; use 'sha256' or 'gitsha1'")
    with open(path, "rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_model_file(path: Path) -> None:
    """Raise ``NotAModelFileError`` or the reader's ``ModelFileError`` (both ValueError) unless ``path`` is a model.

    Cheap test: a zip archive with exactly one ``<name>/data.pkl`` member (rejects HTML pages and truncated files);
    then the safe reader ``mace_ase.io.model_file.read_model_file`` where it is installed (never executes the file).
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as source:
            start = source.read(32)
        raise NotAModelFileError(f"{path} is not a MACE model file: not a (complete) zip archive; it starts "
                                 f"with {start!r}")
    with zipfile.ZipFile(path) as archive:
        pickles = [member for member in archive.namelist() if member.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise NotAModelFileError(f"{path} is not a MACE model file: expected one '<name>/data.pkl' member, "
                                 f"found {len(pickles)}")
    _read_with_model_reader(path)


def _read_with_model_reader(path: Path) -> None:
    if find_spec("mace_ase.io.model_file") is None:  # the safe reader is optional here
        return
    from mace_ase.io.model_file import read_model_file

    read_model_file(path)


def sidecar_path(path: Path) -> Path:
    """Where the first-use SHA-256 of ``path`` is recorded: ``<file>.sha256``."""
    return path.with_name(path.name + ".sha256")


def read_sidecar(path: Path) -> str | None:
    """The recorded SHA-256 of ``path`` (lower-case hex), or None when none was recorded."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    return sidecar.read_text(encoding="ascii").split()[0].lower()


def write_sidecar(path: Path, sha256: str, file_name: str) -> None:
    """Record ``sha256`` for ``path`` (as ``sha256sum`` writes it, naming ``file_name``), atomically."""
    sidecar = sidecar_path(path)
    partial = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.part")
    partial.write_text(f"{sha256}  {file_name}\n", encoding="ascii")
    os.replace(partial, sidecar)


def integrity_problem(path: Path, checksum: str | None) -> str | None:
    """Why ``path`` fails its check (a sentence), or None when it passes. Never changes anything.

    With a catalogue ``checksum`` the file must match it; otherwise it must match its ``.sha256`` sidecar. A file
    with neither is checked to be a model file only (the caller records its hash: trust on first use).
    """
    if checksum is not None:
        algorithm, expected = checksum.split(":")
        origin = "the catalogue"
    else:
        algorithm, expected, origin = "sha256", read_sidecar(path), f"{sidecar_path(path)}"
        if expected is None:
            try:
                check_model_file(path)
            except ValueError as exc:
                return str(exc)
            return None
    actual = file_digest(path, algorithm)
    if actual != expected:
        return f"{path} has {algorithm} {actual} but {origin} says {expected}"
    return None
