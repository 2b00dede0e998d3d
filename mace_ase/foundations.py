"""MACE foundation models by name: ``mace_mp()``, ``mace_off()``, ``mace_omol()``, ``mace_anicc()``.

Each function returns a ``MACECalculator`` (ASE units: eV, Å, eV/Å, eV/Å³). ``model`` may be

* a catalogue name (``mace-ase models list``; for example ``"medium-mpa-0"``, or ``"medium"`` for ``mace_off``),
  fetched, verified and cached by ``mace_ase.io.registry`` (cache folder, ``MACE_ASE_OFFLINE``, ``MACE_ASE_MIRROR``,
  ``MACE_ASE_CACHE_PATH``: see that module);
* a path to a local ``.model`` file, used as it is;
* an ``http(s)://`` URL, downloaded once into the cache (its SHA-256 is recorded on first use).

Default models are explicit (``DEFAULT_MODELS``) and appear in each signature. When a default changes, a row is
appended to its history and every call that relies on the default warns, naming the old and the new model, until the
caller passes ``model=`` explicitly.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ase.units import Bohr

from mace_ase.io.model_file import ModelFileError, directory_message
from mace_ase.io.registry import ModelEntry, UnknownModelError, fetch_entry, fetch_url, licence_notice, lookup
from mace_ase.options import resolve_device, resolve_dtype

log = logging.getLogger(__name__)

# Default model of each function, oldest first: (mace-ase version that made it the default, catalogue name or alias).
# To change a default append a row; keep old rows for a few releases so that callers relying on the default are warned.
DEFAULT_MODELS: dict[str, tuple[tuple[str, str], ...]] = {
    "mace_mp": (("0.1.0", "medium-mpa-0"),),
    "mace_off": (("0.1.0", "medium"),),
    "mace_omol": (("0.1.0", "extra_large"),),
    "mace_anicc": (("0.1.0", "anicc"),),
}


class _DefaultModel(str):
    """A default model name. The function receives this very object only when the caller did not pass ``model``."""


_DEFAULT = {function: _DefaultModel(history[-1][1]) for function, history in DEFAULT_MODELS.items()}

# Which catalogue families (models/registry.txt) each function accepts; the catalogue itself names no function.
FUNCTION_FAMILIES: dict[str, tuple[str, ...]] = {
    "mace_mp": ("mp", "demo"),
    "mace_off": ("off",),
    "mace_omol": ("omol",),
    "mace_anicc": ("anicc",),
}
FAMILY_FUNCTIONS: dict[str, str] = {family: function for function, families in FUNCTION_FAMILIES.items()
                                    for family in families}


def function_for(entry: ModelEntry) -> str:
    """The name of the function that loads catalogue ``entry`` (``"mace_off"`` for an ``off``-family model)."""
    return FAMILY_FUNCTIONS[entry.family]


def default_dtype_for(function: str, entry: ModelEntry | None) -> str:
    """The dtype used when the caller gives none: the catalogue's for ``entry``, else (a path or URL) the catalogue's
    for the function's default model. So mace_mp models run in float32 and the others in float64, as in mace-torch,
    and the catalogue's dtype column is the one place that says so."""
    if entry is None:
        entry = lookup(_DEFAULT[function], FUNCTION_FAMILIES[function])
    return entry.dtype


