"""Names and defaults every layer shares: the dtypes a model can run in and the default device.

The bottom of the stack: it imports nothing from mace_ase, and torch only inside the functions that need it, so the
catalogue (``mace_ase.io``) and ``mace-ase models list`` stay free of torch. Each choice is written here once; the
catalogue parser, ``load_model``, ``MACECalculator`` and ``mace_mp()`` and friends all ask this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPE_NAMES", "resolve_dtype", "default_device", "resolve_device"]

DTYPE_NAMES = ("float64", "float32")  # what `default_dtype=` and the catalogue's dtype column accept


def resolve_dtype(dtype: str | torch.dtype, argument: str = "dtype") -> torch.dtype:
    """``"float64"``/``"float32"`` (or that torch dtype) -> the torch dtype; ``argument`` names it in the error."""
    import torch

    dtypes = {name: getattr(torch, name) for name in DTYPE_NAMES}
    if isinstance(dtype, torch.dtype) and dtype in dtypes.values():
        return dtype
    if isinstance(dtype, str) and dtype in dtypes:
        return dtypes[dtype]
    raise ValueError(f"{argument} must be one of {', '.join(map(repr, DTYPE_NAMES))}, got {dtype!r}")


def default_device() -> str:
    """The device used when none is given: ``"cuda"`` when this torch sees a GPU, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | torch.device | None) -> str | torch.device:
    """``device`` as given, or :func:`default_device` for None."""
    return default_device() if device is None else device
