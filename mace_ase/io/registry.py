"""The model registry: the catalogue of named MACE models, the local cache, and verified fetching.

The catalogue is the text file ``models/registry.txt`` (its header documents the columns). It ships inside the wheel
as ``mace_ase/_models/registry.txt``; a source checkout reads ``<repo>/models/registry.txt``.

``fetch(name)`` returns the path of a verified local copy of a catalogue model, looking in this order:

1. a file shipped with mace-ase (catalogue source without ``://``): used in place, never downloaded;
2. the cache folder ``cache_dir()``: ``$MACE_ASE_CACHE_DIR``, else ``platformdirs.user_cache_dir("mace-ase")``;
3. each read-only shared folder in ``$MACE_ASE_CACHE_PATH`` (``os.pathsep``-separated), for HPC sites;
4. a download into the cache folder (refused at once when ``$MACE_ASE_OFFLINE=1``), from the catalogue URL or from
   ``$MACE_ASE_MIRROR/<file name>``. A lock file (``<file>.lock``) makes concurrent processes download it once.

Integrity: a file is accepted only if it matches the catalogue checksum (a git blob SHA-1 or a SHA-256). Where no
checksum is published, the SHA-256 of the first verified copy is written next to it as ``<file>.sha256`` (the format
of ``sha256sum``) and every later use is checked against it (trust on first use). A cached file that fails its check
is deleted and reported; nothing that failed a check is ever returned. Nothing touches the file system at import.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import logging
import os
import re
import shlex
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from mace_ase.io.download import DownloadError, download

log = logging.getLogger(__name__)

__all__ = [
    "CatalogueError", "DownloadError", "IntegrityError", "ModelEntry", "NotAModelFileError", "OfflineError",
    "UnknownModelError", "cache_dir", "catalogue", "check_model_file", "clear", "fetch", "fetch_entry", "fetch_url",
    "find_cached", "lookup", "parse_catalogue", "verify",
]

LICENCES = {
    "MIT": None,  # no notice needed
    "ASL": "the Academic Software License (ASL, https://github.com/gabor1/ASL), which does not permit commercial use. "
           "By using the model you accept its terms",
}
DTYPES = ("float32", "float64")
FAMILY_FUNCTIONS = {"mp": "mace_mp", "off": "mace_off", "omol": "mace_omol", "anicc": "mace_anicc", "demo": "mace_mp"}
_CHECKSUM = re.compile(r"^(gitsha1:[0-9a-f]{40}|sha256:[0-9a-f]{64})$")


class CatalogueError(ValueError):
    """The catalogue file is malformed; the message names the file, the line and the entry."""


class UnknownModelError(ValueError):
    """A model name that the catalogue does not know."""


class OfflineError(RuntimeError):
    """The model is not cached and MACE_ASE_OFFLINE forbids downloading it."""


class IntegrityError(RuntimeError):
    """A file does not match its known checksum."""


class NotAModelFileError(ValueError):
    """A file is not a MACE ``.model`` file (torch zip archive with one ``<name>/data.pkl``)."""


@dataclass(frozen=True)
class ModelEntry:
    """One catalogue line. ``checksum`` is ``"gitsha1:<hex>"``, ``"sha256:<hex>"`` or None (trust on first use)."""

    name: str
    family: str
    licence: str
    dtype: str  # default dtype of the family function
    checksum: str | None
    source: str  # https URL, or a path relative to the models folder
    alias: str | None = None  # the short name mace-torch's function uses (mace_off "medium")
    head: str | None = None  # head the model must be used with (mace_omol: "omol")

    @property
    def is_local(self) -> bool:
        return "://" not in self.source

    @property
    def file_name(self) -> str:
        return self.source.rsplit("/", 1)[-1]


# --------------------------------------------------------------------------------------------------- the catalogue


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
        if not sep or key not in ("alias", "head") or not value:
            raise ValueError(f"unknown option {option!r} (allowed: alias=..., head=...)")
        options[key] = value
    if family not in FAMILY_FUNCTIONS:
        raise ValueError(f"unknown family {family!r} (allowed: {', '.join(FAMILY_FUNCTIONS)})")
    if licence not in LICENCES:
        raise ValueError(f"unknown licence {licence!r} (allowed: {', '.join(LICENCES)})")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (allowed: {', '.join(DTYPES)})")
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

    With ``families`` given, only entries of those families are accepted.
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
    function = FAMILY_FUNCTIONS.get(other.family, "fetch") if other is not None else ""
    hint = f" It is a {other.family!r}-family model: use {function}(model={name!r})." if other is not None else ""
    raise UnknownModelError(f"Unknown model {name!r}.{hint} Available: {', '.join(choices)}.")


# ------------------------------------------------------------------------------------------ cache and environment


def cache_dir() -> Path:
    """The writable cache folder: ``$MACE_ASE_CACHE_DIR`` or ``platformdirs.user_cache_dir("mace-ase")``."""
    configured = os.environ.get("MACE_ASE_CACHE_DIR", "").strip()
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("mace-ase"))


def shared_cache_dirs() -> list[Path]:
    """Read-only folders listed in ``$MACE_ASE_CACHE_PATH`` (``os.pathsep``-separated), searched in order."""
    value = os.environ.get("MACE_ASE_CACHE_PATH", "")
    return [Path(part).expanduser() for part in value.split(os.pathsep) if part.strip()]


def offline() -> bool:
    """True when ``$MACE_ASE_OFFLINE`` is 1/true/yes/on (0/false/no/off or unset: False)."""
    value = os.environ.get("MACE_ASE_OFFLINE", "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"MACE_ASE_OFFLINE={value!r} is not understood; use 1 (offline) or 0 (online).")


def source_url(entry: ModelEntry) -> str:
    """Where ``entry`` is downloaded from: ``$MACE_ASE_MIRROR/<file name>`` if set, else its catalogue URL."""
    mirror = os.environ.get("MACE_ASE_MIRROR", "").strip()
    if not mirror:
        return entry.source
    if not mirror.startswith(("https://", "http://")):
        raise ValueError(f"MACE_ASE_MIRROR={mirror!r} must be an http(s):// base URL.")
    return f"{mirror.rstrip('/')}/{entry.file_name}"


def find_cached(entry: ModelEntry) -> Path | None:
    """The first existing copy of ``entry`` (cache folder, then shared folders), *without* verifying it."""
    if entry.is_local:
        path = models_dir() / entry.source
        return path if path.is_file() else None
    for folder in (cache_dir(), *shared_cache_dirs()):
        if (folder / entry.file_name).is_file():
            return folder / entry.file_name
    return None


# --------------------------------------------------------------------------------------------- integrity checks


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


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _read_sidecar(path: Path) -> str | None:
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        return None
    return sidecar.read_text(encoding="ascii").split()[0].lower()


def _write_sidecar(path: Path, sha256: str, file_name: str) -> None:
    sidecar = _sidecar(path)
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
        algorithm, expected, origin = "sha256", _read_sidecar(path), f"{_sidecar(path)}"
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


_verified: set[tuple] = set()  # (path, size, mtime_ns, checksum) already hashed in this process


def _verify(path: Path, checksum: str | None, *, owned: bool, what: str) -> Path:
    """Check ``path``; record a first-use SHA-256 if ``owned``; delete it if ``owned`` and bad. Returns ``path``."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, checksum)
    if key in _verified:
        return path
    problem = integrity_problem(path, checksum)
    if problem is not None:
        if owned:
            path.unlink(missing_ok=True)
            _sidecar(path).unlink(missing_ok=True)
            raise IntegrityError(f"The cached copy of {what} is corrupt or was replaced: {problem}. It was deleted; "
                                 "run again to download a fresh copy.")
        raise IntegrityError(f"The copy of {what} at {path} fails its check: {problem}. It is in a read-only "
                             "shared folder (MACE_ASE_CACHE_PATH): ask its maintainer to replace it, or remove the "
                             "folder from MACE_ASE_CACHE_PATH.")
    if checksum is None and _read_sidecar(path) is None and owned:
        sha256 = file_digest(path, "sha256")
        _write_sidecar(path, sha256, path.name)
        log.info("No published checksum for %s; recorded SHA-256 %s of %s (trust on first use)", what, sha256, path)
    _verified.add(key)
    return path


