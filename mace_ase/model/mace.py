r"""The MACE forward pass, in plain torch (TorchScript-able, CPU and CUDA, float32 and float64).

MACE (Batatia et al., NeurIPS 2022, arXiv:2206.07697) writes the energy as a sum of atomic terms,

.. math::  E = \sum_i E^{0}_{Z_i} + \sum_i \big[\, s\,(V^{\rm ZBL}_i + \sum_t \mathcal{R}_t(h^{(t)}_i)) + \mu \,\big]

where the node features :math:`h^{(t)}_i` come from ``T`` message-passing layers. One layer (paper section 3):

1. **embedding** (layer 0 only): :math:`h^{(0)}_i = W_{Z_i}` -- a per-element vector of C scalar channels;
2. **radial basis**: :math:`R_n(r_{ij}) = \sqrt{2/r_{\max}}\,\sin(n\pi \tilde r/r_{\max})/\tilde r \cdot f_{\rm cut}(r)`
   (``\tilde r`` is the Agnesi transform of r where the model uses one), fed to a radial MLP giving per-edge,
   per-path, per-channel weights :math:`R^{(t)}_{k c}(r_{ij})`;
3. **interaction** (eq. 8-9): :math:`A_{i,c,l_3m_3} = \frac{1}{\rm norm}\sum_{j} \sum_k R_{kc}(r_{ij})
   \sum_{m_1 m_2} C^{l_3 m_3}_{l_1 m_1 l_2 m_2} Y_{l_2 m_2}(\hat r_{ij})\, \bar h_{j,c,l_1 m_1}`, then a linear map;
   ``norm`` is the average neighbour count, or ``1 + \rho_i`` (a learnt local density) in "Density" blocks;
4. **product** (eq. 10-11): the symmetric contraction
   :math:`B_{i,c,LM} = \sum_{\nu\le 3}\sum_{a_1..a_\nu}\sum_k W^{(\nu)}_{Z_i k c}\, U^{(\nu)}_{LM,a_1..a_\nu,k}
   \prod_\xi A_{i,c,a_\xi}`, a linear map, plus a per-element self-connection (residual) term;
5. **readout**: linear in the scalars for inner layers, a small MLP for the last one.

Forces and stress are derivatives of E. We differentiate with respect to the edge vectors
:math:`\mathbf r_e = \mathbf x_{\rm receiver} - \mathbf x_{\rm sender} + \mathbf S_e \cdot \mathrm{cell}` and assemble
:math:`\mathbf F_i = \sum_{e:\,{\rm sender}=i} \partial E/\partial \mathbf r_e - \sum_{e:\,{\rm receiver}=i}
\partial E/\partial \mathbf r_e` and
:math:`\sigma = \frac{1}{V}\,{\rm sym}\sum_e \mathbf r_e \otimes \partial E/\partial \mathbf r_e` (equal to mace's
symmetric-strain derivative).

Units: Å in, eV out; forces eV/Å, stress eV/Å³ (ASE sign: positive is tensile).

Shapes: N atoms, E edges, C channels, D = sum of (2l+1) over the irreps of a feature tensor.
Equivariant features are stored as ``[N, D, C]`` ("irrep-major, channel-last"): every linear map is then a plain
matmul over the last axis. The irreps of every tensor have natural parity (0e, 1o, 2e, 3o) and one multiplicity.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

NODE_BLOCK = 1024  # receivers per block of the CPU fast path (MACE.node_blocks): flat from 256 to 2,048 (RESULTS.md)

# --------------------------------------------------------------------------------------------------------------
# Small building blocks
# --------------------------------------------------------------------------------------------------------------


def polynomial_envelope(r: Tensor, r_max: Tensor, p: int) -> Tensor:
    """Smooth cutoff 1 - (p+1)(p+2)/2 u^p + p(p+2) u^(p+1) - p(p+1)/2 u^(p+2), u = r/r_max, zero beyond r_max.

    >>> float(polynomial_envelope(torch.tensor(0.0), torch.tensor(5.0), 5))
    1.0
    """
    u = r / r_max
    envelope = (
        1.0
        - (p + 1.0) * (p + 2.0) / 2.0 * torch.pow(u, p)
        + p * (p + 2.0) * torch.pow(u, p + 1)
        - p * (p + 1.0) / 2.0 * torch.pow(u, p + 2)
    )
    return envelope * (r < r_max)


def spherical_harmonics(unit: Tensor, max_ell: int) -> Tensor:
    """Real spherical harmonics Y_lm, l = 0..max_ell (<= 3), e3nn's basis and 'component' normalisation.

    ``unit`` holds unit vectors (x, y, z), shape ``[E, 3]``; returns ``[E, (max_ell+1)^2]`` with sum_m Y_lm^2 = 2l+1.
    The polar axis of this basis is y (e3nn convention), so Y_1 = sqrt(3) (x, y, z).
    """
    x, y, z = unit[:, 0], unit[:, 1], unit[:, 2]
    parts = [torch.ones_like(x)]
    if max_ell >= 1:
        parts += [x * 3.0**0.5, y * 3.0**0.5, z * 3.0**0.5]
    if max_ell >= 2:
        s20 = 3.0**0.5 * x * z
        s24 = 3.0**0.5 / 2.0 * (z * z - x * x)
        l2 = [s20, 3.0**0.5 * x * y, y * y - 0.5 * (x * x + z * z), 3.0**0.5 * y * z, s24]
        parts += [v * 5.0**0.5 for v in l2]
        if max_ell >= 3:
            l3 = [
                (5.0 / 6.0) ** 0.5 * (s20 * z + s24 * x),
                5.0**0.5 * s20 * y,
                (3.0 / 8.0) ** 0.5 * (4.0 * y * y - x * x - z * z) * x,
                0.5 * y * (2.0 * y * y - 3.0 * (x * x + z * z)),
                (3.0 / 8.0) ** 0.5 * z * (4.0 * y * y - x * x - z * z),
                5.0**0.5 * s24 * y,
                (5.0 / 6.0) ** 0.5 * (s24 * z - s20 * x),
            ]
            parts += [v * 7.0**0.5 for v in l3]
    return torch.stack(parts, dim=-1)


class RadialMLP(nn.Module):
    """e3nn-style fully connected net without biases: x <- act(x @ W / sqrt(fan_in)) on hidden layers.

    ``act`` is SiLU times the constant that normalises its second moment (read from the model file).
    """

    def __init__(self, weights: List[Tensor], activation_scale: float) -> None:
        super().__init__()
        # Pre-divide each weight by sqrt(fan_in): a constant fold, not a change of the maths.
        self.weights = nn.ParameterList([nn.Parameter(w / w.shape[0] ** 0.5, requires_grad=False) for w in weights])
        self.activation_scale = activation_scale
        self.num_layers = len(weights)

    def forward(self, x: Tensor) -> Tensor:
        for index, weight in enumerate(self.weights):
            x = x @ weight
            if index < self.num_layers - 1:
                x = torch.nn.functional.silu(x) * self.activation_scale
        return x


def _join(blocks: List[Tensor]) -> Tensor:
    """The node blocks of one tensor as one (no copy for a single block)."""
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def rows_matmul(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight`` for ``x`` ``[N, D, K]`` as one ``[N*D, K]`` GEMM: ``matmul`` falls back to N small batched
    GEMMs (with the weight expanded N times) when x is a slice of components, whose rows are not contiguous."""
    n, d = x.shape[0], x.shape[1]
    return (x.reshape(n * d, x.shape[2]) @ weight).view(n, d, weight.shape[1])


