r"""Opt-in splined radial functions (``radial="spline"``): the radial MLP at the cost of a table lookup.

Each interaction's radial weights are a fixed function of the edge length (and, for Agnesi-transformed models, of
the unordered element pair, through the pair's mean covalent radius r0):

    W_t(r) = MLP_t(R(r)) [* envelope(r)]        ``[P * C]`` values per edge (R: Bessel basis x cutoff, Eq. 8 of
                                                 the MACE paper)

In the exact mode (the default) the MLP runs for every edge and is most of the cost of a call. Here ``W_t`` is
tabulated once over ``[0, r_max]`` from its exact values, slopes and curvatures at the knots (nested forward-mode
autodiff through the reference code, in float64) as the piecewise quintic Hermite interpolant (:data:`DEGREE`; a
cubic one, from values and slopes, is also implemented), evaluated per edge as a polynomial in the position
``u = (r - r_k) / w_k`` inside its interval by Horner's rule (:func:`hermite_coefficients`, :func:`polynomial`).
Its error falls as w^6 (values) and w^5 (slopes). Forces and stresses are the exact derivatives of this
interpolated energy, so they stay conservative.

Intervals start uniform (:data:`FIRST_INTERVALS`) and every interval that misses the tolerance is halved, up to
:data:`MAX_REFINEMENTS` times: at u = 1/4, 1/2, 3/4 of each interval and over all outputs of all interactions, the
error of the values must be at most ``tolerance`` times the largest ``|W|`` and the error of the slopes at most
``tolerance`` times the largest ``|dW/dr|`` (:data:`DEFAULT_TOLERANCE`: 3e-11 in float64, 1e-9 in float32; not
enforced below :data:`SHORT_RANGE`). Short intervals therefore sit where the functions vary fast (short range); one
``searchsorted`` per edge finds its interval. The reached error is kept in :attr:`RadialSpline.errors`.

Measured end to end (``tests/test_radial_spline.py``, every float64 parity case of the fixtures against mace-torch):
at the float64 default 3e-11, at most 1.1e-11 eV/atom, 1.2e-9 eV/Å and 2.4e-10 eV/Å³, inside the exact mode's own
float64 parity bar (1e-9 eV/atom, 1e-8 eV/Å, 1e-9 eV/Å³), which the test asserts; at 1e-9 (the float32 default) it
would be 9e-10 eV/atom, 7e-8 eV/Å and 2e-8 eV/Å³. In float32 the table is itself rounded to float32 (~6e-8), so
a tighter tolerance only makes the table larger (10 % slower at 1e-10) and a coarser one is no faster (measured,
``benchmarks/RESULTS.md``). Hessians agree with the exact mode to ~1e-4 relative (second derivatives of the
interpolant are less accurate).

The compiled CPU kernel evaluates the polynomial on the fly per edge (``kernels/convolution.cpp``): no
``[E, P, C]`` array exists. Elsewhere (CUDA, no compiler) the same table is evaluated with torch ops. Tables are
built lazily, per element pair actually met (Agnesi models) or once (all others), in one to two seconds each:
``intervals x 6 x P x C`` numbers per interaction and pair, e.g. for both layers of MP-0 medium 686 intervals and
56 MB in float64, 341 intervals and 14 MB in float32; per element pair of MPA-0 medium (Si-Si) 472 intervals and
39 MB in float64, 234 intervals and 9.6 MB in float32.
TorchScript export and LAMMPS's ``pair_style mace`` file always use the exact MLP.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# Interpolation error / max |W| and / max |dW/dr|, by model dtype; what it gives end to end: module doc.
DEFAULT_TOLERANCE = {torch.float64: 3e-11, torch.float32: 1e-9}

FIRST_INTERVALS = 32  # uniform start, then intervals that miss the tolerance are halved
MAX_REFINEMENTS = 12  # smallest interval r_max / (32 * 2^12), ~0.05 mÅ: far below any need
RADIAL_MODES = ("exact", "spline")
DEGREE = 5  # 3: cubic Hermite (values and slopes at the knots); 5: quintic Hermite (also the curvatures)
_PROBES = (0.25, 0.5, 0.75)  # where each interval's interpolation error is measured
# Below this length (Å; the calculator's default min_distance) the tolerance is not enforced: there the slope of
# sin(w r)/r is dominated by rounding (in the exact mode too), and no physical structure has such edges.
SHORT_RANGE = 0.1


def default_tolerance(dtype: torch.dtype) -> float:
    """The spline tolerance used for a model of ``dtype`` unless one is given."""
    return DEFAULT_TOLERANCE.get(dtype, DEFAULT_TOLERANCE[torch.float32])


class RadialSpline:
    """Piecewise Hermite tables (quintic) of every interaction's radial weights, for the element pairs seen so far.

    ``coordinates()`` maps edges to (u, interval row) once per call; ``weights()`` evaluates one interaction's
    table with torch ops; the CPU kernel reads ``tables[t]`` directly. Intervals are of unequal width (halved
    where the functions vary fast, e.g. at short range); the lookup is one ``searchsorted`` per edge.
    """

    def __init__(self, model: Any, tolerance: float | None = None) -> None:
        if tolerance is None:
            tolerance = default_tolerance(model.r_max.dtype)
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
        self.errors: List[float] = []  # per slot: reached max interpolation error (relative)
        self.degree = DEGREE
        self.tables: List[Tensor] = [torch.empty(0, self.degree + 1, m.weights[-1].shape[1], dtype=self.dtype,
                                                 device=self.device)
                                     for m in self._mlps]  # per interaction: [rows of all slots, degree + 1, P*C]
        # Lookup: slot s's knots shifted by s * (r_max + 1) Å, concatenated: one sorted array for all slots.
        self._keys = torch.zeros(0, dtype=torch.float64, device=self.device)
        self._start = torch.zeros(0, dtype=torch.float64, device=self.device)  # per row: first r of the interval
        self._inv_width = torch.zeros(0, dtype=self.dtype, device=self.device)  # per row: 1 / its width
        self._first = torch.zeros(0, dtype=torch.int64, device=self.device)  # per slot: its first row
        self._last = torch.zeros(0, dtype=torch.int64, device=self.device)  # per slot: its last row
        self._slot_of_pair = torch.full((119, 119), -1, dtype=torch.int64, device=self.device)

    # -- building ------------------------------------------------------------------------------------------------

    def _exact(self, r: Tensor, z_a: int, z_b: int) -> List[Tensor]:
        """W_t(r) of every interaction, float64, ``[n, P*C]`` each (the reference code)."""
        z_s = torch.full((r.shape[0],), z_a, dtype=torch.int64)
        z_r = torch.full((r.shape[0],), z_b, dtype=torch.int64)
        feats, envelope = self._radial(r.unsqueeze(-1), z_s, z_r)
        out = []
        for mlp, outside in zip(self._mlps, self._envelope_outside):
            w = feats
            for index, weight in enumerate(mlp.weights):
                w = w @ weight
                if index < mlp.num_layers - 1:  # SiLU written out: nested forward-mode AD (quintic) needs it
                    w = w / (1.0 + torch.exp(-w)) * mlp.activation_scale
            out.append(w * envelope if outside else w)
        return out

    def _values_and_slopes(self, r: Tensor, z_a: int, z_b: int) -> Tuple[Tuple[Tensor, ...], Tuple[Tensor, ...]]:
        """W_t(r) and dW_t/dr, exact (forward-mode autodiff of the reference code)."""
        return torch.func.jvp(lambda x: tuple(self._exact(x, z_a, z_b)), (r,), (torch.ones_like(r),))

    def _derivatives(self, r: Tensor, z_a: int, z_b: int) -> List[Tuple[Tensor, ...]]:
        """[W_t(r), dW_t/dr] (cubic) or [W_t, dW_t/dr, d2W_t/dr2] (quintic), each a tuple over interactions."""
        if self.degree == 3:
            return list(self._values_and_slopes(r, z_a, z_b))
        (values, slopes), (_, curvatures) = torch.func.jvp(lambda x: self._values_and_slopes(x, z_a, z_b), (r,),
                                                           (torch.ones_like(r),))
        return [values, slopes, curvatures]

    def _fit(self, z_a: int, z_b: int) -> Tuple[Tensor, List[Tensor], float]:
        """Knots ``[n+1]`` (Å), per-interaction coefficient tables ``[n, 4, P*C]`` and the reached error."""
        knots = torch.linspace(0.0, self.r_max, FIRST_INTERVALS + 1, dtype=torch.float64)
        for refinement in range(MAX_REFINEMENTS + 1):
            # The Bessel features sin(w r)/r are even in r with a finite limit at 0: take knot 0 just off zero.
            at = knots.clone()
            at[0] = 1e-6 * float(knots[1])
            width = (knots[1:] - knots[:-1]).unsqueeze(-1)
            tables = [hermite_coefficients(width, *per_layer) for per_layer in zip(*self._derivatives(at, z_a, z_b))]
            error = torch.where(knots[1:] > SHORT_RANGE, self._interval_errors(knots, tables, z_a, z_b), 0.0)
            bad = error > self.tolerance
            if not bool(bad.any()) or refinement == MAX_REFINEMENTS:
                return knots, tables, float(error.max())
            middles = 0.5 * (knots[:-1] + knots[1:])[bad]
            knots = torch.sort(torch.cat([knots, middles])).values
        raise AssertionError("unreachable")

    def _interval_errors(self, knots: Tensor, tables: List[Tensor], z_a: int, z_b: int) -> Tensor:
        """Per interval: the largest error at u = 1/4, 1/2, 3/4 of the values (relative to max |W|) and of the
        slopes (relative to max |dW/dr|: forces come from them), over all outputs of all interactions."""
        width = knots[1:] - knots[:-1]
        probes = [knots[:-1] + u * width for u in _PROBES]
        exact = [self._values_and_slopes(r, z_a, z_b) for r in probes]
        worst = torch.zeros_like(width)
        for layer, c in enumerate(tables):
            value_scale = max(float(e[0][layer].abs().max()) for e in exact) or 1.0
            slope_scale = max(float(e[1][layer].abs().max()) for e in exact) or 1.0
            for u, (values, slopes) in zip(_PROBES, exact):
                interpolated = polynomial(c, u)
                derivative = polynomial_slope(c, u) / width.unsqueeze(-1)
                worst = torch.maximum(worst, (interpolated - values[layer]).abs().amax(1) / value_scale)
                worst = torch.maximum(worst, (derivative - slopes[layer]).abs().amax(1) / slope_scale)
        return worst

    def _add_slot(self, z_a: int, z_b: int) -> None:
        with torch.no_grad():
            knots, tables, error = self._fit(z_a, z_b)
        n = knots.shape[0] - 1
        if error > self.tolerance:
            logger.warning("mace-ase: radial spline for Z=(%d, %d) reached only %.1e relative error with %d "
                           "intervals (asked %.1e)", z_a, z_b, error, n, self.tolerance)
        slot = len(self.intervals)
        first = int(self._last[-1]) + 1 if slot else 0
        self.slots[(z_a, z_b)] = slot
        self.intervals.append(n)
        self.errors.append(error)
        device = self.device
        self._keys = torch.cat([self._keys, (knots + slot * (self.r_max + 1.0)).to(device)])
        self._start = torch.cat([self._start, knots[:-1].to(device)])
        self._inv_width = torch.cat([self._inv_width, (1.0 / (knots[1:] - knots[:-1])).to(device, self.dtype)])
        self._first = torch.cat([self._first, torch.tensor([first], device=device)])
        self._last = torch.cat([self._last, torch.tensor([first + n - 1], device=device)])
        self.tables = [torch.cat([old, new.to(device=device, dtype=self.dtype)]).contiguous()
                       for old, new in zip(self.tables, tables)]
        megabytes = sum(t.numel() * t.element_size() for t in tables) * (
            torch.finfo(self.dtype).bits / 64) / 2**20
        logger.info("mace-ase: radial spline %s: %d intervals (%.4f-%.3f Å wide), max relative error %.1e, %.1f MB",
                    f"Z=({z_a}, {z_b})" if self.per_pair else "(all pairs)", n,
                    float((knots[1:] - knots[:-1]).min()), float((knots[1:] - knots[:-1]).max()), error, megabytes)

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
        r = lengths.view(-1)
        key = r.detach().to(torch.float64) + slot.to(torch.float64) * (self.r_max + 1.0)
        # knot index -> interval row: slot s has one knot more than intervals, so subtract s; padding and
        # r >= r_max edges are inactive (zero envelope), any row of their slot will do for them
        row = torch.searchsorted(self._keys, key, right=True) - 1 - slot
        row = torch.minimum(torch.maximum(row, self._first[slot]), self._last[slot])
        u = ((r - self._start[row].to(r.dtype)) * self._inv_width[row].to(r.dtype)).unsqueeze(-1)
        return u, row

    def weights(self, layer: int, u: Tensor, interval: Tensor) -> Tensor:
        """W of interaction ``layer`` for edges at ``(u, interval)`` with torch ops: ``[E, P*C]``, differentiable
        in ``u`` (the kernel-free path; inactive edges must be masked by the caller)."""
        return polynomial(self.tables[layer].index_select(0, interval), u)  # from [E, degree + 1, P*C]


def hermite_coefficients(width: Tensor, f: Tensor, df: Tensor, d2f: Tensor | None = None) -> Tensor:
    """Coefficients ``[n, degree + 1, P*C]`` in u of the Hermite interpolant on each interval (Å wide) from the
    knot values ``f``, slopes ``df`` (per Å) and, for the quintic, curvatures ``d2f`` (``[n + 1, P*C]`` each).

    Cubic: matches f and df at both ends. Quintic: also d2f, ``p(u) = sum_k a_k u^k`` with a0 = f0, a1 = w f0',
    a2 = w^2 f0''/2 and, from ``A = f1 - a0 - a1 - a2``, ``B = w f1' - a1 - 2 a2``, ``G = w^2 f1'' - 2 a2``:
    a3 = 10 A - 4 B + G/2, a4 = -15 A + 7 B - G, a5 = 6 A - 3 B + G/2.
    """
    f0, f1, d0, d1 = f[:-1], f[1:], width * df[:-1], width * df[1:]
    if d2f is None:
        return torch.stack([f0, d0, 3 * (f1 - f0) - 2 * d0 - d1, 2 * (f0 - f1) + d0 + d1], dim=1)
    half_s0 = 0.5 * width * width * d2f[:-1]
    a = f1 - f0 - d0 - half_s0
    b = d1 - d0 - 2 * half_s0
    g = width * width * d2f[1:] - 2 * half_s0
    return torch.stack([f0, d0, half_s0, 10 * a - 4 * b + 0.5 * g, -15 * a + 7 * b - g, 6 * a - 3 * b + 0.5 * g],
                       dim=1)


def polynomial(c: Tensor, u: Tensor | float) -> Tensor:
    """``sum_k c[:, k] u^k`` by Horner's rule (``c`` ``[n, degree + 1, P*C]``)."""
    value = c[:, -1]
    for k in range(c.shape[1] - 2, -1, -1):
        value = c[:, k] + u * value
    return value