# ---------------------------------------------------------------------------------------------------- fetching

_notified: set[str] = set()


def licence_notice(entry: ModelEntry) -> None:
    """Log the licence terms of ``entry`` once per process (nothing for MIT)."""
    terms = LICENCES[entry.licence]
    if terms and entry.name not in _notified:
        _notified.add(entry.name)
        log.warning("Model %r is distributed under %s.", entry.name, terms)


def fetch(name: str) -> Path:
    """Path of a verified local copy of catalogue model ``name``, downloading it if needed (see module docstring)."""
    return fetch_entry(lookup(name))


def fetch_entry(entry: ModelEntry, notify: bool = True) -> Path:
    """Like ``fetch`` for a ``ModelEntry`` (which need not come from the shipped catalogue).

    ``notify``: log the licence terms (once per process) after a successful fetch; callers that go on to load the
    model pass False and call :func:`licence_notice` once the load has succeeded.
    """
    path = _fetch_entry(entry)
    if notify:
        licence_notice(entry)
    return path


def _fetch_entry(entry: ModelEntry) -> Path:
    what = f"model {entry.name!r}"
    if entry.is_local:
        path = models_dir() / entry.source
        if not path.is_file():
            raise FileNotFoundError(f"{what} should ship with mace-ase as {path}, but that file is missing; "
                                    "reinstall mace-ase.")
        return _verify(path, entry.checksum, owned=False, what=what)
    own = cache_dir() / entry.file_name
    if own.is_file():
        return _verify(own, entry.checksum, owned=True, what=what)
    for folder in shared_cache_dirs():
        if (folder / entry.file_name).is_file():
            return _verify(folder / entry.file_name, entry.checksum, owned=False, what=what)
    return _download_verified(source_url(entry), own, entry.checksum, what=what, name=entry.name)


