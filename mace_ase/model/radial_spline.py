r"""Tabulated radial functions: the radial MLP at the cost of a table lookup (the default on the CPU).

Each interaction's radial weights are a fixed function of the edge length (and, for Agnesi-transformed models, of
the unordered element pair, through the pair's mean covalent radius r0):

    W_t(r) = MLP_t(R(r)) [* envelope(r)]        ``[P * C]`` values per edge (R: Bessel basis x cutoff, Eq. 8 of
                                                 the MACE paper)

and, for "density" interactions (MPA-0), each edge's term of the learned neighbour density,
``tanh((R(r) . w_t)^2) [* envelope(r)]``, in one more table (:meth:`RadialSpline.densities`), so that a call with
tables needs no radial basis at all. Evaluated per (distinct) edge, the MLP is most of the cost of a call.

Here ``W_t`` (and the densities) are tabulated once over ``[0, r_max]`` from their exact values, slopes and
curvatures at the knots (float64; the basis's closed-form slopes, then the chain rule through each linear map and
SiLU of the MLP: :meth:`RadialSpline._jets`) as the piecewise quintic Hermite interpolant (:data:`DEGREE`; a cubic
one, from values and slopes, is also implemented), evaluated per edge as a polynomial in the position
``u = (r - r_k) / w_k`` inside its interval by Horner's rule (:func:`_hermite`, :func:`polynomial`).
Its error falls as w^6 (values) and w^5 (slopes). Forces and stresses are the exact derivatives of this
interpolated energy, so they stay conservative.

Modes (:data:`RADIAL_MODES`, :func:`set_radial`): ``"auto"`` (the default of every entry point) uses the tables on
the CPU with the compiled kernel, which is where they are faster, and the MLP elsewhere (:func:`effective_radial`),
inside :func:`radial_mlp` (Hessians) and for element pairs whose tables would pass :data:`AUTO_TABLE_BYTES`;
``"spline"`` always uses the tables; ``"exact"`` never. The tables are inside the exact mode's float64 parity bar
with mace-torch (below), which is why they may be the default: ``tests/test_parity.py`` asserts every fixture in
both ``"auto"`` and ``"exact"``.

Intervals start uniform (:data:`FIRST_INTERVALS`) and every interval that misses the tolerance is halved, up to
:data:`MAX_REFINEMENTS` times: at u = 1/4, 1/2, 3/4 of each interval and over all outputs of all interactions, the
error of the values must be at most ``tolerance`` times the largest ``|W|`` and the error of the slopes at most
``tolerance`` times the largest ``|dW/dr|`` (:data:`DEFAULT_TOLERANCE`: 3e-11 in float64, 1e-9 in float32; not
enforced below :data:`SHORT_RANGE`). Short intervals therefore sit where the functions vary fast (short range); one
``searchsorted`` per edge finds its interval. The reached error is kept in :attr:`RadialSpline.errors`. Each
round evaluates the exact functions only at the new knots and the new intervals' probes.

Measured end to end (every float64 parity case of the fixtures against mace-torch, ``tests/test_parity.py``):
at the float64 default 3e-11, at most 1.1e-11 eV/atom, 1.2e-9 eV/Å and 2.4e-10 eV/Å³, inside the exact mode's own
float64 parity bar (1e-9 eV/atom, 1e-8 eV/Å, 1e-9 eV/Å³), which the test asserts; at 1e-9 (the float32 default) it
would be 9e-10 eV/atom, 7e-8 eV/Å and 2e-8 eV/Å³. In float32 the table is itself rounded to float32 (~6e-8), so
a tighter tolerance only makes the table larger (10 % slower at 1e-10) and a coarser one is no faster (measured,
``benchmarks/RESULTS.md``). Hessians from the tables (``"spline"``) agree with the exact mode to ~1e-4 relative
(second derivatives of the interpolant are less accurate); ``"auto"`` computes them from the MLP.

The compiled CPU kernel evaluates the polynomial on the fly per edge (``kernels/convolution.cpp``): no
``[E, P, C]`` array exists. Elsewhere (CUDA, no compiler) the same table is evaluated with torch ops. Tables are
built lazily, per element pair actually met (Agnesi models) or once (all others), in 0.05-0.6 s each:
``intervals x 6 x P x C`` numbers per interaction and pair, e.g. for both layers of MP-0 medium 686 intervals and
56 MB in float64, 341 intervals and 14 MB in float32; per element pair of MPA-0 medium (Si-Si) 472 intervals and
39 MB in float64, 234 intervals and 9.6 MB in float32.
TorchScript export and LAMMPS's ``pair_style mace`` file always use the exact MLP.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# Interpolation error / max |W| and / max |dW/dr|, by model dtype; what it gives end to end: module doc.
DEFAULT_TOLERANCE = {torch.float64: 3e-11, torch.float32: 1e-9}

FIRST_INTERVALS = 32  # uniform start, then intervals that miss the tolerance are halved
MAX_REFINEMENTS = 12  # smallest interval r_max / (32 * 2^12), ~0.05 mÅ: far below any need
RADIAL_MODES = ("auto", "exact", "spline")
# "auto" keeps its tables (all element pairs met, all interactions) within this; beyond, calls use the MLP
AUTO_TABLE_BYTES = 1 << 30
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
        # "Density" interactions divide their messages by 1 + sum_j tanh((R(r_ij) . w)^2) [* envelope]: a function of
        # r (and the pair) as well, tabulated alongside (one column per such interaction), so that no call needs the
        # Bessel features R at all
        self.density_layers = [i for i, t in enumerate(model.interactions) if t.use_density]
        self._density_weights = [model.interactions[i].density_weight.detach().to("cpu", torch.float64).clone()
                                 for i in self.density_layers]
        self.slots: Dict[Tuple[int, int], int] = {}  # (Z_a <= Z_b), or (0, 0) when W does not depend on elements
        self.intervals: List[int] = []  # per slot
        self.errors: List[float] = []  # per slot: reached max interpolation error (relative)
        self.degree = DEGREE
        self.auto = False  # radial="auto": Hessians (radial_mlp) and pairs beyond AUTO_TABLE_BYTES use the MLP
        self._over_budget_logged = False
        self._lock = threading.Lock()  # adding a slot (see coordinates)
        self.tables: List[Tensor] = [torch.empty(0, self.degree + 1, m.weights[-1].shape[1], dtype=self.dtype,
                                                 device=self.device)
                                     for m in self._mlps]  # per interaction: [rows of all slots, degree + 1, P*C]
        # [rows, degree + 1, len(density_layers)]: each density interaction's edge density (see densities)
        self.density_table = torch.empty(0, self.degree + 1, len(self.density_layers), dtype=self.dtype,
                                         device=self.device)
        # Lookup: slot s's knots shifted by s * (r_max + 1) Å, concatenated: one sorted array for all slots.
        self._keys = torch.zeros(0, dtype=torch.float64, device=self.device)
        self._start = torch.zeros(0, dtype=torch.float64, device=self.device)  # per row: first r of the interval
        self._inv_width = torch.zeros(0, dtype=self.dtype, device=self.device)  # per row: 1 / its width
        self._first = torch.zeros(0, dtype=torch.int64, device=self.device)  # per slot: its first row
        self._last = torch.zeros(0, dtype=torch.int64, device=self.device)  # per slot: its last row
        self._slot_of_pair = torch.full((119, 119), -1, dtype=torch.int64, device=self.device)

    def __getstate__(self) -> Dict[str, Any]:  # copies and pickles (a calculator's deepcopy): without the lock
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- building ------------------------------------------------------------------------------------------------

    def _jets(self, r: Tensor, z_a: int, z_b: int, order: int) -> List[Tensor]:
        """Per interaction, ``[n, order + 1, P*C]``: W_t(r) and its first ``order`` (1 or 2) derivatives in r,
        float64, at the lengths ``r`` ``[n]`` (Å) of one element pair; then, if the model has density
        interactions, one more ``[n, order + 1, len(density_layers)]``: their edge densities (:meth:`densities`).

        The basis and envelope with their closed-form slopes (``RadialEmbedding.r_derivatives``), their curvatures
        by reverse-mode autograd of those slopes, then the chain rule through the MLP layer by layer (each linear
        map acts on value, slope and curvature alike; SiLU by its own derivatives). No forward-mode autodiff: its
        state is process-wide, and tables are built lazily, possibly in two threads at once.
        """
        n = r.shape[0]
        z_s = torch.full((n,), z_a, dtype=torch.int64)
        z_r = torch.full((n,), z_b, dtype=torch.int64)
        with torch.enable_grad():
            x = r.detach().unsqueeze(-1).requires_grad_(order == 2)
            feats, envelope = self._radial(x, z_s, z_r)
            slopes = torch.cat(self._radial.r_derivatives(x, z_s, z_r), dim=1)  # [n, n_basis + 1]
            basis = [torch.cat([feats, envelope], dim=1), slopes]
            if order == 2:  # column k of the slopes depends on row i's r only: one backward pass per column
                basis.append(torch.cat([torch.autograd.grad(slopes[:, k].sum(), x, retain_graph=True)[0]
                                        for k in range(slopes.shape[1])], dim=1))
        basis = [b.detach() for b in basis]
        envelope_jet = [b[:, -1:] for b in basis]
        out = []
        for mlp, outside in zip(self._mlps, self._envelope_outside):
            jet = [b[:, :-1] for b in basis]
            for index, weight in enumerate(mlp.weights):
                jet = list((torch.cat(jet) @ weight).split(n))  # linear: the same map on every derivative
                if index < mlp.num_layers - 1:
                    jet = _silu_jet(jet, mlp.activation_scale)
            if outside:  # W = MLP * envelope: Leibniz's rule
                jet = _product_jet(jet, envelope_jet)
            out.append(torch.stack(jet, dim=1))
        if self.density_layers:
            columns = []
            for layer, weight in zip(self.density_layers, self._density_weights):
                jet = _tanh_of_square_jet([b[:, :-1] @ weight for b in basis])  # s = R . w, linear in R
                if self._envelope_outside[layer]:
                    jet = _product_jet(jet, envelope_jet)
                columns.append(torch.stack(jet, dim=1))  # [n, order + 1, 1]
            out.append(torch.cat(columns, dim=2))
        return out

    def _fit(self, z_a: int, z_b: int) -> Tuple[Tensor, List[Tensor], float]:
        """Knots ``[n+1]`` (Å), per-interaction coefficient tables ``[n, degree + 1, P*C]`` and the reached error.

        Refinement is incremental: each round evaluates the exact functions only at the new knots (midpoints of
        the intervals that missed the tolerance) and at the probes of the new intervals.
        """
        order = 2 if self.degree == 5 else 1
        knots = torch.linspace(0.0, self.r_max, FIRST_INTERVALS + 1, dtype=torch.float64)
        # The Bessel features sin(w r)/r are even in r with a finite limit at 0: evaluate knot 0 just off zero.
        at = knots.clone()
        at[0] = 1e-6 * float(knots[1])
        jets = self._jets(at, z_a, z_b, order)  # per layer [n+1, order+1, P*C]
        layers = len(jets)
        value_scale = torch.stack([j[:, 0].abs().max() for j in jets])  # per layer: largest |W| seen, and |dW/dr|
        slope_scale = torch.stack([j[:, 1].abs().max() for j in jets])
        value_error = torch.zeros(FIRST_INTERVALS, layers, dtype=torch.float64)  # per interval and layer, absolute
        slope_error = torch.zeros(FIRST_INTERVALS, layers, dtype=torch.float64)
        todo = torch.arange(FIRST_INTERVALS)
        for refinement in range(MAX_REFINEMENTS + 1):
            values, slopes, probe_values, probe_slopes = self._probe_errors(knots, jets, todo, z_a, z_b)
            value_error[todo], slope_error[todo] = values, slopes
            value_scale = torch.maximum(value_scale, probe_values)
            slope_scale = torch.maximum(slope_scale, probe_slopes)
            error = torch.maximum(value_error / value_scale.clamp_min(1e-300),
                                  slope_error / slope_scale.clamp_min(1e-300)).amax(1)
            error = torch.where(knots[1:] > SHORT_RANGE, error, 0.0)
            bad = error > self.tolerance
            if not bool(bad.any()) or refinement == MAX_REFINEMENTS:
                width = (knots[1:] - knots[:-1]).unsqueeze(-1)
                tables = [_hermite(width, jet[:-1], jet[1:]) for jet in jets]
                return knots, tables, float(error.max())
            middles = 0.5 * (knots[:-1] + knots[1:])[bad]
            new = [torch.cat([old, added]) for old, added in zip(jets, self._jets(middles, z_a, z_b, order))]
            knots, position = torch.sort(torch.cat([knots, middles]))
            jets = [jet[position] for jet in new]
            is_middle = position > bad.shape[0]  # sorted knots that were just added (old knots: 0..n)
            child = is_middle[:-1] | is_middle[1:]  # intervals next to a new knot: to be measured
            kept = ~bad
            value_error, slope_error = (_scatter_rows(e[kept], ~child) for e in (value_error, slope_error))
            todo = child.nonzero().view(-1)
        raise AssertionError("unreachable")

    def _probe_errors(self, knots: Tensor, jets: List[Tensor], todo: Tensor, z_a: int, z_b: int
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """For the intervals ``todo``: the largest absolute error of the interpolated values and slopes at
        u = 1/4, 1/2, 3/4 (``[m, layers]`` each), and per layer the largest exact |W| and |dW/dr| met there."""
        width = (knots[todo + 1] - knots[todo]).unsqueeze(-1)
        tables = [_hermite(width, jet[todo], jet[todo + 1]) for jet in jets]
        exact = [self._jets(knots[todo] + u * width.view(-1), z_a, z_b, 1) for u in _PROBES]
        value_error = torch.zeros(todo.shape[0], len(jets), dtype=torch.float64)
        slope_error = torch.zeros_like(value_error)
        value_scale = torch.zeros(len(jets), dtype=torch.float64)
        slope_scale = torch.zeros_like(value_scale)
        for layer, c in enumerate(tables):
            for u, at_probe in zip(_PROBES, exact):
                values, slopes = at_probe[layer][:, 0], at_probe[layer][:, 1]
                value_error[:, layer] = torch.maximum(value_error[:, layer],
                                                      (polynomial(c, u) - values).abs().amax(1))
                slope_error[:, layer] = torch.maximum(slope_error[:, layer],
                                                      (polynomial_slope(c, u) / width - slopes).abs().amax(1))
                value_scale[layer] = torch.maximum(value_scale[layer], values.abs().max())
                slope_scale[layer] = torch.maximum(slope_scale[layer], slopes.abs().max())
        return value_error, slope_error, value_scale, slope_scale

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
        if self.density_layers:
            self.density_table = torch.cat([self.density_table, tables[-1].to(device=device, dtype=self.dtype)])
        megabytes = sum(t.numel() * t.element_size() for t in tables) * (
            torch.finfo(self.dtype).bits / 64) / 2**20
        logger.info("mace-ase: radial spline %s: %d intervals (%.4f-%.3f Å wide), max relative error %.1e, %.1f MB",
                    f"Z=({z_a}, {z_b})" if self.per_pair else "(all pairs)", n,
                    float((knots[1:] - knots[:-1]).min()), float((knots[1:] - knots[:-1]).max()), error, megabytes)

    # -- evaluating ----------------------------------------------------------------------------------------------

    def rows(self, lengths: Tensor, z_sender: Tensor, z_receiver: Tensor) -> Optional[List[Tensor]]:
        """``[u, interval]`` of :meth:`coordinates` for the fused kernel, or None where this call evaluates the
        exact MLP instead (``"auto"`` mode only: inside :func:`radial_mlp`, or when the tables of the element
        pairs met would pass :data:`AUTO_TABLE_BYTES`)."""
        if self.auto and getattr(_THREAD, "mlp", False):
            return None
        slot = self._slots(z_sender, z_receiver)
        if self.auto and not self._within_budget(z_sender, z_receiver, slot):
            return None
        return list(self.coordinates(lengths, z_sender, z_receiver, slot))

    def table_bytes(self) -> int:
        """Bytes held by the tables of all interactions."""
        return sum(t.numel() * t.element_size() for t in [*self.tables, self.density_table])

    def _slots(self, z_sender: Tensor, z_receiver: Tensor) -> Tensor:
        """Each edge's slot (table set), -1 where its element pair has none yet."""
        if not self.per_pair:
            return torch.full_like(z_sender, 0 if self.slots else -1)
        return self._slot_of_pair[torch.minimum(z_sender, z_receiver), torch.maximum(z_sender, z_receiver)]

    def _within_budget(self, z_sender: Tensor, z_receiver: Tensor, slot: Tensor) -> bool:
        if not self.per_pair or not self.slots or not bool((slot < 0).any()):  # nothing to build, or the first
            return True
        missing = self._missing_pairs(z_sender, z_receiver, slot).shape[0]
        per_slot = self.table_bytes() / len(self.slots)
        if self.table_bytes() + missing * per_slot <= AUTO_TABLE_BYTES:
            return True
        if not self._over_budget_logged:
            self._over_budget_logged = True
            logger.info("mace-ase: radial tables for %d more element pairs would pass %.1f GB (radial='auto'); "
                        "calls with them use the exact radial MLP", missing, AUTO_TABLE_BYTES / 1e9)
        return False

    def _missing_pairs(self, z_sender: Tensor, z_receiver: Tensor, slot: Tensor) -> Tensor:
        """Unordered element pairs ``[m, 2]`` (Z_low, Z_high; (0, 0) when W does not depend on elements) of the
        edges whose ``slot`` is -1."""
        if not self.per_pair:
            return torch.zeros(1 if bool((slot < 0).any()) else 0, 2, dtype=torch.int64)
        missing = slot < 0
        low, high = torch.minimum(z_sender, z_receiver)[missing], torch.maximum(z_sender, z_receiver)[missing]
        return torch.stack([low, high], 1).unique(dim=0)

    def coordinates(self, lengths: Tensor, z_sender: Tensor, z_receiver: Tensor, slot: Optional[Tensor] = None
                    ) -> Tuple[Tensor, Tensor]:
        """``(u [E, 1], interval [E])`` of every edge: position inside its interval (differentiable in ``lengths``)
        and the interval's row in :attr:`tables`. Builds the tables of element pairs not seen before. ``slot``:
        :meth:`_slots` of these edges, if the caller has it."""
        slot = self._slots(z_sender, z_receiver) if slot is None else slot
        if bool((slot < 0).any()):
            # Slots are only ever appended (rows keep their numbers), so a call in another thread may read the
            # arrays while one is added; the lock keeps two threads from adding the same one.
            with self._lock:
                for a, b in self._missing_pairs(z_sender, z_receiver, self._slots(z_sender, z_receiver)).tolist():
                    self._add_slot(int(a), int(b))
                    if self.per_pair:
                        self._slot_of_pair[a, b] = self.slots[(int(a), int(b))]
            slot = self._slots(z_sender, z_receiver)
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

    def densities(self, u: Tensor, interval: Tensor) -> Tensor:
        """``[E, len(density_layers)]``: for edges at ``(u, interval)``, each density interaction's edge density
        ``tanh((R(r) . w)^2)``, times the envelope where the interaction applies it outside the radial functions
        (as :meth:`mace_ase.model.mace.Interaction.message` computes it), differentiable in ``u``."""
        return polynomial(self.density_table.index_select(0, interval), u)


