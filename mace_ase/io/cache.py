"""Where models live on disk and what the environment says: cache folders, offline mode, mirror.

| variable               | effect                                                                             |
|------------------------|------------------------------------------------------------------------------------|
| ``MACE_ASE_CACHE_DIR`` | the writable cache folder (else ``platformdirs.user_cache_dir("mace-ase")``)       |
| ``MACE_ASE_CACHE_PATH``| read-only shared folders (``os.pathsep``-separated), searched after the cache      |
| ``MACE_ASE_OFFLINE``   | 1/true/yes/on: never download                                                      |
| ``MACE_ASE_MIRROR``    | fetch catalogue models from ``<mirror>/<file name>``                               |

Every function reads the environment when called (nothing is cached at import), and none writes anything.
"""

from __future__ import annotations

import os
from pathlib import Path

from mace_ase.io.catalogue import ModelEntry, models_dir

__all__ = ["OfflineError", "cache_dir", "find_cached", "offline", "shared_cache_dirs", "source_url"]


class OfflineError(RuntimeError):
    """The model is not cached and MACE_ASE_OFFLINE forbids downloading it."""


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
