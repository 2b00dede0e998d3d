r"""Opt-in splined radial functions (``radial="spline"``): the radial MLP at the cost of a table lookup.

Each interaction's radial weights are a fixed function of the edge length (and, for Agnesi-transformed models, of
the unordered element pair, through the pair's mean covalent radius r0):

    W_t(r) = MLP_t(R(r)) [* envelope(r)]        ``[P * C]`` values per edge (R: Bessel basis x cutoff, Eq. 8 of
                                                 the MACE paper)

In the exact mode (the default) the MLP runs for every edge and is most of the cost of a call. Here ``W_t`` is
tabulated once on a uniform grid of ``n`` intervals over ``[0, r_max]``, from its exact values ``f_k`` and exact
derivatives ``f'_k`` at the knots (forward-mode autodiff through the reference code, in float64), and evaluated as
the cubic Hermite interpolant

    W(r) = c0 + u (c1 + u (c2 + u c3)),   u = r / h - k in [0, 1),
    c0 = f_k, c1 = h f'_k, c2 = 3 (f_{k+1} - f_k) - 2 h f'_k - h f'_{k+1}, c3 = 2 (f_k - f_{k+1}) + h f'_k + h f'_{k+1}

whose error falls as h^4. Forces and stresses are the exact derivatives of this interpolated energy
(``dW/dr = (c1 + u (2 c2 + 3 u c3)) / h``), so they stay conservative. The grid is refined (doubling ``n`` from
:data:`FIRST_INTERVALS`) until the largest interpolation error at u = 1/4, 1/2, 3/4 of every interval, over all
outputs of all interactions, is at most ``tolerance`` times the largest ``|W|`` (:data:`DEFAULT_TOLERANCE`); the
reached error is kept in :attr:`RadialSpline.errors`. Measured end-to-end errors against the exact mode are in
``docs/ARCHITECTURE.md`` and ``tests/test_radial_spline.py`` (bounds 1e-6 eV/atom, 1e-5 eV/Å).

The compiled CPU kernel evaluates the polynomial on the fly per edge (``kernels/convolution.cpp``): no
``[E, P, C]`` array exists. Elsewhere (CUDA, no compiler) the same table is evaluated with torch ops. Tables are
built lazily, per element pair actually met (Agnesi models) or once (all others): ``n x 4 x P x C`` numbers per
interaction and pair, e.g. about 10 MB in float32 for the second layer of MP-0 medium at 512 intervals.
TorchScript export and LAMMPS's ``pair_style mace`` file always use the exact MLP.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-7  # interpolation error / max |W|; see the module docstring for what it gives end to end
FIRST_INTERVALS = 64
MAX_INTERVALS = 8192
RADIAL_MODES = ("exact", "spline")


class RadialSpline:
    """Cubic-Hermite tables of every interaction's radial weights, for the element pairs seen so far.

    ``coordinates()`` maps edges to (u, interval row) once per call; ``weights()`` evaluates one interaction's
    table with torch ops; the CPU kernel reads ``tables[t]`` directly.
    """

    def __init__(self, model: Any, tolerance: float = DEFAULT_TOLERANCE) -> None:
        if not tolerance > 0:
            raise ValueError(f"spline tolerance must be > 0, not {tolerance!r}")
        self.tolerance = float(tolerance)
        self.r_max = float(model.r_max_value)
        self.dtype = model.r_max.dtype
        self.device = model.r_max.device
        self.per_pair = bool(model.radial.use_agnesi)  # Agnesi: W depends on the pair's covalent radii
        # float64 copies of the reference radial code on the CPU: knots are computed once, accurately
        self._radial = copy.deepcopy(model.radial).to(device="cpu", dtype=torch.float64)
        self._mlps = [copy.deepcopy(t.radial_mlp).to(device="cpu", dtype=torch.float64) for t in model.interactions]
        self._envelope_outside = [not t.apply_cutoff for t in model.interactions]
        self.slots: Dict[Tuple[int, int], int] = {}  # (Z_a <= Z_b), or (0, 0) when W does not depend on elements
        self.intervals: List[int] = []  # per slot
        self.errors: List[float] = []  # per slot: reached max interpolation error / max |W|
        self.tables: List[Tensor] = [torch.empty(0, 4, m.weights[-1].shape[1], dtype=self.dtype, device=self.device)
                                     for m in self._mlps]  # per interaction: [rows of all slots, 4, P*C]
        self._offset = torch.zeros(0, dtype=torch.int64, device=self.device)  # first row of each slot
        self._inv_h = torch.zeros(0, dtype=self.dtype, device=self.device)
        self._last = torch.zeros(0, dtype=torch.int64, device=self.device)  # last interval of each slot
        self._slot_of_pair = torch.full((119, 119), -1, dtype=torch.int64, device=self.device)

    # -- building ------------------------------------------------------------------------------------------------

    def _exact(self, r: Tensor, z_a: int, z_b: int) -> List[Tensor]:
        """W_t(r) of every interaction, float64, ``[n, P*C]`` each (the reference code)."""
        z_s = torch.full((r.shape[0],), z_a, dtype=torch.int64)
        z_r = torch.full((r.shape[0],), z_b, dtype=torch.int64)
        feats, envelope = self._radial(r.unsqueeze(-1), z_s, z_r)
        out = []
        for mlp, outside in zip(self._mlps, self._envelope_outside):
            w = mlp(feats)
            out.append(w * envelope if outside else w)
        return out

    def _coefficients(self, n: int, z_a: int, z_b: int) -> List[Tensor]:
        h = self.r_max / n
        knots = torch.arange(n + 1, dtype=torch.float64) * h
        # The Bessel features sin(w r)/r are even in r with a finite limit at 0: take knot 0 just off zero.
        knots[0] = 1e-6 * h
        values, slopes = torch.func.jvp(lambda r: tuple(self._exact(r, z_a, z_b)), (knots,),
                                        (torch.ones_like(knots),))
        tables = []
        for f, df in zip(values, slopes):
            f0, f1, d0, d1 = f[:-1], f[1:], h * df[:-1], h * df[1:]
            tables.append(torch.stack([f0, d0, 3 * (f1 - f0) - 2 * d0 - d1, 2 * (f0 - f1) + d0 + d1], dim=1))
        return tables

    def _error(self, tables: List[Tensor], n: int, z_a: int, z_b: int) -> float:
        h = self.r_max / n
        worst = 0.0
        for u in (0.25, 0.5, 0.75):
            r = (torch.arange(n, dtype=torch.float64) + u) * h
            for table, exact in zip(tables, self._exact(r, z_a, z_b)):
                interpolated = table[:, 0] + u * (table[:, 1] + u * (table[:, 2] + u * table[:, 3]))
                scale = float(exact.abs().max().clamp_min(1e-300))
                worst = max(worst, float((interpolated - exact).abs().max()) / scale)
        return worst

    def _add_slot(self, z_a: int, z_b: int) -> None:
        n = FIRST_INTERVALS
        with torch.no_grad():
            while True:
                tables = self._coefficients(n, z_a, z_b)
                error = self._error(tables, n, z_a, z_b)
                if error <= self.tolerance or n >= MAX_INTERVALS:
                    break
                n *= 2
        if error > self.tolerance:
            logger.warning("mace-ase: radial spline for Z=(%d, %d) reached only %.1e relative error with %d "
                           "intervals (asked %.1e)", z_a, z_b, error, n, self.tolerance)
        slot = len(self.intervals)
        self.slots[(z_a, z_b)] = slot
        self.intervals.append(n)
        self.errors.append(error)
        rows = int(self._offset[-1] + self.intervals[-2]) if slot else 0
        self._offset = torch.cat([self._offset, torch.tensor([rows], device=self.device)])
        self._inv_h = torch.cat([self._inv_h, torch.tensor([n / self.r_max], dtype=self.dtype, device=self.device)])
        self._last = torch.cat([self._last, torch.tensor([n - 1], device=self.device)])
        self.tables = [torch.cat([old, new.to(device=self.device, dtype=self.dtype)]).contiguous()
                       for old, new in zip(self.tables, tables)]
        megabytes = sum(t.numel() * t.element_size() for t in tables) / 2**20
        logger.info("mace-ase: radial spline %s: %d intervals, max relative error %.1e, %.1f MB",
                    f"Z=({z_a}, {z_b})" if self.per_pair else "(all pairs)", n, error, megabytes)

    # -- evaluating ----------------------------------------------------------------------------------------------

    def coordinates(self, lengths: Tensor, z_sender: Tensor, z_receiver: Tensor) -> Tuple[Tensor, Tensor]:
        """``(u [E, 1], interval [E])`` of every edge: position inside its interval (differentiable in ``lengths``)
        and the interval's row in :attr:`tables`. Builds the tables of element pairs not seen before."""
        if self.per_pair:
            low, high = torch.minimum(z_sender, z_receiver), torch.maximum(z_sender, z_receiver)
            slot = self._slot_of_pair[low, high]
            if bool((slot < 0).any()):
                for a, b in torch.stack([low, high], 1)[slot < 0].unique(dim=0).tolist():
                    self._add_slot(int(a), int(b))
                    self._slot_of_pair[a, b] = self.slots[(int(a), int(b))]
                slot = self._slot_of_pair[low, high]
        else:
            if not self.slots:
                self._add_slot(0, 0)
            slot = torch.zeros_like(z_sender)
        t = lengths.view(-1) * self._inv_h[slot]
        # padding and r >= r_max edges are inactive (zero envelope): any interval will do for them
        index = torch.minimum(t.detach().floor().to(torch.int64).clamp_min(0), self._last[slot])
        u = (t - index.to(t.dtype)).unsqueeze(-1)
        return u, self._offset[slot] + index

    def weights(self, layer: int, u: Tensor, interval: Tensor) -> Tensor:
        """W of interaction ``layer`` for edges at ``(u, interval)`` with torch ops: ``[E, P*C]``, differentiable
        in ``u`` (the kernel-free path; inactive edges must be masked by the caller)."""
        c = self.tables[layer].index_select(0, interval)  # [E, 4, P*C]
        return c[:, 0] + u * (c[:, 1] + u * (c[:, 2] + u * c[:, 3]))


