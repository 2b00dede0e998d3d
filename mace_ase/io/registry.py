"""The model registry: verified local copies of catalogue models, and the checks behind ``mace-ase models``.

``fetch(name)`` returns the path of a verified local copy of a catalogue model, looking in this order:

1. a file shipped with mace-ase (catalogue source without ``://``): used in place, never downloaded;
2. the cache folder ``cache_dir()``: ``$MACE_ASE_CACHE_DIR``, else ``platformdirs.user_cache_dir("mace-ase")``;
3. each read-only shared folder in ``$MACE_ASE_CACHE_PATH`` (``os.pathsep``-separated), for HPC sites;
4. a download into the cache folder (refused at once when ``$MACE_ASE_OFFLINE=1``), from the catalogue URL or from
   ``$MACE_ASE_MIRROR/<file name>``. A lock file (``<file>.lock``) makes concurrent processes download it once.

A catalogue entry marked ``unsupported=`` (a model mace-ase cannot run) is refused before any of this, so nothing is
downloaded for it. A cached file that fails its check is deleted and reported; nothing that failed a check is ever
returned. Nothing touches the file system at import.

The parts live where a reader looks for them; this module is the facade and re-exports their public names:

* ``mace_ase.io.catalogue``: ``models/registry.txt``, ``ModelEntry``, ``lookup``;
* ``mace_ase.io.cache``: cache folders and the ``MACE_ASE_*`` environment variables;
* ``mace_ase.io.integrity``: checksums, the model-file check, trust-on-first-use ``.sha256`` sidecars;
* ``mace_ase.io.download``: one verified HTTP download (temporary file, retries, ``os.replace``).
"""

from __future__ import annotations

import glob
import hashlib
import logging
import re
from collections.abc import Iterable
from pathlib import Path

from mace_ase.io.cache import OfflineError, cache_dir, find_cached, offline, shared_cache_dirs, source_url
from mace_ase.io.catalogue import (
    LICENCES,
    CatalogueError,
    ModelEntry,
    UnknownModelError,
    UnsupportedModelError,
    catalogue,
    lookup,
    models_dir,
    parse_catalogue,
)
from mace_ase.io.download import DownloadError, download
from mace_ase.io.integrity import (
    IntegrityError,
    NotAModelFileError,
    check_model_file,
    file_digest,
    integrity_problem,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)
from mace_ase.io.locking import exclusive

log = logging.getLogger(__name__)

__all__ = [
    "CatalogueError", "DownloadError", "IntegrityError", "ModelEntry", "NotAModelFileError", "OfflineError",
    "UnknownModelError", "UnsupportedModelError", "cache_dir", "catalogue", "check_model_file", "clear", "fetch",
    "fetch_entry", "fetch_url", "file_digest", "find_cached", "integrity_problem", "licence_notice", "lookup",
    "models_dir", "offline", "parse_catalogue", "shared_cache_dirs", "source_url", "verify",
]

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
            sidecar_path(path).unlink(missing_ok=True)
            raise IntegrityError(f"The cached copy of {what} is corrupt or was replaced: {problem}. It was deleted; "
                                 "run again to download a fresh copy.")
        raise IntegrityError(f"The copy of {what} at {path} fails its check: {problem}. It is in a read-only "
                             "shared folder (MACE_ASE_CACHE_PATH): ask its maintainer to replace it, or remove the "
                             "folder from MACE_ASE_CACHE_PATH.")
    if checksum is None and read_sidecar(path) is None and owned:
        sha256 = file_digest(path, "sha256")
        write_sidecar(path, sha256, path.name)
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

    Raises ``UnsupportedModelError`` for an entry marked ``unsupported=`` before looking anywhere (nothing is
    downloaded), naming why and what to use instead.
    """
    entry.check_supported()
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
            write_sidecar(destination, file_digest(temporary, "sha256"), destination.name)

    with exclusive(Path(str(destination) + ".lock"), f"Waiting for another process that is downloading {what}"):
        if destination.is_file():  # another process finished while we waited
            return _verify(destination, checksum, owned=True, what=what)
        download(url, destination, what=what, validate=validate)
        return _verify(destination, checksum, owned=True, what=what)


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
    if entry.checksum is None and read_sidecar(path) is None:
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
        targets += [base, sidecar_path(base), Path(str(base) + ".lock")]
        targets += folder.glob(f".{glob.escape(entry.file_name)}.*.part")
    if names is None and (folder / "urls").is_dir():
        targets += (folder / "urls").iterdir()
    removed = []
    for path in targets:
        if path.is_file():
            path.unlink()
            removed.append(path)
    return removed