class EquivariantLinear(nn.Module):
    """e3nn ``o3.Linear`` on ``[N, D_in, C_in]`` features: mixes channels within each irrep, never across l.

    Output irrep slot o gets sum over input slots s of the same irrep of ``x[:, comps(s), :] @ W_so``.
    ``gather`` lists, per output slot, the input components of all its input slots (slot-major); ``weight`` of that
    output slot is the stacked ``[n_in_slots * C_in, C_out]`` matrix with e3nn's path weights folded in.
    """

    def __init__(self, gathers: List[Tensor], weights: List[Tensor], out_dims: List[int]) -> None:
        super().__init__()
        self.register_buffer("gather", torch.cat(gathers))  # all output slots' input components, concatenated
        self.gather_starts = [int(sum(g.shape[0] for g in gathers[:i])) for i in range(len(gathers))]
        self.gather_lengths = [int(g.shape[0]) for g in gathers]
        # MACE's features are stored slot by slot, so the gather is nearly always the identity: then the slots are
        # plain splits of x (views; their backward is one cat, not a zero-filled index_add per slot)
        self.identity_gather = bool(torch.equal(self.gather, torch.arange(self.gather.shape[0])))
        self.weights = nn.ParameterList([nn.Parameter(w, requires_grad=False) for w in weights])
        self.out_dims = out_dims
        self.fused = False  # set by mace_ase.model.fused._set: eager runs multiply in place, without the copies below

    def forward(self, x: Tensor, divisor: Optional[Tensor] = None) -> Tensor:
        """``[N, D_out, C_out]``; divided row by row by ``divisor`` (``[N]`` or ``[1]``) when given."""
        if self.fused and self.identity_gather and self.gather.shape[0] == x.shape[1] and not torch.jit.is_scripting():
            return self.fused_forward(x, divisor)
        return self.reference_forward(x, divisor)

    def reference_forward(self, x: Tensor, divisor: Optional[Tensor] = None) -> Tensor:
        """:meth:`forward` by gathering each output irrep's input components into one matrix (a copy) for one GEMM
        (the reference path, and the fast path's for a few nodes, where one GEMM beats a product per component)."""
        n = x.shape[0]
        channels_in = x.shape[2]
        outputs: List[Tensor] = []
        pieces: List[Tensor] = []
        if self.identity_gather and self.gather.shape[0] == x.shape[1]:
            pieces = x.split_with_sizes(self.gather_lengths, dim=1)
        for index, weight in enumerate(self.weights):
            dim = self.out_dims[index]
            slots = self.gather_lengths[index] // dim
            if len(pieces) > 0:
                selected = pieces[index]
            else:
                gather = self.gather.narrow(0, self.gather_starts[index], self.gather_lengths[index])
                selected = x.index_select(1, gather)
            # [N, slots*dim, C_in] -> [N, dim, slots*C_in] so that one matmul does all input slots
            selected = selected.view(n, slots, dim, channels_in)
            selected = selected.transpose(1, 2).reshape(n, dim, slots * channels_in)
            outputs.append(rows_matmul(selected, weight))
        out = torch.cat(outputs, dim=1)
        return out if divisor is None else out / divisor.view(-1, 1, 1)

    @torch.jit.unused
    def fused_forward(self, x: Tensor, divisor: Optional[Tensor]) -> Tensor:
        """The same maps as :meth:`forward` (identity gather), without its copies: see
        :func:`mace_ase.model.fused.component_linear`."""
        from mace_ase.model.fused import COMPONENT_LINEAR_MIN_NODES, component_linear

        if x.shape[0] < COMPONENT_LINEAR_MIN_NODES:
            return self.reference_forward(x, divisor)
        terms = []
        out_start = 0
        for index, weight in enumerate(self.weights):
            dim = self.out_dims[index]
            slots = self.gather_lengths[index] // dim
            rows = weight.shape[0] // slots  # input slot j multiplies rows j*C_in .. (j+1)*C_in of the stacked matrix
            for j in range(slots):
                terms.append((0, x.shape[0], self.gather_starts[index] + j * dim, out_start, dim,
                              weight.narrow(0, j * rows, rows)))
            out_start += dim
        return component_linear(x, terms, out_start, self.weights[0].shape[1], divisor)


class SpeciesLinear(nn.Module):
    """Per-element linear map (e3nn FullyConnectedTensorProduct with a one-hot element vector as second input).

    For each output irrep slot: ``out[i, comps_out, :] = x[i, comps_in, :] @ W[path, Z_i]`` when an input slot of the
    same irrep exists, else zero. Nodes come sorted by element, so each element's matrices act on one contiguous slice
    (no per-node gather of ``[C, C]`` weights).
    """

    def __init__(self, out_slots: List[Tuple[int, int, int]], weight: Tensor) -> None:
        super().__init__()
        self.out_slots = out_slots  # per output slot: (input start component, 2l+1, path index or -1)
        self.weight = nn.Parameter(weight, requires_grad=False)  # [n_paths, n_elements, C_in, C_out]
        self.fused = False  # set by mace_ase.model.fused._set: eager runs multiply in place, without the copies below

    def forward(self, x: Tensor, species_counts: List[int]) -> Tensor:
        if self.fused and not torch.jit.is_scripting():
            return self.fused_forward(x, species_counts)
        return self.reference_forward(x, species_counts)

    def reference_forward(self, x: Tensor, species_counts: List[int]) -> Tensor:
        """:meth:`forward` by one GEMM per element and output slot on a gathered copy, then concatenation (the
        reference path, and the fast path's for a few nodes)."""
        channels_out = self.weight.shape[3]
        pieces: List[Tensor] = []
        start = 0
        for element, count in enumerate(species_counts):
            if count == 0:
                continue
            block = x.narrow(0, start, count)
            slots: List[Tensor] = []
            for in_start, dim, path in self.out_slots:
                if path < 0:
                    slots.append(block.new_zeros(count, dim, channels_out))
                else:
                    slots.append(rows_matmul(block.narrow(1, in_start, dim), self.weight[path, element]))
            pieces.append(torch.cat(slots, dim=1))
            start += count
        return torch.cat(pieces, dim=0)

    @torch.jit.unused
    def fused_forward(self, x: Tensor, species_counts: List[int]) -> Tensor:
        """The same maps as :meth:`forward`, without its copies: see :func:`mace_ase.model.fused.component_linear`."""
        from mace_ase.model.fused import COMPONENT_LINEAR_MIN_NODES, component_linear

        if x.shape[0] < COMPONENT_LINEAR_MIN_NODES:
            return self.reference_forward(x, species_counts)
        terms = []
        start = 0
        for element, count in enumerate(species_counts):
            out_start = 0
            for in_start, dim, path in self.out_slots:
                if path >= 0 and count > 0:
                    terms.append((start, count, in_start, out_start, dim, self.weight[path, element]))
                out_start += dim
            start += count
        out_components = sum(dim for _, dim, _ in self.out_slots)
        return component_linear(x, terms, out_components, self.weight.shape[3])


# --------------------------------------------------------------------------------------------------------------
# 1-2. Radial basis (and the Agnesi transform), ZBL
# --------------------------------------------------------------------------------------------------------------


