"""The Hessian (matrix of second derivatives of the energy) by automatic differentiation.

    H_ab = d²E / dr_a dr_b = -dF_a / dr_b,     a, b over the 3N Cartesian coordinates,

in eV/Å², shape ``(3N, 3N)``, rows and columns ordered atom-major
(``x_0, y_0, z_0, x_1, ...``). For a MACE model the forces are themselves an autograd
result, so each row of H is one more backward pass through the force graph
(``MACECalculator.get_hessian``): exact (no finite-difference step) and, for small systems,
faster than 6N force calls.

Vibrational frequencies follow from the mass-weighted Hessian ``H_ab / sqrt(m_a m_b)``
(see ``ase.vibrations.VibrationsData.from_2d(atoms, hessian)``).

:func:`finite_difference_hessian` is the central-difference version for any ASE
calculator; it is how the autograd one is tested.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import BaseCalculator


def hessian(calc: Any, atoms: Atoms) -> np.ndarray:
    """Hessian of the energy of ``atoms``, eV/Å², shape ``(3N, 3N)``, symmetrised.

    Uses the calculator's analytic ``get_hessian(atoms)``: :class:`MACECalculator` differentiates
    its forces by autograd (one backward pass per row; use ``default_dtype="float64"``), and
    ``dftd3``'s D3 calculator has one too. The result is symmetrised (``(H + H.T) / 2``); the
    asymmetry before that is round-off only. For any other calculator use
    :func:`finite_difference_hessian`.
    """
    if not callable(getattr(calc, "get_hessian", None)):
        raise TypeError(
            f"{type(calc).__name__} has no analytic Hessian (get_hessian). "
            "Use mace_ase.hessian.finite_difference_hessian(atoms, calc) instead (6N force calls)."
        )
    matrix = np.asarray(calc.get_hessian(atoms), dtype=np.float64)
    n = 3 * len(atoms)
    if matrix.shape != (n, n):  # e.g. (N, 3, N, 3) from some calculators
        matrix = matrix.reshape(n, n)
    return 0.5 * (matrix + matrix.T)


def finite_difference_hessian(atoms: Atoms, calc: BaseCalculator | None = None, delta: float = 1e-3) -> np.ndarray:
    """Central-difference Hessian ``-(F(r + d e_b) - F(r - d e_b)) / 2d``, eV/Å², ``(3N, 3N)``.

    Works with any ASE calculator (6N force calls); ``delta`` in Å. ``atoms`` is not changed.
    """
    probe = atoms.copy()
    probe.calc = calc if calc is not None else atoms.calc
    if probe.calc is None:
        raise ValueError("No calculator: pass calc=... or set atoms.calc first.")
    n = 3 * len(atoms)
    matrix = np.zeros((n, n))
    positions = atoms.get_positions()
    for b in range(n):
        atom, axis = divmod(b, 3)
        columns = []
        for sign in (+1, -1):
            displaced = positions.copy()
            displaced[atom, axis] += sign * delta
            probe.set_positions(displaced)
            columns.append(probe.get_forces().reshape(-1))
        matrix[:, b] = -(columns[0] - columns[1]) / (2 * delta)
    return 0.5 * (matrix + matrix.T)