def _hermite(width: Tensor, start: Tensor, end: Tensor) -> Tensor:
    """Coefficients ``[n, degree + 1, P*C]`` in u of the Hermite interpolant on each interval (``width`` ``[n, 1]``
    Å) from the jets at its two ends (``[n, order + 1, P*C]``: value, slope per Å and, for the quintic, curvature).

    Cubic: matches f and df at both ends. Quintic: also d2f, ``p(u) = sum_k a_k u^k`` with a0 = f0, a1 = w f0',
    a2 = w^2 f0''/2 and, from ``A = f1 - a0 - a1 - a2``, ``B = w f1' - a1 - 2 a2``, ``G = w^2 f1'' - 2 a2``:
    a3 = 10 A - 4 B + G/2, a4 = -15 A + 7 B - G, a5 = 6 A - 3 B + G/2.
    """
    f0, f1, d0, d1 = start[:, 0], end[:, 0], width * start[:, 1], width * end[:, 1]
    if start.shape[1] == 2:
        return torch.stack([f0, d0, 3 * (f1 - f0) - 2 * d0 - d1, 2 * (f0 - f1) + d0 + d1], dim=1)
    half_s0 = 0.5 * width * width * start[:, 2]
    a = f1 - f0 - d0 - half_s0
    b = d1 - d0 - 2 * half_s0
    g = width * width * end[:, 2] - 2 * half_s0
    return torch.stack([f0, d0, half_s0, 10 * a - 4 * b + 0.5 * g, -15 * a + 7 * b - g, 6 * a - 3 * b + 0.5 * g],
                       dim=1)


