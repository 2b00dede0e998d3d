r"""Fast path of the interaction convolution: fused, chunked, with an explicit backward pass.

The reference (:meth:`mace_ase.model.mace.Interaction.convolution`, what TorchScript export uses) evaluates, for all
edges at once, the radial weights ``W = MLP(R(r))`` ``[E, paths, C]``, the gathered sender features ``[E, D_in, C]``
and their products, and autograd keeps them all for the backward pass: about 45 kB per edge in float32. Here:

* the model calls it once per block of receivers (:meth:`~mace_ase.model.mace.MACE.node_blocks`, 1,024 nodes on
  the CPU), then runs that block's per-node steps while its convolution output is in cache: no ``[N, D_out, C]``
  tensor of the whole system is ever formed (2.8 GB and its gradient as much again, fresh memory, for 97,336 Si atoms
  and MP-0 medium in float32). The blocks share the sender features through :class:`LayerSenders` and add dL/dh_up
  into one buffer;
* within a block, receivers are processed in chunks of at most :data:`CHUNK_EDGES` edge rows
  (:data:`CHUNK_EDGES_GPU` on a GPU, which wants large launches): a fixed memory budget, so the cost per atom and the
  memory per edge do not grow with the system;
* per chunk, ``W`` comes from the radial MLP (a GEMM) and the compiled CPU kernel
  (``kernels/convolution.cpp``) sums ``G(Y) * W * x[sender]`` over each receiver's neighbours without forming any
  other per-edge, per-path, per-channel tensor;
* the backward pass is written out (:class:`_FusedConvolution`): per chunk the MLP is recomputed, the kernel gives
  dL/dW, dL/dY and per-edge dL/dx (index-added onto the senders), and autograd goes back through the chunk's MLP
  only. Nothing of size ``[E, paths, C]`` outlives a chunk.

With tabulated radial weights (:mod:`mace_ase.model.radial_spline`: the default on the CPU kernel) the radial
inputs are each edge's (u, interval) instead of (Bessel features, envelope): the kernel evaluates the interval's
polynomial on the fly (one call for the whole forward pass, no weights stored) and its backward pass returns dL/du.

The exact mode uses the same kernel path when the graph is small enough (:func:`distinct_radial_rows`,
:data:`PAIRED_TABLE_BYTES`): the radial MLP is a function of (r, element pair) only, and an edge and its reverse
have bit-identical lengths (``-v`` is exactly the negation of ``v``), so the MLP runs once per distinct
(r, pair) value, about E/2 rows for a rattled structure and far fewer for a symmetric one. Its weights W and their
derivative dW/dr (forward mode: primal and tangent rows interleaved, one GEMM per layer) form a two-coefficient
"table" row ``W + u dW/dr`` evaluated at ``u = r - r = 0``, so the kernel's spline code gives W in the forward pass
and dL/dr directly in the backward pass: one GEMM-equivalent on E/2 rows replaces the chunked path's forward,
partial recomputation and MLP backward (~2.4 GEMM-equivalents on E rows).

Without the compiled kernel (no C++ compiler, CUDA tensors, or ``MACE_ASE_KERNELS=0``) the same chunked scheme runs
on the reference torch code (recomputed per chunk in the backward pass): same memory bound, plain torch.

The maths is the reference's; only the order of floating-point sums differs (float64 results agree to ~1e-15
relative). :func:`enable_fused` checks the fast path against the reference on a small structure before using it
and falls back, with one warning, if they disagree or the kernel cannot be built. Second derivatives (Hessians,
``create_graph=True``) are supported: the backward pass then recomputes each chunk with the differentiable
reference code.

The same compiled module holds the symmetric-contraction and spherical-harmonics kernels and the direct neighbour
search of small structures (``kernels/neighbours.cpp``, used by :mod:`mace_ase.neighbours`). It is compiled at
first use with ``torch.utils.cpp_extension`` (needs g++ and ninja; ~30 s) into a per-user cache folder named by a
hash of the source, torch version, compiler flags and CPU (``platformdirs.user_cache_dir("mace-ase")/kernels``, or
``$MACE_ASE_KERNEL_DIR``), created private to the user.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import platform
import stat
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from mace_ase.io.locking import exclusive

logger = logging.getLogger(__name__)

CHUNK_EDGES = 512  # edge rows per chunk: ~3.7 MB of float32 work arrays for MP-0-medium, cache-resident
CHUNK_EDGES_GPU = 2**17  # GPUs want large launches: ~1.3 GB of float32 work arrays per chunk for MP-0-medium
CHUNK_EDGES_SPLINE = 8192  # spline-mode backward (no radial weights per chunk): ~17 MB of float32 buffers
KEEP_BYTES = 128 * 2**20  # radial-MLP graphs kept from the forward pass (last chunks first); the rest is recomputed
# Exact mode, all layers' [W, dW/dr] rows of the distinct edges together (kept until the backward pass); a larger
# graph takes the chunked path, whose memory does not grow with the system (float32 MPA-0 medium: ~1,000 atoms of
# Si fit, float64 ~500)
PAIRED_TABLE_BYTES = 384 * 2**20
_KERNELS = Path(__file__).with_name("kernels")
_SOURCES = [_KERNELS / name for name in ("convolution.cpp", "symmetric_contraction.cpp", "spherical_harmonics.cpp",
                                         "neighbours.cpp", "module.cpp")]
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]  # no -ffast-math: the sums must stay IEEE
_warned = False


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        _warned = True
    logger.info(message)


# ---------------------------------------------------------------------------------------------------------------
# The compiled kernel
# ---------------------------------------------------------------------------------------------------------------


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags (a cache shared over NFS stays safe)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            lines = [line for line in handle if line.startswith(("flags", "model name"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def kernel_directory() -> Path:
    """Per-user, content-hashed build folder of the CPU kernel (created with mode 0700).

    The hash covers the torch installation's location and the sources' too: two environments with the same torch
    version compile against different include paths, and two checkouts of the same sources write different paths into
    the build file; sharing one folder made each switch between them rebuild (a minute or two).
    """
    digest = hashlib.sha256()
    for part in (*(source.read_bytes() for source in _SOURCES), torch.__version__.encode(), " ".join(_CFLAGS).encode(),
                 _cpu_signature().encode(), platform.python_version().encode(),
                 str(Path(torch.__file__).resolve().parent).encode(), str(_KERNELS.resolve()).encode()):
        digest.update(part)
        digest.update(b"\0")
    base = os.environ.get("MACE_ASE_KERNEL_DIR")
    if not base:
        import platformdirs

        base = os.path.join(platformdirs.user_cache_dir("mace-ase"), "kernels")
    folder = Path(base) / f"cpu-{digest.hexdigest()[:16]}"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = folder.stat()
    if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        raise PermissionError(f"kernel cache folder {folder} is not private to this user; refusing to load code "
                              "from it (set MACE_ASE_KERNEL_DIR to a folder only you can write)")
    return folder


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """One process at a time builds or loads in ``folder``, under a lock that dies with its holder.

    torch's own build lock is a plain ``lock`` file: a process killed while compiling (Ctrl-C at the first call) leaves
    it behind and every later process waits for it forever. Only a holder of this lock ever builds here, so a ``lock``
    file found while holding it is such a leftover and is removed.
    """
    waiting = f"mace-ase: waiting for another process building the CPU kernels in {folder}"
    with exclusive(folder / "build.flock", waiting):
        leftover = folder / "lock"
        if leftover.exists():
            logger.warning("mace-ase: removing %s, left by a kernel build that was interrupted", leftover)
            leftover.unlink()
        yield


@functools.lru_cache(maxsize=1)
def load_kernel() -> Tuple[Optional[Any], str]:
    """The compiled extension module, or ``(None, reason)`` when it cannot be built or is switched off."""
    if os.environ.get("MACE_ASE_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "MACE_ASE_KERNELS=0"
    try:
        from torch.utils import cpp_extension

        folder = kernel_directory()
        name = "mace_ase_kernels_" + folder.name.split("-")[-1]
        logger.info("mace-ase: loading the CPU kernels from %s (compiled there at first use, about a minute)",
                    folder)
        with _build_lock(folder):
            module = cpp_extension.load(name=name, sources=[str(source) for source in _SOURCES],
                                        build_directory=str(folder), extra_cflags=_CFLAGS,
                                        extra_ldflags=["-fopenmp"], verbose=False)
        return module, ""
    except Exception as error:  # noqa: BLE001 - any build failure means: use the torch path
        return None, f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"


# ---------------------------------------------------------------------------------------------------------------
# Coupling tables of one interaction
# ---------------------------------------------------------------------------------------------------------------


def coupling_tables(interaction: Any) -> Tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """(pa, pairs, terms, values, D_out) for the kernel, from the interaction's :class:`ConvolutionPath` modules.

    ``pa``: distinct (radial weight row p, sender component a) vectors; ``pairs``: (pa index, output component b,
    first term) with a closing row; ``terms``/``values``: spherical-harmonic component and coefficient of each term
    (the nonzero Clebsch-Gordan entries times the path weight, in the model's precision).
    """
    input_offsets = [sum(interaction.input_dims[:i]) for i in range(len(interaction.input_dims))]
    pa: List[Tuple[int, int]] = []
    grouped: dict = {}
    out_offset = 0
    for path in interaction.paths:
        # coupling buffer: [2l2+1, (2l1+1) * (2l3+1)]
        coupling = path.coupling.detach().to("cpu").view(path.sh_dim, path.in_dim, path.out_dim)
        for m1 in range(path.in_dim):
            key = (path.weight_index, input_offsets[path.in_slot] + m1)
            if key not in pa:
                pa.append(key)
            q = pa.index(key)
            for m3 in range(path.out_dim):
                for m2 in range(path.sh_dim):
                    value = float(coupling[m2, m1, m3])
                    if value != 0.0:
                        grouped.setdefault((q, out_offset + m3), []).append((path.sh_start + m2, value))
        out_offset += path.out_dim
    pairs, terms, values = [], [], []
    for (q, b), entries in sorted(grouped.items()):
        pairs.append((q, b, len(terms)))
        for m, value in entries:
            terms.append(m)
            values.append(value)
    pairs.append((0, 0, len(terms)))
    return (torch.tensor(pa, dtype=torch.long), torch.tensor(pairs, dtype=torch.long),
            torch.tensor(terms, dtype=torch.long), torch.tensor(values, dtype=torch.float64), out_offset)


# ---------------------------------------------------------------------------------------------------------------
# Chunked convolution with an explicit backward pass
# ---------------------------------------------------------------------------------------------------------------


def _chunks(n_receivers: int, neighbours: int, device: torch.device, budget: Optional[int] = None
            ) -> List[Tuple[int, int]]:
    """Receiver ranges of (nearly) equal size with at most CHUNK_EDGES (CHUNK_EDGES_GPU) edge rows each."""
    budget = budget or (CHUNK_EDGES if device.type == "cpu" else CHUNK_EDGES_GPU)
    per_chunk = max(1, budget // max(neighbours, 1))
    n_chunks = max(1, -(-n_receivers // per_chunk))
    bounds = [n_receivers * k // n_chunks for k in range(n_chunks + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(n_chunks) if bounds[k + 1] > bounds[k]]


def _torch_spline_budget(spline: Any, device: torch.device) -> Optional[int]:
    """Edge rows per chunk when torch ops evaluate the spline (CUDA, no compiler): the gathered coefficient rows
    ``[rows, degree + 1, P*C]`` are the largest work array, so GPU chunks are 16x smaller than for the MLP."""
    if spline is None or device.type == "cpu":
        return None
    return CHUNK_EDGES_GPU // 16


def _folded_mlp_weights(interaction: Any) -> List[Tensor]:
    """The radial MLP's weights with the activation's normalising constant folded into the next layer's
    (``(s silu(z)) @ W = silu(z) @ (s W)``: one elementwise pass fewer per hidden layer)."""
    mlp = interaction.radial_mlp
    key = (mlp.weights[0].dtype, mlp.weights[0].device)
    cached = getattr(interaction, "fused_mlp", None)
    if cached is None or cached[0] != key:
        folded = [w if index == 0 else w * mlp.activation_scale for index, w in enumerate(mlp.weights)]
        cached = interaction.fused_mlp = (key, folded)
    return cached[1]


def _radial_mlp(interaction: Any, x: Tensor) -> Tensor:
    """The interaction's radial MLP (folded weights)."""
    weights = _folded_mlp_weights(interaction)
    for index, weight in enumerate(weights):
        x = x @ weight
        if index < len(weights) - 1:
            x = torch.nn.functional.silu(x)
    return x


class _TableStorage:
    """An interaction's storage for its distinct-edge table, reused between calls: a fresh tensor of this size
    (often 100 MB) costs as much in page faults as the GEMM that fills it. One per thread (a model shared by
    calculators in several threads), counted by ``generation`` so that a backward pass can tell whether its table
    was overwritten meanwhile (another forward pass first). Copies and pickles of the model start empty."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __reduce__(self) -> Tuple[type, tuple]:
        return (_TableStorage, ())

    def generation(self) -> int:
        return getattr(self._local, "generation", 0)

    def take(self, rows: int, width: int, like: Tensor) -> Tuple[Tensor, int]:
        numel = rows * width
        storage = getattr(self._local, "storage", None)
        if storage is None or storage.numel() < numel or storage.dtype != like.dtype or storage.device != like.device:
            self._local.storage = None  # free the old one first
            storage = self._local.storage = like.new_empty(numel)
        self._local.generation = self.generation() + 1
        return storage[:numel].view(rows, width), self._local.generation


class _DistinctEdgeTable:
    """``[H, 2, P*C]``: the radial weights W of H distinct edges and dW/dr, from their features, envelope and the
    derivatives of both in r (forward-mode differentiation through the MLP), written into the interaction's
    :class:`_TableStorage`; :meth:`current` gives it back for the backward pass (recomputed if overwritten).

    A hidden layer maps (z, t) to (silu(z), silu'(z) t) with silu'(z) = s (1 + z (1 - s)), s = sigmoid(z). For the
    last (widest) layer, primal and tangent rows are interleaved (row 2h is edge h's activation, row 2h+1 its
    derivative): one GEMM for both, whose result is already the kernel's table layout ``[row, coefficient, P*C]``.
    """

    def __init__(self, interaction: Any, feats: Tensor, dfeats: Tensor, envelope: Tensor, denvelope: Tensor) -> None:
        self.interaction = interaction
        self.inputs = (feats, dfeats, envelope, denvelope)
        if getattr(interaction, "table_storage", None) is None:
            interaction.table_storage = _TableStorage()
        self.table, self.generation = self._compute(interaction.table_storage)

    def current(self) -> Tensor:
        if self.interaction.table_storage.generation() != self.generation:
            self.table = self._compute(None)[0]
        return self.table

    def _compute(self, storage: Optional[_TableStorage]) -> Tuple[Tensor, int]:
        feats, dfeats, envelope, denvelope = self.inputs
        weights = _folded_mlp_weights(self.interaction)
        n = feats.shape[0]
        value, tangent = feats, dfeats
        for weight in weights[:-1]:
            value, tangent = value @ weight, tangent @ weight
            sigmoid = torch.sigmoid(value)
            tangent.mul_(sigmoid * (1.0 + value * (1.0 - sigmoid)))
            value = torch.nn.functional.silu(value)
        interleaved = torch.stack([value, tangent], 1).view(2 * n, value.shape[1])
        width = weights[-1].shape[1]
        out, generation = storage.take(2 * n, width, feats) if storage is not None else (
            feats.new_empty(2 * n, width), -1)
        table = torch.mm(interleaved, weights[-1], out=out).view(n, 2, width)
        if not self.interaction.apply_cutoff:  # W = MLP(f) envelope: dW/dr = dMLP/dr envelope + MLP denvelope/dr
            table[:, 1].mul_(envelope).addcmul_(table[:, 0], denvelope)
            table[:, 0].mul_(envelope)
        return table, generation


def _distinct_rows_apply(model: Any) -> bool:
    interactions = list(model.interactions)
    return (bool(interactions) and not torch.compiler.is_compiling() and load_kernel()[0] is not None
            and all(getattr(i, "fused", False) and getattr(i, "fused_kernel", False) for i in interactions))


def distinct_table_edges(model: Any) -> Optional[int]:
    """How many edges a CPU call can have for the exact mode's distinct-edge tables to fit
    :data:`PAIRED_TABLE_BYTES` when every edge has its reverse and no other edge of the same length (batched
    evaluation keeps its batches below it); None where that path does not apply (tables of
    :mod:`~mace_ase.model.radial_spline`, no kernel)."""
    if model.use_radial_spline or not _distinct_rows_apply(model):
        return None
    return PAIRED_TABLE_BYTES // (_table_width(model) * model.r_max.element_size())


def _table_width(model: Any) -> int:
    """Radial weights per edge, all layers together (P*C summed)."""
    return sum(int(i.radial_mlp.weights[-1].shape[1]) for i in model.interactions)


def distinct_radial_rows(model: Any, lengths: Tensor, z_sender: Tensor, z_receiver: Tensor, envelope: Tensor
                         ) -> Optional[List[Tensor]]:
    """Exact mode on the CPU kernel: ``[u, rows, features, d features/dr, envelope, d envelope/dr]`` for the
    paired evaluation of the radial MLP (module docstring), or None where it does not apply (no kernel, another
    device, a graph whose tables would exceed :data:`PAIRED_TABLE_BYTES`).

    ``rows[e]`` is edge e's index among the distinct (length, unordered element pair) values of the active edges
    (inactive edges: 0, never read); the radial inputs are those of one edge of each value, with their r-derivative
    (:meth:`~mace_ase.model.mace.RadialEmbedding.r_derivatives`); ``u = r - r`` is zero with du/dr = 1, so the
    kernel's dL/du is dL/dr. The radial embedding depends on the pair only through the mean covalent radius, which
    is symmetric, and identical inputs give identical weights: the result is the per-edge evaluation's up to the
    order of floating-point sums.
    """
    if lengths.device.type != "cpu" or not _distinct_rows_apply(model):
        return None
    r = lengths.detach().view(-1)
    index = torch.nonzero(envelope.detach().view(-1) != 0).view(-1)
    if index.shape[0] == 0:
        return None
    code = torch.minimum(z_sender, z_receiver)[index] * 256 + torch.maximum(z_sender, z_receiver)[index]
    order = torch.argsort(r[index], stable=True)
    order = order[torch.argsort(code[order], stable=True)]  # by (pair, length)
    r_sorted, code_sorted = r[index][order], code[order]
    first = torch.ones(order.shape[0], dtype=torch.bool)
    first[1:] = (r_sorted[1:] != r_sorted[:-1]) | (code_sorted[1:] != code_sorted[:-1])
    n_distinct = int(first.sum())
    if n_distinct * 2 * _table_width(model) * lengths.element_size() > PAIRED_TABLE_BYTES:
        return None
    # number the distinct values in the order of their first edge (the stable sorts put it first in its group):
    # the kernel then reads the table mostly forwards
    chosen = index[order[first]]
    by_first_edge = torch.argsort(chosen)
    renumber = torch.empty_like(by_first_edge)
    renumber[by_first_edge] = torch.arange(n_distinct)
    rows = torch.zeros(r.shape[0], dtype=torch.long)
    rows[index[order]] = renumber[torch.cumsum(first, 0) - 1]
    chosen = chosen[by_first_edge]
    r_chosen = lengths.detach()[chosen]
    z_s, z_r = z_sender[chosen], z_receiver[chosen]
    feats, env = model.radial(r_chosen, z_s, z_r)
    dfeats, denv = model.radial.r_derivatives(r_chosen, z_s, z_r)
    u = (lengths - lengths.detach()).view(-1)
    return [u, rows, feats, dfeats, env, denv]


def _radial_weights(interaction: Any, spline: Any, radial_x: Tensor, radial_y: Tensor, active: Tensor,
                    channels: int) -> Tensor:
    """``[E, paths, C]`` radial weights from the radial inputs: (edge features, envelope) of the exact MLP, or,
    with ``spline`` (``interaction.spline``), (u, interval) of the tables (inactive rows masked: the table is not
    zero there)."""
    if spline is not None:
        weights = spline[0].weights(spline[1], radial_x, radial_y)
        return (weights * active.unsqueeze(-1).to(weights.dtype)).view(weights.shape[0], -1, channels)
    weights = _radial_mlp(interaction, radial_x)
    weights = weights.view(weights.shape[0], weights.shape[1] // channels, channels)
    if not interaction.apply_cutoff:
        weights = weights * radial_y.unsqueeze(-1)
    return weights


def _use_kernel(interaction: Any, h_up: Tensor) -> bool:
    return h_up.device.type == "cpu" and getattr(interaction, "fused_kernel", False) and load_kernel()[0] is not None


class LayerSenders:
    """One call's state of one interaction, shared by the convolutions of its receiver blocks
    (:meth:`~mace_ase.model.mace.MACE.node_blocks`): the sender features ``h_up`` of all nodes, which every block
    reads; dL/dh_up, which the blocks' backward passes add into one whole-system buffer (a gradient per block would be
    a zero-filled whole-system tensor each); the exact mode's distinct-edge table; the budget of kept MLP graphs.

    :func:`layer_senders` makes one and hands it on attached to a token tensor, the output of
    :class:`_SenderGradient`: autograd runs that node's backward pass after those of all the blocks that consumed
    the token, and it returns the accumulated gradient to ``h_up``.
    """

    def __init__(self, interaction: Any, h_up: Tensor, radial_rows: Optional[List[Tensor]]) -> None:
        self.h_up = h_up.detach()
        self.h_up_graph = h_up  # differentiable, for a double backward (Hessians)
        self.grad: Optional[Tensor] = None
        self.keep_left = KEEP_BYTES
        self.distinct: Optional[_DistinctEdgeTable] = None
        if radial_rows is not None and len(radial_rows) == 6 and _use_kernel(interaction, h_up):
            self.distinct = _DistinctEdgeTable(interaction, *radial_rows[2:])

    def add_grad(self, sender: Tensor, grad_rows: Tensor, create_graph: bool) -> None:
        """``dL/dh_up[sender] += grad_rows`` (differentiably in a double backward)."""
        if self.grad is None:
            self.grad = torch.zeros_like(self.h_up)
        if create_graph:
            self.grad = self.grad.index_add(0, sender, grad_rows)
        elif self.h_up.device.type == "cpu" and load_kernel()[0] is not None:
            load_kernel()[0].index_add_rows(self.grad, sender, grad_rows)  # grad.index_add_(0, ...), in parallel
        else:
            self.grad.index_add_(0, sender, grad_rows)


class _SenderGradient(torch.autograd.Function):
    """``h_up`` -> an empty token carrying its :class:`LayerSenders`; backward: the blocks' accumulated dL/dh_up."""

    @staticmethod
    def forward(ctx, h_up, layer):  # noqa: D102
        ctx.layer = layer
        return h_up.new_empty(0)

    @staticmethod
    def backward(ctx, _grad):  # noqa: D102
        grad, ctx.layer.grad = ctx.layer.grad, None  # used once; a second backward pass accumulates anew
        return (grad if grad is not None else torch.zeros_like(ctx.layer.h_up)), None


def layer_senders(interaction: Any, h_up: Tensor, radial_rows: Optional[List[Tensor]]) -> Tensor:
    """The token that the receiver blocks' :func:`fused_convolution` calls of one interaction take (see
    :class:`LayerSenders`)."""
    layer = LayerSenders(interaction, h_up, radial_rows)
    token = _SenderGradient.apply(h_up, layer)
    token.layer = layer
    return token


class _FusedConvolution(torch.autograd.Function):
    """The convolution of one block of receivers (``n_receivers`` of them; its edge rows are ``sh``, ``sender``,
    ...). Inputs ``radial_x, radial_y``: what the reference code recomputes the weights from, (edge features,
    envelope) for the exact radial MLP or (u ``[E, 1]``, interval ``[E]``) in the spline mode. With ``table``
    (``[rows, coefficients, P*C]``: the spline mode's intervals, or the exact mode's distinct edges of
    :func:`distinct_radial_rows`), the compiled path evaluates each edge's weights from its ``interval`` row at
    ``u`` and never forms them for all edges; its backward pass gives dL/du. dL/dh_up goes to ``layer``."""

    @staticmethod
    def forward(ctx, interaction, token, layer, n_receivers, sh, radial_x, radial_y, sender, active, table,  # noqa: D102
                interval, u):
        h_up = layer.h_up
        neighbours = sender.shape[0] // max(n_receivers, 1)
        channels = h_up.shape[2]
        use_kernel = _use_kernel(interaction, h_up)
        tables = interaction.fused_tables
        ctx.interaction, ctx.layer, ctx.n_receivers = interaction, layer, n_receivers
        ctx.use_kernel = use_kernel
        ctx.kept = {}
        distinct = layer.distinct is not None and table is not None
        ctx.distinct = distinct  # the exact mode's distinct-edge table (its storage is reused between calls)
        # radial_x, radial_y are (u, interval) in spline tables, else the MLP's inputs
        ctx.spline = spline = getattr(interaction, "spline", None) if table is not None and not distinct else None
        ctx.save_for_backward(sh, radial_x, radial_y, sender, active, None if distinct else table, interval, u)
        if use_kernel and table is not None:  # one call: nothing per edge is stored
            return load_kernel()[0].spline_convolution_forward(
                table, interval, u.view(-1), sh, h_up, sender, active, n_receivers, tables[4],
                table.shape[2] // channels, *tables[:4])
        out = h_up.new_empty(n_receivers, tables[4], channels)
        chunks = _chunks(n_receivers, neighbours, h_up.device, _torch_spline_budget(spline, h_up.device))
        # The radial MLP graphs of the last chunks (up to KEEP_BYTES of weights per layer, over all its blocks) are
        # kept for the backward pass; the other chunks are recomputed.
        row_bytes = interaction.radial_mlp.weights[-1].shape[1] * h_up.element_size() * 2  # weights + hidden
        n_keep = min(len(chunks), layer.keep_left // max(row_bytes * CHUNK_EDGES, 1))
        n_keep = n_keep if any(ctx.needs_input_grad[5:7]) else 0
        layer.keep_left -= n_keep * row_bytes * CHUNK_EDGES
        for index, (start, stop) in enumerate(chunks):
            rows = slice(start * neighbours, stop * neighbours)
            if use_kernel:
                keep = index >= len(chunks) - n_keep
                with torch.set_grad_enabled(keep):
                    feats = radial_x[rows].detach().requires_grad_(keep and ctx.needs_input_grad[5])
                    env = radial_y[rows].detach().requires_grad_(keep and ctx.needs_input_grad[6])
                    weights = _radial_weights(interaction, spline, feats, env, active[rows], channels)
                if keep:
                    ctx.kept[index] = (feats, env, weights)
                out[start:stop] = load_kernel()[0].convolution_forward(
                    weights.detach(), sh[rows], h_up, sender[rows], active[rows], stop - start, tables[4],
                    *tables[:4])
            else:
                weights = _radial_weights(interaction, spline, radial_x[rows], radial_y[rows], active[rows], channels)
                out[start:stop] = interaction.convolve(h_up.index_select(0, sender[rows]), sh[rows], weights,
                                                       stop - start)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        sh, radial_x, radial_y, sender, active, table, interval, u = ctx.saved_tensors
        if ctx.distinct:
            table = ctx.layer.distinct.current()
        create_graph = torch.is_grad_enabled()  # a double backward (Hessian): stay differentiable
        need_h = ctx.needs_input_grad[1]
        grad_u = None
        if ctx.use_kernel and not create_graph and table is not None:
            grad_sh, grad_u = _table_backward(ctx, grad_out, need_h, sh, sender, active, table, interval, u)
            grads = (grad_sh, None, None)
        elif ctx.use_kernel and not create_graph:
            grads = _kernel_backward(ctx, grad_out, need_h, sh, radial_x, radial_y, sender, active)
        else:  # the reference code, from radial_x and radial_y (the exact mode's tables are not differentiable)
            grads = _recompute_backward(ctx, grad_out, need_h, create_graph, sh, radial_x, radial_y, sender, active)
        ctx.kept = {}  # used once; a second backward pass through this node (Hessians) recomputes
        token_grad = sh.new_zeros(0) if need_h else None
        return (None, token_grad, None, None, *grads, None, None, None, None, grad_u)


class _Workspace(threading.local):
    """Scratch buffers of the backward kernels, kept from one call to the next (one set per thread).

    A buffer of megabytes allocated afresh per call comes from ``mmap`` and is returned on free (glibc's trim
    threshold), so every call paid a page fault per 4 kB on first touch, inside the parallel kernels where the
    faults serialise on the kernel's memory-map lock: measured 8,600 faults (18 ms of system time) per 512-atom call,
    three quarters of them here. The buffers are bounded by the chunk sizes (:data:`CHUNK_EDGES_SPLINE` rows: about
    17 MB in float32 for MPA-0 medium), not by the system size.
    """

    def __init__(self) -> None:
        self.buffers: dict = {}

    def take(self, name: str, shape: Tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised ``[*shape]`` tensor of ``like``'s dtype and device (its contents are garbage)."""
        numel = math.prod(shape)
        key = (name, like.dtype, like.device)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[key] = like.new_empty(numel)
        return buffer[:numel].view(shape)


_workspace = _Workspace()


def _table_backward(ctx, grad_out, need_h, sh, sender, active, table, interval, u):
    """Per chunk of CHUNK_EDGES_SPLINE edge rows (no weights per chunk, so large ones): the kernel's dL/du,
    dL/dY and per-edge dL/dx (added onto the senders)."""
    kernel = load_kernel()[0]
    h_up = ctx.layer.h_up
    channels = h_up.shape[2]
    neighbours = sender.shape[0] // max(ctx.n_receivers, 1)
    need_sh, need_u = ctx.needs_input_grad[4], ctx.needs_input_grad[11]
    grad_sh = torch.empty_like(sh) if need_sh else None
    grad_u = torch.empty_like(u) if need_u else None
    chunks = _chunks(ctx.n_receivers, neighbours, h_up.device, CHUNK_EDGES_SPLINE)
    largest = max((stop - start) * neighbours for start, stop in chunks)
    buffer_y = _workspace.take("grad_y", (largest, sh.shape[1]), h_up)  # reused by every chunk and call
    # no dL/dx where no gradient reaches h_up (the first layer's features are functions of the species alone)
    buffer_x = _workspace.take("grad_x", (largest, h_up.shape[1], channels) if need_h else (0,), h_up)
    for start, stop in reversed(chunks):
        rows = slice(start * neighbours, stop * neighbours)
        grad_u_rows, grad_y, grad_x = kernel.spline_convolution_backward(
            grad_out[start:stop].contiguous(), table, interval[rows], u[rows].reshape(-1), sh[rows], h_up,
            sender[rows], active[rows], table.shape[2] // channels, *ctx.interaction.fused_tables[:4], buffer_y,
            buffer_x)
        if need_h:
            ctx.layer.add_grad(sender[rows], grad_x, False)
        if need_sh:
            grad_sh[rows] = grad_y
        if need_u:
            grad_u[rows] = grad_u_rows.view(u[rows].shape)
    return grad_sh, grad_u


def _kernel_backward(ctx, grad_out, need_h, sh, radial_x, radial_y, sender, active):
    """Per chunk (last first): radial MLP (kept or recomputed), the kernel's dL/dW, dL/dY, dL/dx, MLP backward."""
    interaction = ctx.interaction
    kernel = load_kernel()[0]
    h_up = ctx.layer.h_up
    channels = h_up.shape[2]
    neighbours = sender.shape[0] // max(ctx.n_receivers, 1)
    need_sh, need_feats, need_env = ctx.needs_input_grad[4:7]
    grad_sh = torch.empty_like(sh) if need_sh else None
    grad_feats = torch.empty_like(radial_x) if need_feats else None
    grad_env = torch.empty_like(radial_y) if need_env else None
    chunks = _chunks(ctx.n_receivers, neighbours, h_up.device)
    largest = max((stop - start) * neighbours for start, stop in chunks)
    n_paths = interaction.radial_mlp.weights[-1].shape[1] // channels
    # work buffers reused by every chunk and call (the kernel initialises the rows it writes)
    buffer_w = _workspace.take("grad_w", (largest, n_paths, channels), h_up)
    buffer_y = _workspace.take("grad_y", (largest, sh.shape[1]), h_up)
    buffer_x = _workspace.take("grad_x", (largest, h_up.shape[1], channels) if need_h else (0,), h_up)
    for index in reversed(range(len(chunks))):
        start, stop = chunks[index]
        rows = slice(start * neighbours, stop * neighbours)
        if index in ctx.kept:
            feats, env, weights = ctx.kept.pop(index)  # freed as soon as it is used
        else:
            with torch.enable_grad():
                feats = radial_x[rows].detach().requires_grad_(need_feats)
                env = radial_y[rows].detach().requires_grad_(need_env)
                weights = _radial_weights(interaction, None, feats, env, active[rows], channels)
        grad_w, grad_y, grad_x = kernel.convolution_backward(
            grad_out[start:stop].contiguous(), weights.detach(), sh[rows], h_up, sender[rows], active[rows],
            *interaction.fused_tables[:4], buffer_w, buffer_y, buffer_x)
        if need_h:
            ctx.layer.add_grad(sender[rows], grad_x, False)
        if need_sh:
            grad_sh[rows] = grad_y
        inputs = [t for t, need in ((feats, need_feats), (env, need_env)) if need]
        if inputs:
            radial = torch.autograd.grad(weights, inputs, grad_w, allow_unused=True)
            radial = [r if r is not None else torch.zeros_like(t) for r, t in zip(radial, inputs)]
            if need_feats:
                grad_feats[rows] = radial.pop(0)
            if need_env:
                grad_env[rows] = radial.pop(0)
    return grad_sh, grad_feats, grad_env


def _recompute_backward(ctx, grad_out, need_h, create_graph, sh, radial_x, radial_y, sender, active):
    """Per chunk: the reference code recomputed under autograd (differentiable again when ``create_graph``)."""
    interaction = ctx.interaction
    h_up = ctx.layer.h_up
    channels = h_up.shape[2]
    neighbours = sender.shape[0] // max(ctx.n_receivers, 1)
    need = (need_h, *ctx.needs_input_grad[4:7])
    pieces: List[List[Tensor]] = [[], [], []]  # per chunk: d/dsh, d/dradial_x, d/dradial_y
    chunks = _chunks(ctx.n_receivers, neighbours, h_up.device, _torch_spline_budget(ctx.spline, h_up.device))
    for start, stop in chunks:
        rows = slice(start * neighbours, stop * neighbours)
        with torch.enable_grad():
            # a double backward differentiates through h_up itself (its graph), else its detached copy will do
            senders = ctx.layer.h_up_graph if create_graph else h_up
            inputs = [senders.index_select(0, sender[rows]), sh[rows], radial_x[rows], radial_y[rows]]
            if not create_graph:
                inputs = [t.detach().requires_grad_(n) for t, n in zip(inputs, need)]
            weights = _radial_weights(interaction, ctx.spline, inputs[2], inputs[3], active[rows], channels)
            out = interaction.convolve(inputs[0], inputs[1], weights, stop - start)
            wanted = [t for t, n in zip(inputs, need) if n]
            result = list(torch.autograd.grad(out, wanted, grad_out[start:stop], create_graph=create_graph,
                                              allow_unused=True))
        grads = []
        for tensor, n in zip(inputs, need):
            grad = result.pop(0) if n else None
            grads.append(torch.zeros_like(tensor) if n and grad is None else grad)
        if need[0]:
            ctx.layer.add_grad(sender[rows], grads[0], create_graph)
        for k in range(3):
            pieces[k].append(grads[k + 1])
    return tuple(torch.cat(p) if n else None for p, n in zip(pieces, need[1:]))


def fused_convolution(interaction: Any, token: Tensor, n_receivers: int, sh: Tensor, edge_feats: Tensor,
                      envelope: Tensor, sender: Tensor, radial_rows: Optional[List[Tensor]] = None) -> Tensor:
    """Same as ``interaction.convolution(h_up[sender], sh, edge_feats, envelope, n_receivers)`` for one block of
    receivers, chunked and fused; ``token`` comes from :func:`layer_senders` (``h_up`` of all nodes).

    ``radial_rows``: the block's ``[u, interval]`` in the tables of :mod:`mace_ase.model.radial_spline` (spline
    mode) or among the layer's distinct edges (:func:`distinct_radial_rows`, exact mode); None: the chunked radial MLP.
    """
    layer = token.layer
    active = envelope.view(-1) != 0  # padding and r >= r_max: exactly zero weights, values and gradients
    spline = getattr(interaction, "spline", None)
    if radial_rows is not None and layer.distinct is not None:
        u, interval = radial_rows[0], radial_rows[1]
        return _FusedConvolution.apply(interaction, token, layer, n_receivers, sh, edge_feats, envelope, sender,
                                       active, layer.distinct.table, interval, u)
    if radial_rows is not None and len(radial_rows) == 2 and spline is not None:
        u, interval = radial_rows[0], radial_rows[1]
        return _FusedConvolution.apply(interaction, token, layer, n_receivers, sh, u, interval, sender, active,
                                       spline[0].tables[spline[1]], interval, u)
    return _FusedConvolution.apply(interaction, token, layer, n_receivers, sh, edge_feats, envelope, sender, active,
                                   None, None, None)


# ---------------------------------------------------------------------------------------------------------------
# Spherical harmonics of the edge directions (compiled CPU kernel, explicit backward)
# ---------------------------------------------------------------------------------------------------------------


class _SphericalHarmonics(torch.autograd.Function):
    """``spherical_harmonics(vectors / lengths.clamp_min(1e-12), max_ell)`` in one kernel call each way; a double
    backward (Hessians) recomputes the reference code, differentiably."""

    @staticmethod
    def forward(ctx, vectors, lengths, max_ell):  # noqa: D102
        ctx.save_for_backward(vectors, lengths)
        ctx.max_ell = max_ell
        return load_kernel()[0].spherical_harmonics_forward(vectors, lengths, max_ell)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        vectors, lengths = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the reference code, connected to the saved inputs' history
            from mace_ase.model.mace import spherical_harmonics

            # new nodes for v and r: the lengths depend on the vectors upstream, and the partial derivatives
            # (r held fixed, v held fixed) are what this function returns
            v, r = vectors.view_as(vectors), lengths.view_as(lengths)
            sh = spherical_harmonics(v / r.clamp_min(1e-12), ctx.max_ell)
            grad_vectors, grad_lengths = torch.autograd.grad(sh, (v, r), grad, create_graph=True)
            return grad_vectors, grad_lengths, None
        grad_vectors, grad_lengths = load_kernel()[0].spherical_harmonics_backward(
            grad.contiguous(), vectors, lengths, ctx.max_ell)
        return grad_vectors, grad_lengths, None


def fused_spherical_harmonics(vectors: Tensor, lengths: Tensor, max_ell: int) -> Tensor:
    """Y_lm ``[E, (max_ell+1)^2]`` of the edge vectors ``[E, 3]`` (Å) with lengths ``[E, 1]``, as
    :func:`mace_ase.model.mace.spherical_harmonics` of their directions, by the CPU kernel."""
    return _SphericalHarmonics.apply(vectors.contiguous(), lengths.contiguous(), max_ell)


# ---------------------------------------------------------------------------------------------------------------
# Symmetric contraction (compiled CPU kernel, explicit backward)
# ---------------------------------------------------------------------------------------------------------------


def _folded_weights(contraction: Any, species_counts: List[int]) -> Tuple[Tensor, Tensor]:
    """``V_z = coefficients @ W_z`` as ``[G, Q, M, C]`` for the G elements present, and each node's group index."""
    channels = contraction.weights.shape[2]
    present = [element for element, count in enumerate(species_counts) if count > 0]
    folded = torch.stack([(contraction.coefficients @ contraction.weights[element]).view(-1, contraction.out_dim,
                                                                                           channels)
                          for element in present])
    counts = torch.tensor([species_counts[element] for element in present], device=folded.device)
    group = torch.arange(len(present), device=folded.device).repeat_interleave(counts)
    return folded, group


def _reference_basis(contraction: Any, a: Tensor, species_counts: List[int]) -> Tensor:
    return contraction(a.permute(2, 1, 0).contiguous(), species_counts).permute(2, 1, 0)  # [N, M, C]


class _FusedSymmetricContraction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, contraction, species_counts, a, folded, group):  # noqa: D102
        ctx.contraction = contraction
        ctx.species_counts = species_counts
        ctx.save_for_backward(a, folded, group)
        return load_kernel()[0].symmetric_contraction_forward(a, folded, group, *_monomial_tables(contraction))

    @staticmethod
    def backward(ctx, grad_b):  # noqa: D102
        a, folded, group = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward (Hessian): differentiable reference recomputation
            with torch.enable_grad():
                b = _reference_basis(ctx.contraction, a, ctx.species_counts)
                (grad_a,) = torch.autograd.grad(b, a, grad_b, create_graph=True)
        else:
            grad_a = load_kernel()[0].symmetric_contraction_backward(grad_b, a, folded, group,
                                                                     *_monomial_tables(ctx.contraction))
        return None, None, grad_a, None, None


def _monomial_tables(contraction: Any) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return (contraction.singles.contiguous(), contraction.pairs.contiguous(), contraction.triples_pair.contiguous(),
            contraction.triples_single.contiguous())


def fused_symmetric_contractions(product: Any, a: Tensor, species_counts: List[int]) -> Tensor:
    """The product basis of all output irreps, ``[N, D_out, C]``, from the interaction output ``a`` ``[N, 16, C]``."""
    if a.device.type != "cpu" or load_kernel()[0] is None:  # e.g. the model was moved to a GPU after loading
        return torch.cat([_reference_basis(c, a, species_counts) for c in product.contractions], dim=1)
    a = a.contiguous()
    pieces = []
    for contraction in product.contractions:
        folded, group = _folded_weights(contraction, species_counts)
        pieces.append(_FusedSymmetricContraction.apply(contraction, species_counts, a, folded, group))
    return torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]


# ---------------------------------------------------------------------------------------------------------------
# Per-node linears without copies (any device: plain torch ops)
# ---------------------------------------------------------------------------------------------------------------
# The reference linears (mace.py: EquivariantLinear, SpeciesLinear) gather each irrep's components of [N, D, C]
# features into a contiguous [N*(2l+1), C] matrix (a copy), multiply, and concatenate the outputs (a copy); autograd
# adds the copies' backward passes (zero-filled slice gradients, concatenations). Here every term is one batched
# matrix product over the irrep's 2l+1 components, read from and written into strided views of the [N, D, C]
# tensors (``bmm`` takes a row stride): no copy in either direction. Per 512-atom MPA-0 call these copies and the
# density normalisation's autograd ops (divisions, negations, products and sums over [N, 16, C]) were ~15 % of the
# time.


# Below this many nodes (per call or node block) the reference linears run instead: their gather copies are cheap
# there, and one GEMM of [N * (2l+1), C] rows beats 2l+1 products of N rows with a call overhead each (measured
# per ASE call, MPA-0 medium: 8 atoms 3 % slower with the component products, 64 atoms 2 % and 216 atoms 6 % faster)
COMPONENT_LINEAR_MIN_NODES = 32
Term = Tuple[int, int, int, int, int, Tensor]  # (first row, rows, first input component, first output one, 2l+1, W)


def _run_terms(x: Tensor, terms: List[Term], out_components: int, channels_out: int, transpose: bool) -> Tensor:
    """``out[r0:r0+n, o:o+d, :] (+)= x[r0:r0+n, i:i+d, :] @ W`` for each term ``(r0, n, i, o, d, W)`` (``W.T`` and
    the roles of ``i`` and ``o`` swapped when ``transpose``: the backward pass); output rows that no term writes are
    zero."""
    x = x.contiguous()
    out = x.new_empty(x.shape[0], out_components, channels_out)
    written = set()
    for row, count, first_in, first_out, dim, weight in terms:
        if transpose:
            first_in, first_out, weight = first_out, first_in, weight.t()
        # [d, n, C] views of components first..first+d-1 of rows row..row+n-1 (one op each: small systems pay per op)
        source = x.as_strided((dim, count, x.shape[2]), (x.stride(1), x.stride(0), 1),
                              x.storage_offset() + row * x.stride(0) + first_in * x.stride(1))
        target = out.as_strided((dim, count, channels_out), (out.stride(1), out.stride(0), 1),
                                row * out.stride(0) + first_out * out.stride(1))
        matrices = weight.expand(dim, weight.shape[0], weight.shape[1])
        if (row, first_out) in written:
            target.baddbmm_(source, matrices)
        else:
            torch.bmm(source, matrices, out=target)
            written.add((row, first_out))
    # the terms' row blocks cover all rows (all of them, or one block per element present)
    blocks = sorted({(row, count) for row, count, *_ in terms}) or [(0, x.shape[0])]
    for row, count in blocks:
        covered = [False] * out_components
        for term_row, _, first_in, first_out, dim, _ in terms:
            if term_row == row:
                start = first_in if transpose else first_out
                covered[start:start + dim] = [True] * dim
        for component, done in enumerate(covered):
            if not done:
                out.narrow(0, row, count).select(1, component).zero_()
    return out


class _ComponentLinear(torch.autograd.Function):
    """:func:`component_linear` (``transpose``: its adjoint); the weights are constants (no weight gradients). The
    backward pass is the adjoint map applied by this same function, so a double backward (Hessians) works too."""

    @staticmethod
    def forward(ctx, x, terms, out_components, channels_out, transpose, divisor):  # noqa: D102
        out = _run_terms(x, terms, out_components, channels_out, transpose)
        if divisor is not None:
            out.div_(divisor.view(-1, 1, 1))
        ctx.terms, ctx.transpose, ctx.in_components, ctx.channels_in = terms, transpose, x.shape[1], x.shape[2]
        ctx.save_for_backward(divisor, out if divisor is not None and ctx.needs_input_grad[5] else None)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        divisor, out = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_divisor = None
        if ctx.needs_input_grad[0]:  # d(T(x) / n)/dx: the adjoint map T^T of the rows divided by n
            scaled = grad if divisor is None else grad / divisor.view(-1, 1, 1)
            grad_x = _ComponentLinear.apply(scaled, ctx.terms, ctx.in_components, ctx.channels_in, not ctx.transpose,
                                            None)
        if out is not None:  # d(u / n)/dn = -u / n^2 = -out / n: one dot product per row
            rows = grad.shape[0]
            dots = torch.linalg.vecdot(grad.view(rows, -1), out.view(rows, -1))  # (a bmm of [1, D*C] rows: 3x slower)
            grad_divisor = (-dots / divisor.expand(rows)).sum_to_size(divisor.shape)
        return grad_x, None, None, None, None, grad_divisor


def component_linear(x: Tensor, terms: List[Term], out_components: int, channels_out: int,
                     divisor: Optional[Tensor] = None) -> Tensor:
    """``[N, out_components, channels_out]``: ``out[r0:r0+n, o:o+d, :] = sum x[r0:r0+n, i:i+d, :] @ W`` over the terms
    ``(r0, n, i, o, d, W)`` that write it (zero where none does), divided row-wise by ``divisor`` (``[N]`` or
    ``[1]``) when given; differentiable in ``x`` and ``divisor``. The reference linears' maps without their copies
    (where an output irrep reads several input slots, their products are summed term by term: the last bits of a
    float sum may differ from the reference's one stacked GEMM)."""
    return _ComponentLinear.apply(x, terms, out_components, channels_out, False, divisor)


# ---------------------------------------------------------------------------------------------------------------
# Switching it on (with a self-check)
# ---------------------------------------------------------------------------------------------------------------


def _set(model: torch.nn.Module, fused: bool, kernel: bool) -> None:
    for interaction in model.interactions:
        if fused and not hasattr(interaction, "fused_tables"):
            interaction.fused_tables = coupling_tables(interaction)
        interaction.fused = fused
        interaction.fused_kernel = kernel
        for linear in (interaction.linear_up, interaction.linear, interaction.skip):
            linear.fused = fused  # component_linear: plain torch, any device
    for product in model.products:
        product.fused = fused and kernel  # the contraction kernel is CPU-only; elsewhere the reference runs
        product.linear.fused = fused
    model.fused_geometry = fused and kernel and model.max_ell <= 3  # the spherical-harmonics kernel, likewise
    model.fused_blocks = fused  # node blocks on the CPU (MACE.node_blocks): the fast path shares h_up between them


def _test_graph(model: torch.nn.Module) -> Tuple[Tensor, Tensor, Tensor]:
    """A small, deterministic, irregular cluster of the model's first elements: all pairs within r_max."""
    generator = torch.Generator().manual_seed(0)
    n_atoms = 7
    positions = torch.rand(n_atoms, 3, generator=generator, dtype=torch.float64) * 0.6 * model.r_max_value
    n_elements = int(model.atomic_numbers.shape[0])
    species = torch.arange(n_atoms) % min(n_elements, 3)
    i, j = torch.meshgrid(torch.arange(n_atoms), torch.arange(n_atoms), indexing="ij")
    vectors = positions[j] - positions[i]
    keep = (i != j) & (vectors.norm(dim=-1) < model.r_max_value) & (vectors.norm(dim=-1) > 0.5)
    edge_index = torch.stack([i[keep], j[keep]])
    return vectors[keep], edge_index, species


def enable_fused(model: torch.nn.Module, check: bool = True) -> str:
    """Switch ``model`` (a :class:`~mace_ase.model.mace.MACE`) to the fast convolution where it is exact.

    Returns the mode in use: ``"kernel"`` (compiled CPU kernel, chunked), ``"chunked"`` (chunked torch code: CUDA,
    or no compiler) or ``"reference"`` (the fast path disagreed with the reference on the self-check; one warning).
    """
    device = model.r_max.device
    kernel = device.type == "cpu" and load_kernel()[0] is not None
    if device.type == "cpu" and not kernel:
        _warn_once(f"mace-ase: compiled CPU kernel unavailable ({load_kernel()[1]}); using the chunked torch "
                   "path (exact, slower). Install g++ and ninja for the fast path.")
    _set(model, True, kernel)
    if not check:
        return "kernel" if kernel else "chunked"
    dtype = model.r_max.dtype
    vectors, edge_index, species = _test_graph(model)
    vectors, edge_index, species = vectors.to(device, dtype), edge_index.to(device), species.to(device)
    fast = model.energy_and_edge_gradients(vectors, edge_index, species)
    _set(model, False, False)
    reference = model.energy_and_edge_gradients(vectors, edge_index, species)
    tolerance = 1e-9 if dtype == torch.float64 else 2e-4
    agree = all(
        torch.allclose(a, b, rtol=tolerance, atol=tolerance * float(b.abs().max().clamp_min(1.0)))
        for a, b in zip(fast, reference)
    )
    if not agree:
        _warn_once("mace-ase: the fast convolution disagrees with the reference on the self-check; using the "
                   "reference path (please report this)")
        return "reference"
    _set(model, True, kernel)
    return "kernel" if kernel else "chunked"