class RadialEmbedding(nn.Module):
    """Bessel basis on r (or on the Agnesi-transformed r) times the polynomial envelope of the raw r.

    Returns ``(features [E, n_basis], envelope [E, 1])``; with ``apply_cutoff`` the envelope is already folded into
    the features (all MP/OFF models) and the interaction blocks do not use it again.
    """

    def __init__(self, r_max: float, bessel_weights: Tensor, prefactor: Tensor, p: int, apply_cutoff: bool,
                 agnesi: Optional[Tensor], covalent_radii: Optional[Tensor]) -> None:
        super().__init__()
        self.register_buffer("r_max", torch.tensor(r_max, dtype=bessel_weights.dtype))
        self.register_buffer("bessel_weights", bessel_weights)
        self.register_buffer("prefactor", prefactor)
        self.p = p
        self.apply_cutoff = apply_cutoff
        self.use_agnesi = agnesi is not None
        # Agnesi parameters (q, p, a) and the covalent radii table (Å, indexed by Z)
        self.register_buffer("agnesi", agnesi if agnesi is not None else torch.zeros(3, dtype=bessel_weights.dtype))
        if covalent_radii is None:
            covalent_radii = torch.zeros(1, dtype=bessel_weights.dtype)
        self.register_buffer("covalent_radii", covalent_radii)  # Å, indexed by Z

    def forward(self, lengths: Tensor, z_sender: Tensor, z_receiver: Tensor) -> Tuple[Tensor, Tensor]:
        envelope = polynomial_envelope(lengths, self.r_max, self.p)
        r = lengths
        if self.use_agnesi:
            # r~ = 1 / (1 + a x^q / (1 + x^(q-p))), x = r / r0, r0 the mean covalent radius of the pair
            r0 = 0.5 * (self.covalent_radii[z_sender] + self.covalent_radii[z_receiver]).unsqueeze(-1)
            x = lengths / r0
            q, p, a = self.agnesi[0], self.agnesi[1], self.agnesi[2]
            r = 1.0 / (1.0 + a * torch.pow(x, q) / (1.0 + torch.pow(x, q - p)))
        features = self.prefactor * torch.sin(self.bessel_weights * r) / r
        if self.apply_cutoff:
            features = features * envelope
        return features, envelope

    @torch.jit.unused
    def r_derivatives(self, lengths: Tensor, z_sender: Tensor, z_receiver: Tensor) -> Tuple[Tensor, Tensor]:
        """d features/dr ``[E, n_basis]`` and d envelope/dr ``[E, 1]`` of :meth:`forward`, in closed form (for the
        forward-mode radial weights of :mod:`mace_ase.model.fused`; autograd's forward mode keeps process-wide
        state, unsafe with two models in two threads). Not differentiable further."""
        p = float(self.p)
        u = lengths / self.r_max
        envelope = polynomial_envelope(lengths, self.r_max, self.p)
        # d/du of the envelope polynomial: -p(p+1)(p+2)/2 u^(p-1) (1 - u)^2
        denvelope = (-p * (p + 1.0) * (p + 2.0) / 2.0 / self.r_max) * torch.pow(u, p - 1.0) * (1.0 - u) ** 2
        denvelope = denvelope * (lengths < self.r_max)
        r = lengths
        dr = torch.ones_like(lengths)
        if self.use_agnesi:
            # r~ = 1 / (1 + g), g = a x^q / (1 + x^(q-p)): dr~/dr = -r~^2 g'(x) / r0,
            # g'(x) = a x^(q-1) (q + p x^(q-p)) / (1 + x^(q-p))^2
            r0 = 0.5 * (self.covalent_radii[z_sender] + self.covalent_radii[z_receiver]).unsqueeze(-1)
            x = lengths / r0
            q, p_agnesi, a = self.agnesi[0], self.agnesi[1], self.agnesi[2]
            power = torch.pow(x, q - p_agnesi)
            r = 1.0 / (1.0 + a * torch.pow(x, q) / (1.0 + power))
            slope = a * torch.pow(x, q - 1.0) * (q + p_agnesi * power) / (1.0 + power) ** 2
            dr = -r * r * slope / r0
        # d/dr~ of prefactor sin(w r~) / r~ = prefactor (w r~ cos(w r~) - sin(w r~)) / r~^2
        angle = self.bessel_weights * r
        dbessel = self.prefactor * (angle * torch.cos(angle) - torch.sin(angle)) / (r * r) * dr
        if self.apply_cutoff:
            bessel = self.prefactor * torch.sin(angle) / r
            return dbessel * envelope + bessel * denvelope, denvelope
        return dbessel, denvelope


# ZBL constants (Ziegler, Biersack & Littmark 1985), with the digits mace-torch uses:
COULOMB_CONSTANT = 14.3996  # e^2 / (4 pi eps0) in eV * Å
BOHR_RADIUS = 0.529  # Å
ZBL_SCREENING_EXPONENTS = (3.2, 0.9423, 0.4028, 0.2016)  # d_k of the universal screening function (dimensionless)


class ZBLRepulsion(nn.Module):
    """Ziegler-Biersack-Littmark screened nuclear repulsion, per receiver atom (eV).

    V(r) = k_e Z_u Z_v / r * sum_k c_k exp(-d_k r / a), a = a_prefactor * a_0 / (Z_u^a_exp + Z_v^a_exp) Å, with
    k_e = :data:`COULOMB_CONSTANT`, a_0 = :data:`BOHR_RADIUS`, d_k = :data:`ZBL_SCREENING_EXPONENTS` and c_k,
    a_prefactor (0.4543), a_exp (0.3) read from the file; smoothly cut at the sum of covalent radii with the
    polynomial envelope; half of each edge's energy goes to its receiver.

    Everything is computed in the dtype of the buffers (the model's dtype), never in torch's global default dtype.
    """

    def __init__(self, c: Tensor, p: int, covalent_radii: Tensor, a_exp: Tensor, a_prefactor: Tensor) -> None:
        super().__init__()
        self.register_buffer("c", c)
        self.register_buffer("covalent_radii", covalent_radii)
        self.register_buffer("a_exp", a_exp)
        self.register_buffer("a_prefactor", a_prefactor)
        self.p = p
        # module attributes (TorchScript does not read module-level floats)
        self.coulomb_constant = COULOMB_CONSTANT
        self.bohr_radius = BOHR_RADIUS
        self.screening_exponents = ZBL_SCREENING_EXPONENTS

    def forward(self, lengths: Tensor, z_sender: Tensor, z_receiver: Tensor) -> Tensor:
        """Energy of each edge given to its receiver, ``[E, 1]`` eV."""
        # Atomic numbers as floats of the model's dtype: a Python float times an integer tensor would be computed in
        # torch's global default dtype (float32 unless changed), which rounds k_e to float32 in float64 models.
        z_u = z_sender.unsqueeze(-1).to(lengths.dtype)
        z_v = z_receiver.unsqueeze(-1).to(lengths.dtype)
        a = self.a_prefactor * self.bohr_radius / (torch.pow(z_u, self.a_exp) + torch.pow(z_v, self.a_exp))
        r_over_a = lengths / a
        d0, d1, d2, d3 = self.screening_exponents
        phi = (
            self.c[0] * torch.exp(-d0 * r_over_a)
            + self.c[1] * torch.exp(-d1 * r_over_a)
            + self.c[2] * torch.exp(-d2 * r_over_a)
            + self.c[3] * torch.exp(-d3 * r_over_a)
        )
        v_edges = (self.coulomb_constant * z_u * z_v) / lengths * phi
        r_max = (self.covalent_radii[z_sender] + self.covalent_radii[z_receiver]).unsqueeze(-1)
        return 0.5 * v_edges * polynomial_envelope(lengths, r_max, self.p)


# --------------------------------------------------------------------------------------------------------------
# 3. Interaction: A_i = linear( sum_j R(r_ij) * (Y(r_ij) (x) h_j) ) / norm
# --------------------------------------------------------------------------------------------------------------