def _silu_jet(jet: List[Tensor], scale: float) -> List[Tensor]:
    """``scale * SiLU`` of z and its first one or two derivatives, from those of z (chain rule):
    a = z s, a' = s (1 + z (1 - s)), a'' = s (1 - s) (2 + z (1 - 2 s)), s = sigmoid(z)."""
    z = jet[0]
    s = torch.sigmoid(z)
    first = s * (1.0 + z * (1.0 - s))
    out = [scale * z * s, scale * first * jet[1]]
    if len(jet) > 2:
        second = s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
        out.append(scale * (second * jet[1] * jet[1] + first * jet[2]))
    return out


def _tanh_of_square_jet(jet: List[Tensor]) -> List[Tensor]:
    """tanh(s^2) and its first one or two derivatives, from those of s (chain rule): with q = s^2, t = tanh(q),
    f' = (1 - t^2) q', f'' = (1 - t^2) (q'' - 2 t q'^2), q' = 2 s s', q'' = 2 (s'^2 + s s'')."""
    s = jet[0]
    t = torch.tanh(s * s)
    slope = 1.0 - t * t
    q1 = 2.0 * s * jet[1]
    out = [t, slope * q1]
    if len(jet) > 2:
        q2 = 2.0 * (jet[1] * jet[1] + s * jet[2])
        out.append(slope * (q2 - 2.0 * t * q1 * q1))
    return out