def polynomial_slope(c: Tensor, u: Tensor | float) -> Tensor:
    """``d/du sum_k c[:, k] u^k``."""
    degree = c.shape[1] - 1
    slope = degree * c[:, degree]
    for k in range(degree - 1, 0, -1):
        slope = k * c[:, k] + u * slope
    return slope


def enable_spline(model: Any, tolerance: float | None = None) -> RadialSpline:
    """Switch ``model`` (a :class:`~mace_ase.model.mace.MACE`) to splined radial weights (approximate, opt-in).

    Needs the fused convolution (:mod:`mace_ase.model.fused`), which this switches on. Returns the spline object
    (also ``model.radial_spline``); ``disable_spline(model)`` goes back to the exact MLP.
    """
    from mace_ase.model import fused

    if not any(getattr(t, "fused", False) for t in model.interactions):
        fused.enable_fused(model)
    if not any(getattr(t, "fused", False) for t in model.interactions):  # the self-check failed: reference path
        fused._set(model, True, False)
    spline = RadialSpline(model, tolerance)  # None: default_tolerance of the model's dtype
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


def set_radial(model: Any, radial: str) -> None:
    """Put ``model`` in the ``radial`` mode (``"exact"`` or ``"spline"``), in place; nothing if it is in it."""
    if (check_radial(radial) == "spline") == bool(model.use_radial_spline):
        return
    if radial == "spline":
        enable_spline(model)
    else:
        disable_spline(model)


def check_radial(radial: str) -> str:
    """``radial=`` as given, or a clear error."""
    if radial not in RADIAL_MODES:
        raise ValueError(f"radial must be one of {', '.join(map(repr, RADIAL_MODES))}, got {radial!r} ('exact': "
                         "the radial MLP as in the file; 'spline': tabulated, faster, approximate)")
    return radial