class ConvolutionPath(nn.Module):
    """One tensor-product path l1 (x) l2 -> l3 of the interaction, summed over each atom's neighbours.

    ``M[i, m3, c] = sum_k sum_{m1} G[i,k,m1,m3] * w[i,k,c] * x[i,k,m1,c]`` with ``G = Y_l2(r_ik) . (pw C^{l1 l2 l3})``,
    ``w`` the radial-MLP weight of this path and ``x`` the sender features. Edges come in a padded ``[N, K]`` grid
    (K = the largest neighbour count), so the neighbour sum is one batched matmul and no ``[E, paths, C]`` message
    tensor is ever formed.
    """

    def __init__(self, in_slot: int, in_dim: int, sh_start: int, sh_dim: int, coupling: Tensor, weight_index: int
                 ) -> None:
        super().__init__()
        self.in_slot = in_slot  # which irrep of the sender features this path reads
        self.in_dim = in_dim
        self.sh_start = sh_start
        self.sh_dim = sh_dim
        self.out_dim = int(coupling.shape[2])
        # [2l2+1, (2l1+1) * (2l3+1)]: Clebsch-Gordan table times e3nn's path weight
        self.register_buffer("coupling", coupling.permute(1, 0, 2).reshape(sh_dim, -1))
        self.weight_index = weight_index  # row of the radial MLP output that weights this path

    def forward(self, sender_irreps: List[Tensor], sh: Tensor, path_weights: List[Tensor], n_nodes: int) -> Tensor:
        neighbours = sh.shape[0] // n_nodes
        coupled = sh.narrow(1, self.sh_start, self.sh_dim) @ self.coupling  # [N*K, in_dim * out_dim]
        coupled = coupled.view(n_nodes, neighbours * self.in_dim, self.out_dim).transpose(1, 2)
        weighted = path_weights[self.weight_index].unsqueeze(1) * sender_irreps[self.in_slot]  # [N*K, in_dim, C]
        weighted = weighted.view(n_nodes, neighbours * self.in_dim, -1)
        return torch.bmm(coupled, weighted)  # [N, out_dim, C]