def mace_mp(
    model: str | os.PathLike | None = _DEFAULT["mace_mp"],
    device: str | None = None,
    default_dtype: str | None = None,
    dispersion: bool = False,
    damping: str = "bj",
    dispersion_xc: str = "pbe",
    dispersion_cutoff: float = 40.0 * Bohr,
    head: str | None = None,
    **kwargs: Any,
):
    """A MACE-MP-family materials model (MPtrj, sAlex, OMat24, MatPES, multi-head) as an ASE calculator.

    Args:
        model: catalogue name of family ``mp`` (default ``"medium-mpa-0"``, MIT licence; OMAT, MATPES and MH models
            are ASL: non-commercial), or ``"emt-demo"``, a local file path, or an http(s) URL.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``; None picks ``"cuda"`` when available, else ``"cpu"``.
        default_dtype: ``"float32"`` (fast; fine for MD) or ``"float64"`` (relaxations, phonons, Hessians); None
            (the default) takes the model's dtype from the catalogue: float32 for every ``mp`` model, as mace-torch's
            ``mace_mp``; for a path or URL, that of the default model (float32). ``mace_off``, ``mace_omol`` and
            ``mace_anicc`` default to float64 the same way.
        dispersion: add Grimme D3 (``mace_ase.dispersion``); must be a real bool.
        damping: D3 damping (``"bj"``, ``"zero"``, ...), only with ``dispersion=True``.
        dispersion_xc: functional whose D3 parameters are used, only with ``dispersion=True``.
        dispersion_cutoff: D3 cutoff in Å (default 40 Bohr = 21.17 Å), only with ``dispersion=True``.
        head: head of a multi-head model (``mh-0``, ``mh-1``); None uses the model's default head.
        **kwargs: passed to ``MACECalculator``; ``return_raw_model=True`` (as in mace-torch) returns the loaded
            :class:`~mace_ase.model.mace.MACE` module instead of a calculator (every function here accepts it).

    Returns:
        a ``MACECalculator``, or the D3 sum calculator when ``dispersion=True``, or the ``MACE`` module.
    """
    if not isinstance(dispersion, bool):
        raise TypeError(f"dispersion must be True or False, not {dispersion!r} ({type(dispersion).__name__})")
    if dispersion and kwargs.get("return_raw_model"):
        raise ValueError("return_raw_model=True returns the MACE module alone; it cannot include dispersion=True")
    calculator = _build("mace_mp", FUNCTION_FAMILIES["mace_mp"], model, device, default_dtype, head, kwargs)
    if not dispersion:
        return calculator
    from mace_ase.dispersion import add_d3

    return add_d3(calculator, xc=dispersion_xc, damping=damping, cutoff=dispersion_cutoff)


def mace_off(
    model: str | os.PathLike | None = _DEFAULT["mace_off"],
    device: str | None = None,
    default_dtype: str | None = None,
    head: str | None = None,
    **kwargs: Any,
):
    """A MACE-OFF organic-molecule model (H, C, N, O, F, P, S, Cl, Br, I; ASL licence: non-commercial).

    ``model``: ``"small"``, ``"medium"`` (default), ``"large"`` (MACE-OFF23), another ``off`` catalogue name
    (``"off24-medium"``), a local path or an http(s) URL. Other arguments as for ``mace_mp``.
    """
    return _build("mace_off", FUNCTION_FAMILIES["mace_off"], model, device, default_dtype, head, kwargs)


def mace_omol(
    model: str | os.PathLike | None = _DEFAULT["mace_omol"],
    device: str | None = None,
    default_dtype: str | None = None,
    **kwargs: Any,
):
    """MACE-OMOL-0 (OMol25 molecules, ASL licence), always with head ``"omol"``. Other arguments as for ``mace_mp``."""
    return _build("mace_omol", FUNCTION_FAMILIES["mace_omol"], model, device, default_dtype, "omol", kwargs)


def mace_anicc(
    model: str | os.PathLike | None = _DEFAULT["mace_anicc"],
    device: str | None = None,
    default_dtype: str | None = None,
    **kwargs: Any,
):
    """The ANI-500k coupled-cluster MACE model (H, C, N, O; MIT licence). Other arguments as for ``mace_mp``."""
    return _build("mace_anicc", FUNCTION_FAMILIES["mace_anicc"], model, device, default_dtype, None, kwargs)


