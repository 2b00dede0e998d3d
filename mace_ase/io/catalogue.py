"""The model catalogue: ``models/registry.txt`` parsed into :class:`ModelEntry` records, and name look-up.

The catalogue ships inside the wheel as ``mace_ase/_models/registry.txt``; a source checkout reads
``<repo>/models/registry.txt``. Its header documents the columns and options. The catalogue says only what a model
*is* (family, licence, default dtype, checksum, source, whether mace-ase can run it); which Python function loads a
family is ``mace_ase.foundations``' business. Reading it touches nothing but that one file.
"""

from __future__ import annotations

import functools
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mace_ase.options import DTYPE_NAMES

__all__ = [
    "CatalogueError", "FAMILIES", "LICENCES", "ModelEntry", "UnknownModelError", "UnsupportedModelError",
    "catalogue", "lookup", "models_dir", "parse_catalogue",
]

FAMILIES = ("mp", "off", "omol", "anicc", "demo")
LICENCES = {
    "MIT": None,  # no notice needed
    "ASL": "the Academic Software License (ASL, https://github.com/gabor1/ASL), which does not permit commercial use. "
           "By using the model you accept its terms",
}
_OPTIONS = ("alias", "head", "unsupported", "instead")
_CHECKSUM = re.compile(r"^(gitsha1:[0-9a-f]{40}|sha256:[0-9a-f]{64})$")


class CatalogueError(ValueError):
    """The catalogue file is malformed; the message names the file, the line and the entry."""


class UnknownModelError(ValueError):
    """A model name that the catalogue does not know. ``entry`` is the catalogue entry of that name when it exists
    but belongs to a family the caller did not accept (so the caller can point to the right function)."""

    def __init__(self, message: str, entry: ModelEntry | None = None) -> None:
        super().__init__(message)
        self.entry = entry


class UnsupportedModelError(ValueError):
    """A MACE model that mace-ase does not implement: raised for catalogue entries marked ``unsupported=`` before
    anything is downloaded, and (as ``mace_ase.model.build.UnsupportedModelError``) for files of such an
    architecture."""


@dataclass(frozen=True)
class ModelEntry:
    """One catalogue line. ``checksum`` is ``"gitsha1:<hex>"``, ``"sha256:<hex>"`` or None (trust on first use)."""

    name: str
    family: str
    licence: str
    dtype: str  # the default dtype of this model (mace-torch's for its function: mace_mp float32, others float64)
    checksum: str | None
    source: str  # https URL, or a path relative to the models folder
    alias: str | None = None  # the short name mace-torch's function uses (mace_off "medium")
    head: str | None = None  # head the model must be used with (mace_omol: "omol")
    unsupported: str | None = None  # why mace-ase cannot run this model (None: it can)
    instead: str | None = None  # what to use instead, given with `unsupported`

    @property
    def is_local(self) -> bool:
        return "://" not in self.source

    @property
    def file_name(self) -> str:
        return self.source.rsplit("/", 1)[-1]

    @property
    def supported(self) -> bool:
        return self.unsupported is None

    def check_supported(self) -> None:
        """Raise :class:`UnsupportedModelError` (naming the reason and the alternative) for an unsupported entry."""
        if self.unsupported is not None:
            raise UnsupportedModelError(
                f"Model {self.name!r} is in the catalogue, but mace-ase cannot run it: {self.unsupported}. "
                f"Instead, use {self.instead}. Nothing was downloaded."
            )


def models_dir() -> Path:
    """Folder holding ``registry.txt`` and shipped models: ``mace_ase/_models`` in a wheel, ``<repo>/models`` else."""
    package = Path(__file__).resolve().parents[1]
    for folder in (package / "_models", package.parent / "models"):
        if (folder / "registry.txt").is_file():
            return folder
    raise FileNotFoundError(
        f"The model catalogue registry.txt is in neither {package / '_models'} (wheel) nor "
        f"{package.parent / 'models'} (source checkout); the installation is incomplete, reinstall mace-ase."
    )


def parse_catalogue(text: str, origin: str = "registry.txt") -> dict[str, ModelEntry]:
    """Parse catalogue text (format in the header of ``models/registry.txt``) into ``{name: ModelEntry}``."""
    entries: dict[str, ModelEntry] = {}
    file_names: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            fields = shlex.split(line, comments=True)
            if not fields:
                continue
            entry = _parse_fields(fields)
            if entry.name in entries:
                raise ValueError(f"duplicate name {entry.name!r}")
            if entry.file_name in file_names:
                raise ValueError(f"file name {entry.file_name!r} is also used by {file_names[entry.file_name]!r}")
        except ValueError as exc:
            raise CatalogueError(f"{origin}, line {number}: {exc}: {line.strip()!r}") from None
        file_names[entry.file_name] = entry.name
        entries[entry.name] = entry
    return entries


def _parse_fields(fields: list[str]) -> ModelEntry:
    """One catalogue line, split into fields; raises ValueError naming the problem."""
    if len(fields) < 6:
        raise ValueError("expected at least 6 columns (name family licence dtype checksum source)")
    name, family, licence, dtype, checksum, source = fields[:6]
    options = {}
    for option in fields[6:]:
        key, sep, value = option.partition("=")
        if not sep or key not in _OPTIONS or not value:
            raise ValueError(f"unknown option {option!r} (allowed: {', '.join(k + '=...' for k in _OPTIONS)})")
        options[key] = value
    if ("unsupported" in options) != ("instead" in options):
        raise ValueError("unsupported=... and instead=... go together (why it cannot run, what to use instead)")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} (allowed: {', '.join(FAMILIES)})")
    if licence not in LICENCES:
        raise ValueError(f"unknown licence {licence!r} (allowed: {', '.join(LICENCES)})")
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r} (allowed: {', '.join(DTYPE_NAMES)})")
    if checksum == "-":
        checksum = None
    elif not _CHECKSUM.match(checksum):
        raise ValueError(f"bad checksum {checksum!r} (gitsha1:<40 hex>, sha256:<64 hex> or -)")
    if "://" in source and not source.startswith("https://"):
        raise ValueError("remote sources must be https:// URLs")
    return ModelEntry(name, family, licence, dtype, checksum, source, **options)


@functools.cache
def catalogue() -> dict[str, ModelEntry]:
    """The shipped catalogue, ``{name: ModelEntry}`` in file order (read once per process)."""
    path = models_dir() / "registry.txt"
    return parse_catalogue(path.read_text(encoding="utf-8"), origin=str(path))


def lookup(name: str, families: Iterable[str] | None = None) -> ModelEntry:
    """The catalogue entry called ``name`` (or with ``alias=name`` within ``families``); ``UnknownModelError`` else.

    With ``families`` given, only entries of those families are accepted; an entry of that name in another family is
    named in the error (and attached to it as ``entry``).
    """
    entries = catalogue()
    allowed = None if families is None else set(families)
    for entry in entries.values():
        if allowed is None and entry.name == name:
            return entry
        if allowed is not None and entry.family in allowed and name in (entry.name, entry.alias):
            return entry
    choices = [e.name for e in entries.values() if allowed is None or e.family in allowed]
    choices += [e.alias for e in entries.values() if e.alias and allowed and e.family in allowed]
    other = entries.get(name)
    hint = f" It is a model of family {other.family!r}." if other is not None else ""
    raise UnknownModelError(f"Unknown model {name!r}.{hint} Available: {', '.join(choices)}.", other)