def enable_spline(model: Any, tolerance: float = DEFAULT_TOLERANCE) -> RadialSpline:
    """Switch ``model`` (a :class:`~mace_ase.model.mace.MACE`) to splined radial weights (approximate, opt-in).

    Needs the fused convolution (:mod:`mace_ase.model.fused`), which this switches on. Returns the spline object
    (also ``model.radial_spline``); ``disable_spline(model)`` goes back to the exact MLP.
    """
    from mace_ase.model import fused

    if not any(getattr(t, "fused", False) for t in model.interactions):
        fused.enable_fused(model)
    if not any(getattr(t, "fused", False) for t in model.interactions):  # the self-check failed: reference path
        fused._set(model, True, False)
    spline = RadialSpline(model, tolerance)
    model.radial_spline = spline
    model.use_radial_spline = True
    for index, interaction in enumerate(model.interactions):
        interaction.spline = (spline, index)
    return spline


def disable_spline(model: Any) -> None:
    """Back to the exact radial MLP."""
    model.use_radial_spline = False
    model.radial_spline = None
    for interaction in model.interactions:
        interaction.spline = None


def check_radial(radial: str) -> str:
    """``radial=`` as given, or a clear error."""
    if radial not in RADIAL_MODES:
        raise ValueError(f"radial must be one of {', '.join(map(repr, RADIAL_MODES))}, got {radial!r} ('exact': "
                         "the radial MLP as in the file; 'spline': tabulated, faster, approximate)")
    return radial