def resolve_model(
    function: str, families: Iterable[str], model: str | os.PathLike | None
) -> tuple[Path, ModelEntry | None]:
    """The local file for ``model`` (catalogue name, path or URL) and its catalogue entry (None if not one).

    ``model=None`` means the function's default, as in mace-torch.
    """
    if model is None:
        model = _DEFAULT[function]
    if model is _DEFAULT.get(function):
        _warn_if_default_changed(function)
    if isinstance(model, os.PathLike):
        return _existing_file(Path(model)), None
    if not isinstance(model, str):
        raise TypeError(f"model must be a name, a path or a URL, not {type(model).__name__}")
    if model.startswith(("https://", "http://")):
        return fetch_url(model), None
    try:
        entry = lookup(model, families)
    except UnknownModelError as exc:
        path = Path(model).expanduser()
        if path.is_dir():
            raise ModelFileError(directory_message(path)) from None
        if path.is_file() or os.sep in model or path.suffix:  # it was meant as a file
            return _existing_file(path), None
        if exc.entry is not None and exc.entry.family in FAMILY_FUNCTIONS:  # a name of another function
            raise UnknownModelError(f"{function}() does not take {model!r}: it is a model of family "
                                    f"{exc.entry.family!r}, use {function_for(exc.entry)}(model={model!r}).",
                                    exc.entry) from None
        raise
    return fetch_entry(entry, notify=False), entry  # the licence is logged once the model has loaded


def _build(function: str, families: Iterable[str], model, device, default_dtype, head, kwargs):
    if default_dtype is not None:
        resolve_dtype(default_dtype, "default_dtype")  # a bad dtype fails here, before any download
    path, entry = resolve_model(function, families, model)
    if default_dtype is None:
        default_dtype = default_dtype_for(function, entry)
    if entry is not None and entry.head is not None:
        if head not in (None, entry.head):
            raise ValueError(f"model {entry.name!r} must be used with head {entry.head!r}, not {head!r}")
        head = entry.head
    device = resolve_device(device)
    if kwargs.pop("return_raw_model", False):  # mace-torch's switch: the model module itself, no calculator
        from mace_ase.model.build import load_model
        from mace_ase.validation import resolve_torch_device

        model_module = load_model(path, device=resolve_torch_device(device),  # a clear error for CUDA without CUDA
                                  dtype=resolve_dtype(default_dtype, "default_dtype"),
                                  radial=kwargs.pop("radial", "auto"))
        if entry is not None:
            licence_notice(entry)
        return model_module
    from mace_ase.calculator import MACECalculator

    log.info("%s: model %s (%s) on %s in %s", function, entry.name if entry else model, path, device, default_dtype)
    calculator = MACECalculator(model_paths=str(path), device=device, default_dtype=default_dtype, head=head, **kwargs)
    # provenance: which model, which verified file (results can be traced back to the exact weights)
    calculator.parameters["model_name"] = entry.name if entry else str(model)
    calculator.parameters["model_file"] = str(path)
    if entry is not None:
        licence_notice(entry)  # only now: a model that failed to load is not being used under any licence
    return calculator


def _existing_file(path: Path) -> Path:
    if path.is_dir():
        raise ModelFileError(directory_message(path))
    if not path.is_file():
        raise FileNotFoundError(f"No model file at {path}; give a catalogue name (`mace-ase models list`), "
                                "an existing .model file or an http(s) URL.")
    return path


def _warn_if_default_changed(function: str) -> None:
    history = DEFAULT_MODELS[function]
    since, current = history[-1]
    previous = history[-2][1] if len(history) > 1 else current
    log.info("%s: no model given, using the default %r", function, current)
    if previous != current:
        warnings.warn(
            f"{function}() uses the model {current!r} by default since mace-ase {since} (before: {previous!r}). "
            f"Pass model={current!r} to keep it and silence this warning, or model={previous!r} for the old one.",
            UserWarning, stacklevel=5,  # _warn <- resolve_model <- _build <- mace_mp <- caller
        )
