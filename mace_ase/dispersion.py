"""DFT-D3 dispersion on top of any ASE calculator (the optional extra ``d3``).

MACE-MP models are trained on PBE(+U) data, which lacks long-range van der Waals
attraction; Grimme's D3 adds it:

    E_disp = -sum_{i<j} sum_{n=6,8} s_n C_n^ij / (r_ij^n + f(R0_ij)^n),
    f(R0) = a1 R0 + a2        (Becke-Johnson, "bj", damping)

with C6 interpolated from the coordination numbers (Grimme et al., J. Chem. Phys. 132,
154104 (2010); J. Comput. Chem. 32, 1456 (2011)). Only the two-body terms are included, as
for MACE-MP's own D3 add-on.

Backend: the ``dftd3`` package (simple-dftd3's Python API, compiled, with an ASE calculator
giving energy, forces and stress). ``docs/simulations.md`` records why it was chosen over
torch-dftd and tad-dftd3 (speed, periodic systems, maintenance).
"""

from __future__ import annotations

import logging
from typing import Any

from ase.calculators.calculator import BaseCalculator
from ase.calculators.mixing import SumCalculator
from ase.units import Bohr

log = logging.getLogger(__name__)

DEFAULT_CUTOFF = 40.0 * Bohr  # Å (21.2 Å), the two-body cutoff MACE-MP's D3 uses
DAMPINGS = {"bj": "d3bj", "zero": "d3zero", "bjm": "d3bjm", "zerom": "d3zerom", "op": "d3op"}


def d3_calculator(
    xc: str = "pbe", damping: str = "bj", cutoff: float = DEFAULT_CUTOFF, **kwargs: Any
) -> BaseCalculator:
    """The D3 calculator alone.

    Args:
        xc: functional whose D3 parameters to use (``pbe``, ``pbesol``, ``r2scan``, ...).
        damping: ``bj`` (rational, Becke-Johnson), ``zero``, ``bjm``, ``zerom`` or ``op``.
        cutoff: two-body real-space cutoff, Å (the coordination-number cutoff keeps the
            library default of 40 bohr).
        **kwargs: passed to ``dftd3.ase.DFTD3`` (e.g. ``params_tweaks={...}``).
    """
    try:
        from dftd3.ase import DFTD3
    except ImportError as error:
        raise ImportError("D3 dispersion needs the dftd3 package: pip install 'mace-ase[d3]'") from error
    if damping not in DAMPINGS:
        raise ValueError(f"Unknown D3 damping {damping!r}; available: {', '.join(DAMPINGS)}")
    if cutoff <= 0:
        raise ValueError(f"cutoff must be positive (Å), got {cutoff}")
    unknown = sorted(set(kwargs) - (set(DFTD3.default_parameters) - {"method", "damping"}))
    if unknown:  # ASE calculators store unknown keywords silently; refuse them here instead
        raise TypeError(f"Unknown D3 option(s) {', '.join(unknown)}; use xc=, damping=, cutoff= or one of "
                        f"{', '.join(sorted(set(DFTD3.default_parameters) - {'method', 'damping'}))}")
    realspace_cutoff = {"disp2": float(cutoff), **kwargs.pop("realspace_cutoff", {})}
    return DFTD3(method=xc, damping=DAMPINGS[damping], realspace_cutoff=realspace_cutoff, **kwargs)


def add_d3(
    calc: BaseCalculator, xc: str = "pbe", damping: str = "bj", cutoff: float = DEFAULT_CUTOFF, **kwargs: Any
) -> SumCalculator:
    """Return ``SumCalculator([calc, D3])``: energies, forces and stress are summed.

    Arguments as for :func:`d3_calculator`. ``energies`` (per atom) are not available from
    the sum, since D3 does not provide them.

        >>> atoms.calc = add_d3(mace_mp())          # doctest: +SKIP
    """
    d3 = d3_calculator(xc=xc, damping=damping, cutoff=cutoff, **kwargs)
    log.info("Adding DFT-D3(%s) for %s, two-body cutoff %.1f Å", damping, xc, cutoff)
    return SumCalculator([calc, d3])