def _product_jet(f: List[Tensor], g: List[Tensor]) -> List[Tensor]:
    """Derivatives of f g from those of f and g (Leibniz)."""
    out = [f[0] * g[0], f[1] * g[0] + f[0] * g[1]]
    if len(f) > 2:
        out.append(f[2] * g[0] + 2.0 * f[1] * g[1] + f[0] * g[2])
    return out


def _scatter_rows(rows: Tensor, where: Tensor) -> Tensor:
    """A ``[len(where), ...]`` tensor with ``rows`` at the True entries of ``where``, zeros elsewhere."""
    out = rows.new_zeros((where.shape[0],) + tuple(rows.shape[1:]))
    out[where] = rows
    return out


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
    """Switch ``model`` (a :class:`~mace_ase.model.mace.MACE`) to tabulated radial weights (``radial="spline"``;
    :func:`set_radial` also makes ``"auto"``).

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


_THREAD = threading.local()  # radial_mlp(): per thread, like torch.no_grad


@contextlib.contextmanager
def radial_mlp() -> Iterator[None]:
    """Inside this block, in this thread, models in the ``"auto"`` mode evaluate the exact radial MLP: for
    Hessians, where the interpolant's second derivatives (~1e-4 relative) are not good enough. Explicit
    ``"spline"`` models keep their tables."""
    previous = getattr(_THREAD, "mlp", False)
    _THREAD.mlp = True
    try:
        yield
    finally:
        _THREAD.mlp = previous


def effective_radial(model: Any, radial: str) -> str:
    """What ``radial`` means for ``model`` on its device: ``"auto"`` stays ``"auto"`` (tables) on the CPU with
    the compiled kernel and is ``"exact"`` elsewhere (CUDA, no compiler: there the tables would be evaluated
    with torch ops per edge, no faster than the MLP's GEMMs)."""
    radial = check_radial(radial)
    if radial != "auto":
        return radial
    kernel = model.r_max.device.type == "cpu" and all(getattr(t, "fused_kernel", False)
                                                      for t in model.interactions)
    return "auto" if kernel else "exact"


def current_radial(model: Any) -> str:
    """The mode ``model`` is in: ``"exact"``, ``"spline"`` or ``"auto"``."""
    if not model.use_radial_spline:
        return "exact"
    return "auto" if model.radial_spline.auto else "spline"


def set_radial(model: Any, radial: str) -> None:
    """Put ``model`` in the ``radial`` mode (:data:`RADIAL_MODES`, see :func:`effective_radial`), in place;
    nothing if it is in it."""
    radial = effective_radial(model, radial)
    if radial == current_radial(model):
        return
    if radial == "exact":
        disable_spline(model)
        return
    spline = model.radial_spline if model.use_radial_spline else enable_spline(model)
    spline.auto = radial == "auto"


def check_radial(radial: str) -> str:
    """``radial=`` as given, or a clear error."""
    if radial not in RADIAL_MODES:
        raise ValueError(f"radial must be one of {', '.join(map(repr, RADIAL_MODES))}, got {radial!r} ('auto': "
                         "tabulated where that is within the exact bar and faster, else the MLP; 'exact': the "
                         "radial MLP as in the file for every edge; 'spline': always tabulated)")
    return radial