class Interaction(nn.Module):
    """One MACE interaction block (mace's RealAgnostic[Density][Residual]InteractionBlock).

    * ``residual``: the self-connection ``sc = SpeciesLinear(h)`` is computed from the input features and added after
      the product; otherwise the message itself goes through a per-element linear map.
    * ``density``: divide by ``1 + rho_i`` with ``rho_i = sum_j tanh((R(r_ij) . w)^2)`` instead of the average
      number of neighbours.

    Called in three steps (:meth:`MACE.layer_features`), so that the receivers can go block by block:
    :meth:`node_inputs` (per sender), :meth:`neighbour_sum` (per receiver, over its edges), :meth:`message`.
    """

    def __init__(self, linear_up: EquivariantLinear, radial_mlp: RadialMLP, paths: List[ConvolutionPath],
                 linear: EquivariantLinear, skip: SpeciesLinear, residual: bool, density_weight: Optional[Tensor],
                 avg_num_neighbors: float, apply_cutoff: bool, input_dims: List[int]) -> None:
        super().__init__()
        self.input_dims = input_dims  # 2l+1 of each irrep of the (linear_up) sender features
        self.linear_up = linear_up
        self.radial_mlp = radial_mlp
        self.paths = nn.ModuleList(paths)  # in the order of e3nn's output slots
        self.linear = linear
        self.skip = skip
        self.residual = residual
        self.use_density = density_weight is not None
        w = density_weight if density_weight is not None else torch.zeros(1, 1, dtype=linear.weights[0].dtype)
        self.register_buffer("density_weight", w / w.shape[0] ** 0.5)
        self.avg_num_neighbors = avg_num_neighbors
        self.apply_cutoff = apply_cutoff
        self.fused = False  # set by mace_ase.model.fused.enable_fused: eager runs use its chunked, fused kernels

    def convolution(self, sender_features: Tensor, sh: Tensor, edge_feats: Tensor, envelope: Tensor,
                    n_receivers: int) -> Tensor:
        """The reference neighbour sum of every path, concatenated: ``[n_receivers, D_out, C]`` (before the linear).

        ``sender_features`` are the (linear_up) features of each edge's sender, ``[n_receivers*K, D_in, C]``.
        """
        return self.convolve(sender_features, sh, self.path_weights(edge_feats, envelope, sender_features.shape[2]),
                             n_receivers)

    def path_weights(self, edge_feats: Tensor, envelope: Tensor, channels: int) -> Tensor:
        """Radial weights ``R(r)`` of every edge and path, ``[N*K, n_paths, C]`` (the radial MLP, Eq. 8)."""
        path_weights = self.radial_mlp(edge_feats)  # [N*K, n_paths * C]
        path_weights = path_weights.view(path_weights.shape[0], path_weights.shape[1] // channels, channels)
        if not self.apply_cutoff:
            path_weights = path_weights * envelope.unsqueeze(-1)
        return path_weights

    def convolve(self, sender_features: Tensor, sh: Tensor, path_weights: Tensor, n_receivers: int) -> Tensor:
        """The neighbour sum of every path for given radial weights ``[N*K, n_paths, C]``."""
        # Split once (one backward op each) rather than slicing per path (a zero-filled gradient per slice).
        sender_irreps = sender_features.split(self.input_dims, dim=1)  # each [N*K, 2l+1, C]
        weights_per_path = path_weights.unbind(1)  # each [N*K, C]
        pieces: List[Tensor] = []
        for path in self.paths:
            pieces.append(path(sender_irreps, sh, weights_per_path, n_receivers))
        return torch.cat(pieces, dim=1)

    @torch.jit.unused
    def fused_senders(self, h_up: Tensor, radial_rows: Optional[List[Tensor]]) -> Tensor:
        """The fast path's handle on ``h_up`` for the receiver blocks (eager mode only): see
        :func:`mace_ase.model.fused.layer_senders`."""
        from mace_ase.model.fused import layer_senders

        return layer_senders(self, h_up, radial_rows)

    @torch.jit.unused
    def fused_convolution(self, senders: Tensor, n_receivers: int, sh: Tensor, edge_feats: Tensor, envelope: Tensor,
                          sender: Tensor, radial_rows: Optional[List[Tensor]]) -> Tensor:
        """Same result as :meth:`convolution` (fast path, eager mode only): see :mod:`mace_ase.model.fused`."""
        from mace_ase.model.fused import fused_convolution

        return fused_convolution(self, senders, n_receivers, sh, edge_feats, envelope, sender, radial_rows)

    def node_inputs(self, h: Tensor, species_counts: List[int]) -> Tuple[Tensor, Optional[Tensor]]:
        """Per-node work before the neighbour sum: the sender features ``linear_up(h)`` and, in residual blocks, the
        self-connection ``sc`` (added after the product)."""
        sc: Optional[Tensor] = None
        if self.residual:
            sc = self.skip(h, species_counts)
        return self.linear_up(h), sc

    def senders(self, h_up: Tensor, radial_rows: Optional[List[Tensor]] = None) -> Tensor:
        """What :meth:`neighbour_sum` reads the sender features from: ``h_up`` itself, or on the fast path a handle
        through which the receiver blocks share ``h_up`` and accumulate its gradient (``radial_rows``: the layer's
        rows of :meth:`MACE.spline_rows` or :meth:`MACE.distinct_rows`)."""
        if self.fused and not torch.jit.is_scripting():
            return self.fused_senders(h_up, radial_rows)
        return h_up

    def neighbour_sum(self, senders: Tensor, n_receivers: int, sh: Tensor, edge_feats: Tensor, envelope: Tensor,
                      sender: Tensor, radial_rows: Optional[List[Tensor]] = None) -> Tensor:
        """The convolution of ``n_receivers`` receivers, ``[n_receivers, D_out, C]`` (eq. 8, before the linear), from
        their edge rows (``sh``, ``edge_feats``, ``envelope``, ``sender``: padded ``[n_receivers*K]`` layout);
        ``senders`` from :meth:`senders`; ``radial_rows`` (eager, fused runs only) places each edge in tabulated
        radial weights (:meth:`MACE.spline_rows`, :meth:`MACE.distinct_rows`)."""
        if self.fused and not torch.jit.is_scripting():
            return self.fused_convolution(senders, n_receivers, sh, edge_feats, envelope, sender, radial_rows)
        return self.convolution(senders.index_select(0, sender), sh, edge_feats, envelope, n_receivers)

    def message(self, convolved: Tensor, edge_feats: Tensor, envelope: Tensor, species_counts: List[int],
                edge_density: Optional[Tensor] = None) -> Tensor:
        """Per-node work after it (eq. 9): linear, normalisation, and the per-element map of non-residual blocks.

        ``convolved`` may be any contiguous run of receivers; ``edge_feats``/``envelope`` are then their edge rows.
        ``edge_density`` (density interactions, tabulated radial functions): each edge's term of the density,
        ``[N*K, 1]``, instead of computing it from ``edge_feats``.
        """
        n_nodes = convolved.shape[0]
        if self.use_density:
            if edge_density is None:
                edge_density = torch.tanh((edge_feats @ self.density_weight) ** 2)  # [N*K, 1]
                if not self.apply_cutoff:
                    edge_density = edge_density * envelope
            norm = edge_density.view(n_nodes, -1).sum(dim=1) + 1.0
        else:
            norm = torch.full((1,), self.avg_num_neighbors, dtype=convolved.dtype, device=convolved.device)
        message = self.linear(convolved, norm)  # [N, D, C] / norm, D = (l_max + 1)^2 components of the hidden irreps
        if not self.residual:
            message = self.skip(message, species_counts)
        return message


# --------------------------------------------------------------------------------------------------------------
# 4. Product: the symmetric contraction B = sum_nu W_Z . U_nu . A^(x nu), then a linear map and the residual
# --------------------------------------------------------------------------------------------------------------


class SymmetricContraction(nn.Module):
    """Correlation-order-3 product basis of one output irrep L, without ever forming the dense U tensors.

    The file's U_nu[m, a_1..a_nu, k] are 99.5 % zeros and symmetric in the a's. At construction they are reduced to
    ``coefficients[q, m, k]`` over the distinct monomials q = A_a (nu=1), A_a A_b (a<=b), A_a A_b A_c (a<=b<=c) that
    occur; the element's weights are folded in per forward call (``coefficients @ W_Z``, a few MFLOP), and the
    per-node work is one batched matmul over channels: ``B[c, m, i] = sum_q V_Z[c, m, q] P[c, q, i]``.
    """

    def __init__(self, singles: Tensor, pairs: Tensor, triples_pair: Tensor, triples_single: Tensor,
                 coefficients: Tensor, weights: Tensor, out_dim: int) -> None:
        super().__init__()
        self.register_buffer("singles", singles)  # [Q1] component a of each degree-1 monomial
        self.register_buffer("pairs", pairs)  # [2, Qp] components (a, b) of every needed degree-2 product
        self.register_buffer("triples_pair", triples_pair)  # [Q3] which pair (a, b) starts the triple
        self.register_buffer("triples_single", triples_single)  # [Q3] its third component c
        self.register_buffer("coefficients", coefficients)  # [Q*M, K], Q = Q1 + Qp + Q3 monomials, K all nu's paths
        self.weights = nn.Parameter(weights, requires_grad=False)  # [n_elements, K, C] (all nu concatenated)
        self.out_dim = out_dim

    def forward(self, a_t: Tensor, species_counts: List[int]) -> Tensor:
        """``a_t``: the interaction output as ``[C, D, N]`` (D = (l_max + 1)^2, 16 for l_max = 3); returns
        ``[C, M, N]``.

        Monomials are gathered along the middle axis, which copies whole contiguous rows of N values.
        """
        pair_products = a_t.index_select(1, self.pairs[0]) * a_t.index_select(1, self.pairs[1])
        monomials = torch.cat(
            [
                a_t.index_select(1, self.singles),
                pair_products,
                pair_products.index_select(1, self.triples_pair) * a_t.index_select(1, self.triples_single),
            ],
            dim=1,
        )  # [C, Q, N]
        channels = a_t.shape[0]
        pieces: List[Tensor] = []
        start = 0
        for element, count in enumerate(species_counts):
            if count == 0:
                continue
            # V_Z[c, m, q] = sum_k coefficients[q, m, k] W_Z[k, c]
            folded = self.coefficients @ self.weights[element]  # [Q*M, C]
            folded = folded.view(-1, self.out_dim, channels).permute(2, 1, 0)  # [C, M, Q]
            pieces.append(torch.bmm(folded, monomials.narrow(2, start, count)))  # [C, M, count]
            start += count
        return torch.cat(pieces, dim=2)


class Product(nn.Module):
    """mace's EquivariantProductBasisBlock: symmetric contractions (one per output irrep), linear, + residual."""

    def __init__(self, contractions: List[SymmetricContraction], linear: EquivariantLinear, use_sc: bool) -> None:
        super().__init__()
        self.contractions = nn.ModuleList(contractions)
        self.linear = linear
        self.use_sc = use_sc
        self.fused = False  # set by mace_ase.model.fused.enable_fused: eager CPU runs use its compiled kernel

    @torch.jit.unused
    def fused_basis(self, a: Tensor, species_counts: List[int]) -> Tensor:
        """Same result as the reference contractions below (compiled CPU kernel): see :mod:`mace_ase.model.fused`."""
        from mace_ase.model.fused import fused_symmetric_contractions

        return fused_symmetric_contractions(self, a, species_counts)

    def forward(self, a: Tensor, sc: Optional[Tensor], species_counts: List[int]) -> Tensor:
        if self.fused and not torch.jit.is_scripting():
            basis = self.fused_basis(a, species_counts)
        else:
            a_t = a.permute(2, 1, 0).contiguous()  # [C, D, N]
            pieces: List[Tensor] = []
            for contraction in self.contractions:
                pieces.append(contraction(a_t, species_counts))
            basis = torch.cat(pieces, dim=1).permute(2, 1, 0)  # [N, D_out, C]
        h = self.linear(basis)
        if self.use_sc and sc is not None:
            h = h + sc
        return h


# --------------------------------------------------------------------------------------------------------------
# 5. Readouts
# --------------------------------------------------------------------------------------------------------------


class Readout(nn.Module):
    """Node energy of one layer from its scalar channels: linear, or linear-SiLU-linear (last layer).

    For multi-head models the hidden units are grouped head-major; only the selected head's group contributes.
    """

    def __init__(self, first: Tensor, second: Optional[Tensor], activation_scale: float, mask_groups: int) -> None:
        super().__init__()
        self.first = nn.Parameter(first, requires_grad=False)  # [C, n_heads] or [C, hidden]
        self.nonlinear = second is not None
        placeholder = torch.zeros(1, 1, dtype=first.dtype)  # unused: keeps the attribute's type for TorchScript
        self.second = nn.Parameter(second if second is not None else placeholder, requires_grad=False)
        self.activation_scale = activation_scale
        self.mask_groups = mask_groups  # hidden units form this many head-major groups (1: no masking)

    def forward(self, h: Tensor, head: int) -> Tensor:
        scalars = h[:, 0, :]  # the 0e components, [N, C]
        if not self.nonlinear:
            return (scalars @ self.first)[:, head]
        hidden = torch.nn.functional.silu(scalars @ self.first) * self.activation_scale
        second = self.second[:, head]
        if self.mask_groups > 1:  # mace's head mask: only the units of the node's head contribute
            width = hidden.shape[1] // self.mask_groups
            hidden = hidden.narrow(1, head * width, width)
            second = second.narrow(0, head * width, width)
        return hidden @ second


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------


class MACE(nn.Module):
    """A MACE potential (mace-torch's ScaleShiftMACE / MACE), inference only.

    Call with the graph of one structure; see :meth:`forward`. Build it with :func:`mace_ase.load_model`.
    """

    __constants__ = ["use_zbl"]  # a compile-time constant: TorchScript drops the ZBL branch of models without it

    def __init__(self, atomic_numbers: Tensor, r_max: float, max_ell: int, heads: List[str], embedding: Tensor,
                 atomic_energies: Tensor, scale: Tensor, shift: Tensor, radial: RadialEmbedding,
                 interactions: List[Interaction], products: List[Product], readouts: List[Readout],
                 readout_layers: List[int], zbl: Optional[ZBLRepulsion]) -> None:
        super().__init__()
        self.register_buffer("atomic_numbers", atomic_numbers)  # [n_elements] Z of each model element
        self.register_buffer("r_max", torch.tensor(r_max, dtype=embedding.dtype))  # Å
        # Not used by the forward pass: the LAMMPS `pair_style mace` contract needs it (ghost shell = T * r_max).
        self.register_buffer("num_interactions", torch.tensor(len(interactions)))
        self.r_max_value = r_max
        self.max_ell = max_ell
        self.heads = heads
        self.embedding = nn.Parameter(embedding, requires_grad=False)  # [n_elements, C], 1/sqrt(n_el) folded in
        self.register_buffer("atomic_energies", atomic_energies)  # [n_heads, n_elements] eV
        self.register_buffer("scale", scale)  # [n_heads]
        self.register_buffer("shift", shift)  # [n_heads] eV
        self.radial = radial
        self.interactions = nn.ModuleList(interactions)
        self.products = nn.ModuleList(products)
        self.readouts = nn.ModuleList(readouts)
        self.readout_layers = readout_layers  # which layer's features each readout reads
        self.use_zbl = zbl is not None
        # tabulated radial weights (mace_ase.model.radial_spline: radial="auto" or "spline"); eager runs only
        self.use_radial_spline = False
        self.radial_spline = None  # the RadialSpline object when on
        self.fused_geometry = False  # spherical harmonics by the CPU kernel (mace_ase.model.fused._set); eager only
        self.node_block = NODE_BLOCK
        self.fused_blocks = False  # receiver blocks of the fast path (mace_ase.model.fused._set); else one block
        self.zbl = zbl if zbl is not None else nn.Identity()

    def edge_geometry(self, vectors: Tensor, species: Tensor, sender: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Length ``[N*K, 1]`` (Å) and sender/receiver atomic numbers of every edge in the padded layout."""
        z = self.atomic_numbers[species]
        # max(.., 1): an empty graph has no rows to repeat (and no ZeroDivisionError)
        z_receiver = z.repeat_interleave(sender.shape[0] // max(species.shape[0], 1))
        return torch.linalg.vector_norm(vectors, dim=-1, keepdim=True), z[sender], z_receiver

    @torch.jit.unused
    def compiling(self) -> bool:
        """Under ``torch.compile``/``torch.export`` (eager runs only)."""
        return torch.compiler.is_compiling()

    def node_blocks(self, species_counts: List[int], one_block: bool) -> List[List[int]]:
        """Runs of receivers processed together by :meth:`layer_features`: each block's element counts (model order).

        On the CPU fast path, near-equal blocks of at most :attr:`node_block` nodes: each step's intermediates then
        stay in cache from one step to the next instead of each step streaming a whole-system ``[N, D, C]`` tensor
        from memory (the time per atom grew by 80 % from 1,000 to 100,000 atoms without it). A block may hold several
        elements (nodes are sorted by element). ``one_block``: the reference path (its gathers would give each block a
        whole-system gradient), a GPU (large launches) and ``torch.export`` (symbolic shapes).
        """
        n_nodes = sum(species_counts)
        if one_block or self.node_block <= 0 or n_nodes <= self.node_block:
            return [species_counts]
        n_blocks = (n_nodes + self.node_block - 1) // self.node_block
        blocks: List[List[int]] = []
        start = 0
        for b in range(n_blocks):
            end = start + n_nodes // n_blocks + (1 if b < n_nodes % n_blocks else 0)
            counts: List[int] = []
            first = 0  # the element's first node
            for count in species_counts:  # the part of each element's run [first, first + count) in [start, end)
                counts.append(max(0, min(end, first + count) - max(start, first)))
                first += count
            blocks.append(counts)
            start = end
        return blocks

    def layer_features(self, vectors: Tensor, lengths: Tensor, z_sender: Tensor, z_receiver: Tensor,
                       species: Tensor, sender: Tensor, species_counts: List[int]) -> List[List[Tensor]]:
        """Node features ``h^(t)`` after each layer's product, per layer the ``[n_b, D_t, C]`` tensor of each node
        block of :meth:`node_blocks` (sorted, padded layout).

        The one message-passing loop, shared by :meth:`node_energies` and :meth:`node_features`: per layer the
        per-node work before the neighbour sum (all blocks), then block by block the neighbour sum of the block's
        receivers and the per-node work after it (interaction, eq. 8-9; product, eq. 10-11).
        """
        if self.fused_geometry and not torch.jit.is_scripting():
            sh = self.fused_spherical_harmonics(vectors, lengths)  # the same, by the CPU kernel (eager runs)
        else:
            sh = spherical_harmonics(vectors / lengths.clamp_min(1e-12), self.max_ell)  # [N*K, (max_ell+1)^2]
        radial_rows: Optional[List[Tensor]] = None
        if not torch.jit.is_scripting():
            radial_rows = self.spline_rows(lengths, z_sender, z_receiver)
        edge_densities: Optional[Tensor] = None  # density interactions' edge terms, tabulated: [N*K, n_density]
        if radial_rows is not None:
            # the tables hold the radial weights and densities: only the envelope (which edges are active) is needed
            envelope = polynomial_envelope(lengths, self.radial.r_max, self.radial.p)
            edge_feats = lengths.new_zeros(lengths.shape[0], 0)
            if not torch.jit.is_scripting():  # (scripted code never has tables)
                if self.density_normalised():
                    edge_densities = self.spline_densities(radial_rows[0], radial_rows[1], envelope)
        else:
            edge_feats, envelope = self.radial(lengths, z_sender, z_receiver)  # [N*K, n_basis], [N*K, 1]
        if radial_rows is None and not torch.jit.is_scripting():
            radial_rows = self.distinct_rows(lengths, z_sender, z_receiver, envelope)
        one_block = vectors.is_cuda or not self.fused_blocks
        if not torch.jit.is_scripting():
            one_block = one_block or self.compiling()  # torch.export: shapes are symbolic, blocks would be guards
        blocks = self.node_blocks(species_counts, one_block)
        sizes = [sum(counts) for counts in blocks]
        neighbours = sender.shape[0] // max(species.shape[0], 1)
        edge_sizes = [size * neighbours for size in sizes]
        # The edge rows of each block, split once: a split's backward pass is one concatenation, where a slice per
        # block would add a zero-filled whole-system gradient per block.
        sh_blocks = sh.split(edge_sizes)
        feats_blocks = edge_feats.split(edge_sizes)
        envelope_blocks = envelope.split(edge_sizes)
        sender_blocks = sender.split(edge_sizes)
        rows_blocks: List[Optional[List[Tensor]]] = []
        if radial_rows is not None:  # (u, row) of each edge; the exact mode's further entries are per distinct edge
            for u_b, row_b in zip(radial_rows[0].split(edge_sizes), radial_rows[1].split(edge_sizes)):
                rows_blocks.append([u_b, row_b])
        else:
            for _ in blocks:
                rows_blocks.append(None)
        density_blocks: List[Tensor] = []
        if edge_densities is not None:
            density_blocks = edge_densities.split(edge_sizes)
        h_blocks = self.embedding[species].unsqueeze(1).split(sizes)  # [n_b, 1, C]: layer-0 features are scalars
        features: List[List[Tensor]] = []
        density_column = 0  # the tables' column of the next density interaction
        for interaction, product in zip(self.interactions, self.products):
            inputs = [interaction.node_inputs(h, counts) for h, counts in zip(h_blocks, blocks)]
            senders = interaction.senders(_join([h_up for h_up, _ in inputs]), radial_rows)
            new_blocks: List[Tensor] = []
            for b, counts in enumerate(blocks):
                convolved = interaction.neighbour_sum(senders, sizes[b], sh_blocks[b], feats_blocks[b],
                                                      envelope_blocks[b], sender_blocks[b], rows_blocks[b])
                edge_density: Optional[Tensor] = None
                if len(density_blocks) > 0 and interaction.use_density:
                    edge_density = density_blocks[b].narrow(1, density_column, 1)
                message = interaction.message(convolved, feats_blocks[b], envelope_blocks[b], counts, edge_density)
                new_blocks.append(product(message, inputs[b][1], counts))
            if interaction.use_density:
                density_column += 1
            h_blocks = new_blocks
            features.append(h_blocks)
        return features

    @torch.jit.unused
    def fused_spherical_harmonics(self, vectors: Tensor, lengths: Tensor) -> Tensor:
        """:func:`spherical_harmonics` of the edge directions by the compiled CPU kernel (see
        :mod:`mace_ase.model.fused`); the reference code under ``torch.compile``/``torch.export`` and off the CPU."""
        if torch.compiler.is_compiling() or vectors.device.type != "cpu":  # e.g. moved to a GPU after loading
            return spherical_harmonics(vectors / lengths.clamp_min(1e-12), self.max_ell)
        from mace_ase.model.fused import fused_spherical_harmonics

        return fused_spherical_harmonics(vectors, lengths, self.max_ell)

    @torch.jit.unused
    def spline_rows(self, lengths: Tensor, z_sender: Tensor, z_receiver: Tensor) -> Optional[List[Tensor]]:
        """Each edge's ``[u, interval]`` in the spline tables of the radial weights, for the fused kernel
        (:mod:`mace_ase.model.radial_spline`); None: this call evaluates the radial MLP (exact mode, ``"auto"`` off
        the tables: Hessians or past the table budget)."""
        if self.use_radial_spline:
            return self.radial_spline.rows(lengths, z_sender, z_receiver)  # type: ignore[union-attr]
        return None

    @torch.jit.unused
    def spline_densities(self, u: Tensor, interval: Tensor, envelope: Tensor) -> Tensor:
        """Each edge's density term of every density interaction, ``[N*K, n_density]``, from the spline tables at
        the edges' :meth:`spline_rows` (:meth:`~mace_ase.model.radial_spline.RadialSpline.densities`); exactly zero
        where the envelope is (padding, r >= r_max: their table rows are arbitrary)."""
        active = envelope != 0  # [N*K, 1]
        u = torch.where(active, u, torch.zeros_like(u))  # finite polynomials everywhere
        densities = self.radial_spline.densities(u, interval)
        return torch.where(active, densities, torch.zeros_like(densities))

    @torch.jit.unused
    def distinct_rows(self, lengths: Tensor, z_sender: Tensor, z_receiver: Tensor, envelope: Tensor
                      ) -> Optional[List[Tensor]]:
        """Each edge's row among the distinct edges whose radial MLP is evaluated once (exact mode, see
        :func:`mace_ase.model.fused.distinct_radial_rows`); None: per edge."""
        from mace_ase.model.fused import distinct_radial_rows

        return distinct_radial_rows(self, lengths, z_sender, z_receiver, envelope)

    def density_normalised(self) -> bool:
        """Whether an interaction divides its messages by the learned neighbour density (a function of the radial
        basis: computed from it, or read from the spline tables)."""
        for interaction in self.interactions:
            if interaction.use_density:
                return True
        return False

    def node_energies(self, vectors: Tensor, species: Tensor, sender: Tensor, head: int, species_counts: List[int]
                      ) -> Tensor:
        """Interaction energy of every node (eV, scale and shift applied, E0 excluded).

        Nodes are sorted by element (``species_counts[e]`` nodes of element e, in model order). Edges are in the padded
        layout of :meth:`pad_edges`: ``vectors`` and ``sender`` have N*K rows, rows i*K..i*K+K-1 belong to receiver i.
        """
        n_nodes = species.shape[0]
        lengths, z_sender, z_receiver = self.edge_geometry(vectors, species, sender)
        node_energy = torch.zeros(n_nodes, dtype=vectors.dtype, device=vectors.device)
        if self.use_zbl:
            node_energy = node_energy + self.zbl(lengths, z_sender, z_receiver).view(n_nodes, -1).sum(dim=1)
        features = self.layer_features(vectors, lengths, z_sender, z_receiver, species, sender, species_counts)
        for index, readout in enumerate(self.readouts):
            node_energy = node_energy + _join([readout(h, head) for h in features[self.readout_layers[index]]])
        return self.scale[head] * node_energy + self.shift[head]

    def node_features(self, vectors: Tensor, edge_index: Tensor, species: Tensor) -> List[Tensor]:
        """Node features after each layer, in input order: a list of ``[N, D_t, C]`` tensors (``D_t = sum (2l+1)``
        over the layer's irreps, l = 0 first; channel last). These are mace's descriptors (``node_feats``).

        Same graph inputs as :meth:`graph_energies` (edge vectors in Å, ``edge_index`` (sender, receiver)).
        """
        order, inverse, species_sorted, counts, sender, receiver = self.group_by_element(species, edge_index)
        padded_vectors, padded_sender = self.pad_edges(vectors, sender, receiver, species.shape[0])
        lengths, z_sender, z_receiver = self.edge_geometry(padded_vectors, species_sorted, padded_sender)
        features = self.layer_features(padded_vectors, lengths, z_sender, z_receiver, species_sorted, padded_sender,
                                       counts)
        return [_join(blocks)[inverse] for blocks in features]

    def group_by_element(self, species: Tensor, edge_index: Tensor
                         ) -> Tuple[Tensor, Tensor, Tensor, List[int], Tensor, Tensor]:
        """Sort nodes by element (so per-element weights act on contiguous slices) and renumber the edges.

        Returns ``order`` (sorted -> original), ``inverse`` (original -> sorted), the sorted species, the count of
        each element, and the renumbered sender and receiver indices.
        """
        order = torch.argsort(species, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.shape[0], device=order.device)
        counts: List[int] = torch.bincount(species, minlength=self.atomic_numbers.shape[0]).tolist()
        return order, inverse, species[order], counts, inverse[edge_index[0]], inverse[edge_index[1]]

    def pad_edges(self, vectors: Tensor, sender: Tensor, receiver: Tensor, n_nodes: int) -> Tuple[Tensor, Tensor]:
        """Lay the edges out as a ``[N, K]`` grid by receiver (K = the largest neighbour count).

        Empty places get a dummy edge from the atom to itself of length 2 r_max + 10 Å: beyond the cutoff (and beyond
        any ZBL range, a sum of covalent radii) its radial features, ZBL term and density are exactly zero, so it
        contributes nothing, and no gradient flows to it.
        Returns the padded vectors (differentiable in ``vectors``) and senders, both with N*K rows.
        """
        counts = torch.bincount(receiver, minlength=n_nodes)
        neighbours = max(int(counts.max()) if receiver.shape[0] > 0 else 0, 1)
        order = torch.argsort(receiver, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        sorted_receiver = receiver[order]
        slot = torch.arange(receiver.shape[0], device=receiver.device) - starts[sorted_receiver]
        place = torch.empty_like(order)
        place[order] = sorted_receiver * neighbours + slot
        padded_sender = torch.arange(n_nodes, device=sender.device).repeat_interleave(neighbours)
        padded_sender[place] = sender
        dummy = torch.zeros(1, 3, dtype=vectors.dtype, device=vectors.device)
        dummy[0, 0] = 2.0 * self.r_max_value + 10.0
        padded_vectors = dummy.expand(n_nodes * neighbours, 3).index_copy(0, place, vectors)
        return padded_vectors, padded_sender

    def graph_energies(self, vectors: Tensor, edge_index: Tensor, species: Tensor, head: int = 0) -> Tensor:
        """Interaction energy of every node (eV, E0 excluded), in input order, from the graph's edge vectors.

        This is the core every caller shares (ASE calculator, batched evaluation, LAMMPS): a graph given as edge
        vectors ``[E, 3]`` (Å, ``x_receiver - x_sender`` plus any lattice translation), ``edge_index`` ``[2, E]``
        (sender, receiver) and the species index of each node. Several structures are one graph with disjoint
        node sets. Differentiable in ``vectors``.
        """
        order, inverse, species_sorted, counts, sender, receiver = self.group_by_element(species, edge_index)
        padded_vectors, padded_sender = self.pad_edges(vectors, sender, receiver, species.shape[0])
        return self.node_energies(padded_vectors, species_sorted, padded_sender, head, counts)[inverse]

    def energy_and_edge_gradients(self, vectors: Tensor, edge_index: Tensor, species: Tensor, head: int = 0,
                                  node_weights: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Node interaction energies ``[N]`` (eV) and ``dE/d vectors`` ``[E, 3]`` (eV/Å) in one backward pass.

        ``E = sum_i w_i E_i`` with ``node_weights`` ``w`` (default all ones): LAMMPS passes 1 for its local atoms and
        0 for ghosts, so the pair gradients are those of the local energy. Forces follow as
        ``F_i = sum_{sender=i} g_e - sum_{receiver=i} g_e`` and the virial as ``sum_e r_e (x) g_e``.
        """
        vectors = vectors.detach().requires_grad_(True)
        node_inter = self.graph_energies(vectors, edge_index, species, head)
        total = node_inter.sum() if node_weights is None else (node_inter * node_weights).sum()
        grads = torch.autograd.grad([total], [vectors], allow_unused=True)
        edge_grad = grads[0]
        if edge_grad is None:  # no edges at all: isolated atoms
            edge_grad = torch.zeros_like(vectors)
        return node_inter.detach(), edge_grad

    def interaction_energy(self, positions: Tensor, cell: Tensor, species: Tensor, edge_index: Tensor,
                           unit_shifts: Tensor, head: int = 0) -> Tensor:
        """Total interaction energy (eV, E0 excluded), differentiable in ``positions`` (e.g. for Hessians)."""
        vectors = positions[edge_index[1]] - positions[edge_index[0]] + unit_shifts @ cell
        return self.graph_energies(vectors, edge_index, species, head).sum()

    def forward(self, positions: Tensor, cell: Tensor, species: Tensor, edge_index: Tensor, unit_shifts: Tensor,
                head: int = 0, compute_stress: bool = True, compute_atomic_stresses: bool = False
                ) -> Dict[str, Tensor]:
        """Energy, forces and stress of one structure.

        Args:
            positions: ``[N, 3]`` Å, in the model's dtype.
            cell: ``[3, 3]`` Å, lattice vectors as rows (any values along non-periodic directions).
            species: ``[N]`` int64 index of each atom's element in :attr:`atomic_numbers`.
            edge_index: ``[2, E]`` int64 (sender, receiver) pairs within ``r_max``, both directions present.
            unit_shifts: ``[E, 3]`` integer lattice translations (as floats) of the receiver image: edge vector =
                ``positions[receiver] - positions[sender] + unit_shifts @ cell``.
            head: index in :attr:`heads`.
            compute_stress: also return the stress (needs a cell of non-zero volume).
            compute_atomic_stresses: also return ``atomic_stresses`` ``[N, 3, 3]`` (eV/Å³): each edge's virial
                ``sym(r_e (x) g_e)`` split half to its sender and half to its receiver, over the cell volume (mace's
                definition); they sum to ``stress``. Needs a cell of non-zero volume.

        Returns:
            ``energy`` (0-d, eV), ``node_energy`` ``[N]`` (float64, eV, without E0), ``atomic_energies`` ``[N]``
            (float64 E0 of each atom, eV), ``forces`` ``[N, 3]`` (eV/Å), ``stress`` ``[3, 3]`` (eV/Å³, zeros when
            not computed).
        """
        sender, receiver = edge_index[0], edge_index[1]
        vectors = positions[receiver] - positions[sender] + unit_shifts @ cell
        node_inter, edge_grad = self.energy_and_edge_gradients(vectors, edge_index, species, head)
        node_e0 = self.atomic_energies[head][species]
        energy = node_e0.sum() + node_inter.sum()
        forces = torch.zeros_like(positions).index_add(0, sender, edge_grad).index_add(0, receiver, -edge_grad)

        stress = torch.zeros(3, 3, dtype=positions.dtype, device=positions.device)
        if compute_stress:
            virial = vectors.transpose(0, 1) @ edge_grad  # sum_e r_e (x) dE/dr_e
            virial = 0.5 * (virial + virial.transpose(0, 1))
            stress = virial / torch.abs(torch.linalg.det(cell))

        results = {
            "energy": energy.detach(),
            "node_energy": node_inter.to(torch.float64),
            "atomic_energies": node_e0.to(torch.float64),
            "forces": forces,
            "stress": stress,
        }
        if compute_atomic_stresses:
            edge_virial = vectors.unsqueeze(2) * edge_grad.unsqueeze(1)  # [E, 3, 3] r_e (x) g_e
            edge_virial = 0.5 * (edge_virial + edge_virial.transpose(1, 2))
            atom_virial = torch.zeros(positions.shape[0], 3, 3, dtype=positions.dtype, device=positions.device)
            atom_virial = atom_virial.index_add(0, sender, edge_virial).index_add(0, receiver, edge_virial)
            results["atomic_stresses"] = 0.5 * atom_virial / torch.abs(torch.linalg.det(cell))
        return results