def fetch_url(url: str) -> Path:
    """Path of a verified local copy of the model at an http(s) ``url`` (cached as ``urls/<hash>-<file name>``)."""
    if not url.startswith(("https://", "http://")):
        raise ValueError(f"not an http(s) URL: {url!r}")
    base = re.sub(r"[^A-Za-z0-9._-]", "_", url.split("?")[0].rstrip("/").rsplit("/", 1)[-1]) or "model"
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    path = cache_dir() / "urls" / f"{key}-{base}"
    what = f"model at {url}"
    if path.is_file():
        return _verify(path, None, owned=True, what=what)
    return _download_verified(url, path, None, what=what)


def _download_verified(url: str, destination: Path, checksum: str | None, *, what: str,
                       name: str | None = None) -> Path:
    if offline():
        prefetch = f"; `mace-ase models download {name}` on a machine with internet access fetches it" if name else ""
        raise OfflineError(
            f"{what} is not cached and MACE_ASE_OFFLINE is set, so it is not downloaded. Copy the file "
            f"{destination.name} (from {url}) to {destination}, or into a folder listed in MACE_ASE_CACHE_PATH"
            f"{prefetch}."
        )
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"Cannot create the model cache folder {destination.parent} ({exc}); set MACE_ASE_CACHE_DIR "
                      "to a writable folder.") from exc

    def validate(temporary: Path) -> None:
        if checksum is not None:
            algorithm, expected = checksum.split(":")
            actual = file_digest(temporary, algorithm)
            if actual != expected:
                raise IntegrityError(
                    f"The download of {what} from {url} has {algorithm} {actual}, but the catalogue says {expected}. "
                    f"It was deleted, nothing was written to {destination}. The transfer may have been corrupted "
                    "(try again) or the file changed upstream (report it to mace-ase)."
                )
        try:
            check_model_file(temporary)
        except ValueError as exc:
            raise DownloadError(f"The download of {what} from {url} is not a model file ({exc}); it was deleted, "
                                f"nothing was written to {destination}.", url=url) from exc
        if checksum is None:  # trust on first use: record the hash before the file becomes visible
            _write_sidecar(destination, file_digest(temporary, "sha256"), destination.name)

    from filelock import FileLock, Timeout

    lock = FileLock(str(destination) + ".lock")
    try:
        lock.acquire(timeout=0.05)
    except Timeout:
        log.info("Waiting for another process that is downloading %s (lock %s)", what, lock.lock_file)
        lock.acquire()
    try:
        if destination.is_file():  # another process finished while we waited
            return _verify(destination, checksum, owned=True, what=what)
        download(url, destination, what=what, validate=validate)
        return _verify(destination, checksum, owned=True, what=what)
    finally:
        lock.release()


# ------------------------------------------------------------------------------------------- verify and clear


def verify(entry: ModelEntry) -> tuple[str, Path | None, str]:
    """Check the copy ``fetch`` would use, changing nothing. Returns ``(status, path, detail)``.

    ``status`` is ``"ok"``, ``"unpinned"`` (a model file, but no checksum known or recorded yet), ``"bad"`` or
    ``"missing"``.
    """
    path = find_cached(entry)
    if path is None:
        return "missing", None, "not cached"
    problem = integrity_problem(path, entry.checksum)
    if problem is not None:
        return "bad", path, problem
    if entry.checksum is None and _read_sidecar(path) is None:
        return "unpinned", path, "model file, no checksum recorded yet (recorded on first use)"
    return "ok", path, f"matches {entry.checksum or 'recorded sha256'}"


def clear(names: Iterable[str] | None = None) -> list[Path]:
    """Delete cached files (model, ``.sha256``, ``.lock``, ``.part``) of ``names``, or of every catalogue model and
    every URL download when ``names`` is None. Shipped files and shared folders are never touched.
    Returns the deleted paths."""
    folder = cache_dir()
    entries = catalogue().values() if names is None else [lookup(name) for name in names]
    targets: list[Path] = []
    for entry in entries:
        if entry.is_local:
            continue
        base = folder / entry.file_name
        targets += [base, _sidecar(base), Path(str(base) + ".lock")]
        targets += folder.glob(f".{glob.escape(entry.file_name)}.*.part")
    if names is None and (folder / "urls").is_dir():
        targets += (folder / "urls").iterdir()
    removed = []
    for path in targets:
        if path.is_file():
            path.unlink()
            removed.append(path)
    return removed
