"""Turn the inert records of an official MACE file into our :class:`~mace_ase.model.mace.MACE` module.

Everything structural is read from the file itself (irreps, e3nn instructions and their path weights, U matrices,
buffers), so the conversion has no hidden assumptions about widths or orders; constants that e3nn derives at
construction time (Clebsch-Gordan tables) come from ``e3nn.o3.wigner_3j``. Constant factors (path weights,
1/sqrt(fan_in)) are folded into the weights here, once, in float64.

Supported (refused with a clear error otherwise): ``ScaleShiftMACE`` and ``MACE`` with
``RealAgnostic[Density][Residual]InteractionBlock`` layers, Bessel radial basis with polynomial envelope, optional
Agnesi distance transform, optional ZBL repulsion, natural-parity hidden irreps (l <= 3), correlation <= 3,
SiLU gates, one or several heads. Not supported: MACE-MH / OMOL non-linear blocks, charge/spin embeddings, cuEq-
converted files, dipole/polarisability models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mace_ase.io.model_file import FunctionRef, ModelFile, ModelFileError, PickledObject, read_model_file
from mace_ase.options import resolve_device, resolve_dtype  # noqa: F401 (resolve_dtype: also imported from here)
from mace_ase.model.mace import (
    MACE,
    ConvolutionPath,
    EquivariantLinear,
    Interaction,
    Product,
    RadialEmbedding,
    RadialMLP,
    Readout,
    SpeciesLinear,
    SymmetricContraction,
    ZBLRepulsion,
)


__all__ = ["Architecture", "UnsupportedModelError", "hyperparameters", "read_architecture", "build_model", "load_model",
           "export_torchscript", "Irreps"]

Irreps = list  # list of (mul, l, parity) triples

_SUPPORTED_ROOTS = {"mace.modules.models.ScaleShiftMACE", "mace.modules.models.MACE"}
_INTERACTIONS = {  # class -> (residual, density)
    "RealAgnosticInteractionBlock": (False, False),
    "RealAgnosticResidualInteractionBlock": (True, False),
    "RealAgnosticDensityInteractionBlock": (False, True),
    "RealAgnosticDensityResidualInteractionBlock": (True, True),
}
_SILU = {"torch.nn.functional.silu", "torch._C._nn.silu"}


class UnsupportedModelError(ModelFileError):
    """The file is a MACE model, but of an architecture this package does not implement."""


def _unsupported(path: str, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{path!r}: {what} is not supported by mace-ase. Supported: ScaleShiftMACE/MACE with RealAgnostic"
        "[Density][Residual]InteractionBlock layers (the MACE-MP-0 family, MPA-0, OMAT-0, MATPES-0, MACE-OFF); "
        "use mace-torch for this model."
    )


# --------------------------------------------------------------------------------------------------------------
# Irreps and e3nn constants
# --------------------------------------------------------------------------------------------------------------


def parse_irreps(value: Any) -> Irreps:
    """e3nn irreps as stored in a file (tuples ``((mul, (l, p)), ...)`` or a string ``"16x0e+16x1o"``)."""
    if isinstance(value, str):
        out = []
        for term in value.replace(" ", "").split("+"):
            if not term:
                continue
            mul, _, irrep = term.rpartition("x")
            out.append((int(mul) if mul else 1, int(irrep[:-1]), 1 if irrep[-1] == "e" else -1))
        return out
    return [(int(mul), int(ir[0]), int(ir[1])) for mul, ir in value]


def component_offsets(irreps: Irreps) -> list[int]:
    """Start of each irrep slot along the component axis of our ``[N, D, C]`` layout."""
    offsets, total = [], 0
    for _, l, _ in irreps:
        offsets.append(total)
        total += 2 * l + 1
    return offsets


def _wigner_3j(l1: int, l2: int, l3: int) -> torch.Tensor:
    from e3nn import o3  # construction-time constant only

    return o3.wigner_3j(l1, l2, l3, dtype=torch.float64)


def _single_multiplicity(irreps: Irreps, path: str, where: str) -> int:
    muls = {mul for mul, _, _ in irreps}
    if len(muls) != 1:
        raise _unsupported(path, f"irreps with different multiplicities ({where})")
    for _, l, p in irreps:
        if p != (-1) ** l:
            raise _unsupported(path, f"non-natural parity irreps such as {l}{'e' if p == 1 else 'o'} ({where})")
    return muls.pop()


# --------------------------------------------------------------------------------------------------------------
# e3nn modules -> our blocks
# --------------------------------------------------------------------------------------------------------------


def linear_blocks(record: PickledObject) -> dict[tuple[int, int], torch.Tensor]:
    """``o3.Linear``: ``{(i_in, i_out): W * path_weight}`` with W of shape ``[mul_in, mul_out]``."""
    weight = record.tensor("weight").to(torch.float64)
    irreps_in, irreps_out = parse_irreps(record.get("irreps_in")), parse_irreps(record.get("irreps_out"))
    blocks, offset = {}, 0
    for instruction in record.get("instructions"):
        i_in, i_out, path_weight = int(instruction[0]), int(instruction[1]), float(instruction[3])
        mul_in, mul_out = irreps_in[i_in][0], irreps_out[i_out][0]
        blocks[(i_in, i_out)] = weight[offset : offset + mul_in * mul_out].view(mul_in, mul_out) * path_weight
        offset += mul_in * mul_out
    if offset != weight.numel():
        raise ModelFileError(f"o3.Linear weight has {weight.numel()} entries, instructions need {offset}")
    return blocks


def linear_input_segments(irreps_in: Irreps, layout: Irreps, path: str) -> list[list[tuple[int, int, int, int]]]:
    """Where each input block of an ``o3.Linear`` lies in the features it is applied to.

    ``irreps_in`` is the linear's own input irreps (as stored in the file), ``layout`` the irreps of the tensor it
    reads, one slot per irrep as our ``[N, D, C]`` features hold it. Both may split a run of equal irreps into blocks
    differently: mace-torch 0.3.0-0.3.4 give the interaction's ``linear`` the *simplified* irreps of the tensor product
    output (``16x0e+24x1o`` where the product writes ``8x0e+8x0e+8x1o+8x1o+8x1o``). In e3nn's flat layout a block
    ``(m1 + m2) x l`` is the block ``m1 x l`` followed by ``m2 x l`` (channel-major, component-minor), so the two
    lists describe the same memory and are matched channel by channel.

    Returns, per block of ``irreps_in``, its pieces ``(slot, first channel in the slot, first channel in the block,
    channel count)``. Raises :class:`ModelFileError` if the two lists are not splits of the same irreps sequence.
    """
    segments: list[list[tuple[int, int, int, int]]] = []
    slot, used = 0, 0  # the layout slot being consumed and how many of its channels are already taken
    for mul, l, p in irreps_in:
        pieces, taken = [], 0
        while taken < mul:
            if slot >= len(layout) or layout[slot][1:] != (l, p):
                raise ModelFileError(
                    f"{path!r}: an o3.Linear reads irreps {_irreps_string(irreps_in)} from features laid out as "
                    f"{_irreps_string(layout)}; these are not the same irreps (the file is inconsistent)"
                )
            count = min(mul - taken, layout[slot][0] - used)
            pieces.append((slot, used, taken, count))
            taken += count
            used += count
            if used == layout[slot][0]:
                slot, used = slot + 1, 0
        segments.append(pieces)
    if slot != len(layout) or used != 0:
        raise ModelFileError(
            f"{path!r}: an o3.Linear reads irreps {_irreps_string(irreps_in)}, fewer than the "
            f"{_irreps_string(layout)} of its input (the file is inconsistent)"
        )
    return segments


def build_linear(record: PickledObject, path: str, layout: Irreps | None = None) -> EquivariantLinear:
    """An :class:`EquivariantLinear` from an ``o3.Linear`` record.

    ``layout``: the irreps of the features the linear is applied to, as the producing block writes them (default: the
    linear's own ``irreps_in``); see :func:`linear_input_segments` for files where the two differ.
    """
    irreps_in, irreps_out = parse_irreps(record.get("irreps_in")), parse_irreps(record.get("irreps_out"))
    layout = irreps_in if layout is None else layout
    channels = _single_multiplicity(layout, path, "linear input")
    _single_multiplicity(irreps_out, path, "linear output")
    segments = linear_input_segments(irreps_in, layout, path)
    offsets_in = component_offsets(layout)
    blocks = linear_blocks(record)
    gathers, weights, dims = [], [], []
    for i_out, (mul_out, l_out, _) in enumerate(irreps_out):
        per_slot: dict[int, torch.Tensor] = {}  # input slot -> its [C_in, C_out] rows of the weight
        for (i_in, j), block in blocks.items():
            if j != i_out:
                continue
            for slot, slot_start, block_start, count in segments[i_in]:
                matrix = per_slot.setdefault(slot, torch.zeros(channels, mul_out, dtype=torch.float64))
                matrix[slot_start : slot_start + count] = block[block_start : block_start + count]
        if not per_slot:
            raise _unsupported(path, "an o3.Linear output without input")
        sources = sorted(per_slot)
        dim = 2 * l_out + 1
        components = [offsets_in[i] + m for i in sources for m in range(dim)]
        gathers.append(torch.tensor(components, dtype=torch.long))
        weights.append(torch.cat([per_slot[i] for i in sources], dim=0))
        dims.append(dim)
    return EquivariantLinear(gathers, weights, dims)


def build_radial_mlp(record: PickledObject) -> RadialMLP:
    """e3nn ``FullyConnectedNet`` (``layer0``, ``layer1``, ...) with normalised SiLU on hidden layers."""
    layers = [record.module(name) for name in sorted(record.modules, key=lambda n: int(n.replace("layer", "")))]
    weights, scale = [], 1.0
    for layer in layers:
        if float(layer.get("var_in", 1)) != 1.0 or float(layer.get("var_out", 1)) != 1.0:
            raise ModelFileError("radial MLP layer with var_in/var_out != 1 is not supported")
        weights.append(layer.tensor("weight").to(torch.float64))
        act = layer.modules.get("act")
        if act is not None:
            scale = _activation_scale(act)
    return RadialMLP(weights, scale)


def _activation_scale(act: PickledObject) -> float:
    """SiLU normalised to unit second moment (e3nn normalize2mom): returns its constant ``cst``."""
    function = act.get("f")
    if not (isinstance(function, FunctionRef) and function.qualname in _SILU):
        raise UnsupportedModelError(f"activation {function!r} is not supported (only SiLU)")
    if act.get("_is_id", False):  # e3nn skips the multiplication when the constant is within 1e-4 of 1
        return 1.0
    # every e3nn normalize2mom stores `cst` (computed at construction from seeded normals): never recompute or guess
    return float(_required(act, "cst"))


def _required(record: PickledObject, name: str) -> Any:
    """Attribute ``name`` of ``record``; a ModelFileError naming it when the file lacks it (no silent default)."""
    value = record.get(name)
    if value is None:
        raise ModelFileError(f"{record.short_class_name} has no attribute {name!r}, which the architecture needs; "
                             "the file is incomplete or was not written by mace-torch")
    return value


def build_species_linear(record: PickledObject, path: str) -> SpeciesLinear:
    """``o3.FullyConnectedTensorProduct(x, one-hot element)`` -> per-element matrices for each l."""
    irreps_in1, irreps_in2 = parse_irreps(record.get("irreps_in1")), parse_irreps(record.get("irreps_in2"))
    irreps_out = parse_irreps(record.get("irreps_out"))
    if len(irreps_in2) != 1 or irreps_in2[0][1] != 0:
        raise _unsupported(path, "a skip connection that is not indexed by a one-hot element vector")
    n_elements = irreps_in2[0][0]
    offsets_in = component_offsets(irreps_in1)
    weight = record.tensor("weight").to(torch.float64)
    path_of_output, matrices, offset = {}, [], 0
    for instruction in record.get("instructions"):
        i1, _, i_out, mode, _, path_weight = instruction[:6]
        if mode != "uvw":
            raise _unsupported(path, f"skip tensor product mode {mode!r}")
        mul1, mul_out, l = irreps_in1[i1][0], irreps_out[i_out][0], irreps_in1[i1][1]
        size = mul1 * n_elements * mul_out
        block = weight[offset : offset + size].view(mul1, n_elements, mul_out)
        offset += size
        # C^{l 0 l} = identity / sqrt(2l+1): fold the diagonal value with the path weight
        cg = _wigner_3j(l, 0, l)[:, 0, :]
        if not torch.allclose(cg, cg[0, 0] * torch.eye(2 * l + 1, dtype=torch.float64)):
            raise ModelFileError("unexpected Clebsch-Gordan table for a scalar product")
        path_of_output[int(i_out)] = (offsets_in[i1], len(matrices))
        matrices.append(block.permute(1, 0, 2) * float(path_weight) * float(cg[0, 0]))  # [n_el, C_in, C_out]
    if offset != weight.numel():
        raise ModelFileError(f"skip_tp weight has {weight.numel()} entries, instructions need {offset}")
    out_slots = []
    for i_out, (_, l, _) in enumerate(irreps_out):
        start, index = path_of_output.get(i_out, (0, -1))
        out_slots.append((start, 2 * l + 1, index))
    return SpeciesLinear(out_slots, torch.stack(matrices))


def build_convolution(record: PickledObject, path: str) -> list[ConvolutionPath]:
    """The 'uvu' tensor product of sender features with Y(r_ij): one :class:`ConvolutionPath` per e3nn instruction,
    in the order of the output slots (each output slot comes from exactly one path in MACE)."""
    irreps_in1, irreps_in2 = parse_irreps(record.get("irreps_in1")), parse_irreps(record.get("irreps_in2"))
    irreps_out = parse_irreps(record.get("irreps_out"))
    offsets_in2 = component_offsets(irreps_in2)
    instructions = list(record.get("instructions"))
    if sorted(int(ins[2]) for ins in instructions) != list(range(len(irreps_out))):
        raise _unsupported(path, "a tensor product whose outputs do not each come from exactly one path")
    paths = []
    for weight_index, ins in sorted(enumerate(instructions), key=lambda item: int(item[1][2])):
        i1, i2, i_out, mode, has_weight, path_weight = ins[:6]
        if mode != "uvu" or not has_weight:
            raise _unsupported(path, f"tensor product mode {mode!r}")
        l1, l2, l3 = irreps_in1[i1][1], irreps_in2[i2][1], irreps_out[i_out][1]
        paths.append(
            ConvolutionPath(
                in_slot=int(i1),
                in_dim=2 * l1 + 1,
                sh_start=offsets_in2[i2],
                sh_dim=2 * l2 + 1,
                coupling=_wigner_3j(l1, l2, l3) * float(path_weight),
                weight_index=weight_index,
            )
        )
    return paths


def build_interaction(record: PickledObject, path: str, apply_cutoff: bool) -> Interaction:
    residual, density = _INTERACTIONS[record.short_class_name]
    conv_tp = record.module("conv_tp")
    paths = build_convolution(conv_tp, path)
    density_weight = None
    if density:
        density_weight = record.module("density_fn").module("layer0").tensor("weight").to(torch.float64)
    return Interaction(
        linear_up=build_linear(record.module("linear_up"), path),
        radial_mlp=build_radial_mlp(record.module("conv_tp_weights")),
        paths=paths,
        # old files read the tensor product's output as simplified irreps (see linear_input_segments)
        linear=build_linear(record.module("linear"), path, parse_irreps(conv_tp.get("irreps_out"))),
        skip=build_species_linear(record.module("skip_tp"), path),
        residual=residual,
        density_weight=density_weight,
        avg_num_neighbors=float(_required(record, "avg_num_neighbors")),  # every mace version stores it
        apply_cutoff=apply_cutoff,
        input_dims=[2 * l + 1 for _, l, _ in parse_irreps(record.module("conv_tp").get("irreps_in1"))],
    )


def build_symmetric_contraction(record: PickledObject, out_l: int) -> SymmetricContraction:
    """Reduce the file's U_nu tensors to coefficients over distinct monomials of A (see SymmetricContraction)."""
    correlation = int(record.get("correlation"))
    if correlation > 3:
        raise UnsupportedModelError(f"correlation order {correlation} > 3 is not supported")
    # weights_max is nu = correlation; the list `weights` holds nu = correlation-1, ..., 1 (descending)
    listed = record.module("weights")
    weight_by_nu = {correlation: record.tensor("weights_max")}
    for index in range(correlation - 1):
        weight_by_nu[correlation - 1 - index] = listed.tensor(str(index))
    # The `weights_*_zeroed` flags only matter when mace builds a model (they make zero EmptyParams); its forward
    # uses the weights as stored, and so do we.

    out_dim = 2 * out_l + 1
    terms: dict[tuple[int, ...], dict[tuple[int, int], float]] = {}  # monomial -> {(m, k_global): coefficient}
    weight_blocks, k_offset = [], 0
    for nu in range(1, correlation + 1):
        u = record.tensor(f"U_matrix_{nu}").to(torch.float64).numpy()
        if out_l == 0:
            u = u[None]
        k_nu = u.shape[-1]
        weight = weight_by_nu[nu].to(torch.float64)
        if weight.numel() == 0 or not np.any(u):
            continue
        for index in zip(*np.nonzero(u)):
            m, a, k = int(index[0]), tuple(sorted(int(i) for i in index[1:-1])), int(index[-1])
            entry = terms.setdefault(a, {})
            entry[(m, k_offset + k)] = entry.get((m, k_offset + k), 0.0) + float(u[index])
        weight_blocks.append(weight)
        k_offset += k_nu

    singles = sorted(a for a in terms if len(a) == 1)
    triples = sorted(a for a in terms if len(a) == 3)
    pairs = sorted({a for a in terms if len(a) == 2} | {a[:2] for a in triples})
    monomials = singles + pairs + triples
    coefficients = torch.zeros(len(monomials), out_dim, k_offset, dtype=torch.float64)
    for q, a in enumerate(monomials):
        for (m, k), value in terms.get(a, {}).items():
            coefficients[q, m, k] = value
    pair_index = {a: i for i, a in enumerate(pairs)}
    as_long = lambda values: torch.tensor(values, dtype=torch.long).reshape(-1)  # noqa: E731
    return SymmetricContraction(
        singles=as_long([a[0] for a in singles]),
        pairs=torch.tensor([[a[0] for a in pairs], [a[1] for a in pairs]], dtype=torch.long).reshape(2, -1),
        triples_pair=as_long([pair_index[a[:2]] for a in triples]),
        triples_single=as_long([a[2] for a in triples]),
        coefficients=coefficients.reshape(-1, k_offset),
        weights=torch.cat(weight_blocks, dim=1),
        out_dim=out_dim,
    )


def build_product(record: PickledObject, path: str) -> Product:
    if record.get("use_agnostic_product", False):
        raise _unsupported(path, "the element-agnostic product basis (use_agnostic_product)")
    contractions_record = record.module("symmetric_contractions")
    if "weight" in contractions_record.parameters:
        raise _unsupported(path, "a cuEquivariance-converted symmetric contraction")
    irreps_out = parse_irreps(contractions_record.get("irreps_out"))
    contractions = [
        build_symmetric_contraction(contractions_record.module(f"contractions.{k}"), l)
        for k, (_, l, _) in enumerate(irreps_out)
    ]
    linear = build_linear(record.module("linear"), path, irreps_out)
    return Product(contractions, linear, bool(record.get("use_sc", True)))


def build_readout(record: PickledObject, path: str, num_heads: int) -> Readout:
    name = record.short_class_name
    if name == "LinearReadoutBlock":
        return Readout(_scalar_weight(record.module("linear"), path), None, 1.0, num_heads)
    if name == "NonLinearReadoutBlock":
        acts = record.module("non_linearity").module("acts")
        if len(acts.modules) != 1:
            raise _unsupported(path, "a readout with several activation blocks")
        scale = _activation_scale(acts.module("0"))
        return Readout(
            _scalar_weight(record.module("linear_1"), path),
            _scalar_weight(record.module("linear_2"), path),
            scale,
            int(record.get("num_heads", 1)),  # old files lack num_heads: no masking, as in mace
        )
    raise _unsupported(path, f"readout block {name}")


def _scalar_weight(record: PickledObject, path: str) -> torch.Tensor:
    """The 0e -> 0e matrix of an o3.Linear whose output is scalars only."""
    irreps_in = parse_irreps(record.get("irreps_in"))
    blocks = linear_blocks(record)
    if irreps_in[0][1] != 0 or set(blocks) != {(0, 0)}:
        raise _unsupported(path, "a readout reading non-scalar features")
    return blocks[(0, 0)]


def _readout_layers(root: PickledObject, n_readouts: int, n_layers: int, path: str) -> list[int]:
    """Which layer each readout reads: one readout per layer, or a single one on the last layer.

    mace decides by the count (one readout: the last layer's features; else readout t reads layer t); files with
    ``use_last_readout_only`` say which they meant, older ones lack the attribute and have one readout per layer.
    """
    last_only = root.get("use_last_readout_only")
    expected = {1, n_layers} if last_only is None else {1 if last_only else n_layers}
    if n_readouts not in expected:
        raise ModelFileError(
            f"{path!r}: {n_readouts} readouts for {n_layers} interaction layers (use_last_readout_only="
            f"{last_only}); expected {' or '.join(map(str, sorted(expected)))}: the file is inconsistent"
        )
    return [n_layers - 1] if n_readouts == 1 else list(range(n_layers))


# --------------------------------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------------------------------


def _check_supported(root: PickledObject, path: str) -> None:
    if root.class_name not in _SUPPORTED_ROOTS:
        raise _unsupported(path, f"model class {root.class_name}")
    for name, module in root.named_modules():
        cls = module.short_class_name
        if name.startswith("interactions.") and name.count(".") == 1 and cls not in _INTERACTIONS:
            raise _unsupported(path, f"interaction block {cls}")
    for attribute in ("embedding_specs",):
        if root.get(attribute):
            raise _unsupported(path, f"{attribute} (charge/spin embeddings, as in MACE-OMOL)")
    for flag in ("use_so3", "use_agnostic_product", "lammps_mliap"):
        if root.get(flag, False):
            raise _unsupported(path, f"the option {flag}=True")
    if "joint_embedding" in root.modules or "embedding_readout" in root.modules:
        raise _unsupported(path, "charge/spin embeddings (as in MACE-OMOL)")
    cueq = [m for _, m in root.named_modules() if isinstance(m.get("cueq_config"), PickledObject)
            and m.get("cueq_config").get("enabled", False)]
    if cueq:
        raise _unsupported(path, "a cuEquivariance-converted model (convert it back with mace's convert_cueq_e3nn)")


def _irreps_string(irreps: Irreps) -> str:
    return "+".join(f"{mul}x{l}{'e' if p == 1 else 'o'}" for mul, l, p in irreps)


@dataclass(frozen=True)
class Architecture:
    """The facts of a MACE file that :func:`build_model` builds from and :func:`hyperparameters` reports.

    Read once from the records by :func:`read_architecture`, so the summary describes exactly the module that is
    built. Reading never refuses an architecture (``mace-ase models info`` describes unsupported files too); building
    does.
    """

    model_class: str
    atomic_numbers: list[int]  # Z of each model element, in model order
    r_max: float  # Å
    num_bessel: int
    num_polynomial_cutoff: int  # the envelope's p
    sh_ls: list[int]  # l of each spherical-harmonics irrep
    interaction_classes: list[str]  # one per layer
    hidden_irreps: str
    mlp_irreps: str | None  # hidden irreps of the last (non-linear) readout, per head
    correlation: list[int]  # one per layer
    radial_mlp: list[int]
    avg_num_neighbors: float | None  # None: not in the file
    heads: list[str]
    apply_cutoff: bool
    num_readouts: int
    atomic_energies: torch.Tensor  # E0 as stored, eV: [n_elements] or [n_heads, n_elements]
    scale: torch.Tensor | None  # as stored; None for plain MACE (no scale_shift)
    shift: torch.Tensor | None  # eV
    pair_repulsion: bool  # ZBL
    distance_transform: str | None

    @property
    def max_ell(self) -> int:
        return max(self.sh_ls)

    @property
    def num_interactions(self) -> int:
        return len(self.interaction_classes)

    def summary(self) -> dict[str, Any]:
        """Plain Python values, named as mace-torch's ``extract_config_mace_model`` names them."""
        return {
            "model_class": self.model_class,
            "atomic_numbers": list(self.atomic_numbers),
            "r_max": self.r_max,
            "num_bessel": self.num_bessel,
            "num_polynomial_cutoff": self.num_polynomial_cutoff,
            "max_ell": self.max_ell,
            "num_interactions": self.num_interactions,
            "interaction_cls_first": self.interaction_classes[0],
            "interaction_cls": self.interaction_classes[-1],
            "hidden_irreps": self.hidden_irreps,
            "MLP_irreps": self.mlp_irreps,
            "correlation": list(self.correlation),
            "radial_MLP": list(self.radial_mlp),
            "avg_num_neighbors": self.avg_num_neighbors,
            "heads": list(self.heads),
            "atomic_energies": self.atomic_energies.tolist(),
            "scale": self.scale.tolist() if self.scale is not None else 1.0,
            "shift": self.shift.tolist() if self.shift is not None else 0.0,
            "pair_repulsion": self.pair_repulsion,
            "distance_transform": self.distance_transform,
        }


def read_architecture(model_file: ModelFile) -> Architecture:
    """The :class:`Architecture` of a read model file (plain reads of its records; nothing is built or refused)."""
    root = model_file.root
    interactions = root.module("interactions")
    layers = [interactions.module(str(t)) for t in range(len(interactions.modules))]
    products = root.module("products")
    radial = root.module("radial_embedding")
    readouts = root.module("readouts")
    last_readout = readouts.module(str(len(readouts.modules) - 1))
    mlp_irreps = last_readout.get("hidden_irreps")  # the MLP of all heads together: mace reports one head's width
    if mlp_irreps is not None:
        groups = max(int(last_readout.get("num_heads", 1)), 1)
        mlp_irreps = _irreps_string([(mul // groups, l, p) for mul, l, p in parse_irreps(mlp_irreps)])
    scale_shift = root.modules.get("scale_shift")
    avg_num_neighbors = layers[0].get("avg_num_neighbors")
    return Architecture(
        model_class=root.short_class_name,
        atomic_numbers=[int(z) for z in root.tensor("atomic_numbers")],
        r_max=float(root.tensor("r_max")),
        num_bessel=int(radial.module("bessel_fn").tensor("bessel_weights").numel()),
        num_polynomial_cutoff=int(radial.module("cutoff_fn").tensor("p").item()),
        sh_ls=[l for _, l, _ in parse_irreps(root.module("spherical_harmonics").get("irreps_out"))],
        interaction_classes=[layer.short_class_name for layer in layers],
        hidden_irreps=_irreps_string(parse_irreps(layers[-1].get("node_feats_irreps"))) if len(layers) > 1
        else _irreps_string(parse_irreps(products.module("0.symmetric_contractions").get("irreps_out"))),
        mlp_irreps=mlp_irreps,
        correlation=[int(products.module(f"{t}.symmetric_contractions.contractions.0").get("correlation"))
                     for t in range(len(layers))],
        radial_mlp=list(layers[0].get("radial_MLP") or []),
        avg_num_neighbors=float(avg_num_neighbors) if avg_num_neighbors is not None else None,
        heads=list(root.get("heads") or ["Default"]),  # files from before multi-head support have one head
        apply_cutoff=bool(root.get("apply_cutoff", True)),  # older files always applied the envelope
        num_readouts=len(readouts.modules),
        atomic_energies=root.module("atomic_energies_fn").tensor("atomic_energies").to(torch.float64),
        scale=scale_shift.tensor("scale").to(torch.float64) if scale_shift is not None else None,
        shift=scale_shift.tensor("shift").to(torch.float64) if scale_shift is not None else None,
        pair_repulsion="pair_repulsion_fn" in root.modules,
        distance_transform=radial.module("distance_transform").short_class_name
        if "distance_transform" in radial.modules else None,
    )


def hyperparameters(model_file: ModelFile) -> dict[str, Any]:
    """The architecture and training constants of a MACE file, as plain Python values.

    The same facts as mace-torch's ``extract_config_mace_model``: model class, elements (Z), r_max (Å), radial basis,
    spherical-harmonics order, hidden and readout irreps, interaction classes, correlation order per layer, radial
    MLP widths, average neighbour count (None when the file has none), heads, E0s (eV), scale and shift (eV), ZBL and
    distance transform. It is :meth:`Architecture.summary` of :func:`read_architecture`, the facts
    :func:`build_model` builds from; unsupported architectures are described, not refused.
    """
    try:
        return read_architecture(model_file).summary()
    except ModelFileError:
        raise
    except (LookupError, TypeError, AttributeError, ValueError, ArithmeticError, RecursionError) as exc:
        raise ModelFileError(f"{model_file.path!r}: the file is corrupted or not a mace model: "
                             f"{type(exc).__name__}: {str(exc)[:300]}") from exc


def build_model(model_file: ModelFile) -> MACE:
    """Build a float64 :class:`MACE` from a read model file (see :func:`load_model`)."""
    root, path = model_file.root, model_file.path
    _check_supported(root, path)
    facts = read_architecture(model_file)  # what hyperparameters() reports
    heads = facts.heads
    num_heads = len(heads)
    apply_cutoff = facts.apply_cutoff

    atomic_numbers = torch.tensor(facts.atomic_numbers, dtype=torch.long)
    n_elements = len(facts.atomic_numbers)
    r_max = facts.r_max

    embedding_blocks = linear_blocks(root.module("node_embedding.linear"))
    embedding = embedding_blocks[(0, 0)]  # [n_el, C]

    radial_record = root.module("radial_embedding")
    bessel = radial_record.module("bessel_fn")
    if bessel.short_class_name != "BesselBasis":
        raise _unsupported(path, f"radial basis {bessel.short_class_name}")
    agnesi, covalent_radii = None, None
    if "distance_transform" in radial_record.modules:
        transform = radial_record.module("distance_transform")
        if transform.short_class_name != "AgnesiTransform":
            raise _unsupported(path, f"distance transform {transform.short_class_name}")
        agnesi = torch.stack([transform.tensor(n).to(torch.float64).reshape(()) for n in ("q", "p", "a")])
        covalent_radii = transform.tensor("covalent_radii").to(torch.float64)
    radial = RadialEmbedding(
        r_max=r_max,
        bessel_weights=bessel.tensor("bessel_weights").to(torch.float64),
        prefactor=bessel.tensor("prefactor").to(torch.float64),
        p=facts.num_polynomial_cutoff,
        apply_cutoff=bool(radial_record.get("apply_cutoff", apply_cutoff)),
        agnesi=agnesi,
        covalent_radii=covalent_radii,
    )

    max_ell = facts.max_ell
    if facts.sh_ls != list(range(max_ell + 1)) or max_ell > 3:
        raise _unsupported(path, f"spherical harmonics with l = {facts.sh_ls}")

    interactions_record = root.module("interactions")
    n_layers = facts.num_interactions
    interactions = [build_interaction(interactions_record.module(str(t)), path, apply_cutoff) for t in range(n_layers)]
    products = [build_product(root.module(f"products.{t}"), path) for t in range(n_layers)]
    readout_records = root.module("readouts")
    n_readouts = len(readout_records.modules)
    readouts = [build_readout(readout_records.module(str(i)), path, num_heads) for i in range(n_readouts)]
    readout_layers = _readout_layers(root, n_readouts, n_layers, path)

    e0 = facts.atomic_energies
    e0 = e0.reshape(1, n_elements).expand(num_heads, n_elements) if e0.dim() == 1 else e0
    if facts.scale is not None and facts.shift is not None:
        scale = facts.scale.reshape(-1).expand(num_heads)
        shift = facts.shift.reshape(-1).expand(num_heads)
    else:  # plain MACE: no scale and shift
        scale = torch.ones(num_heads, dtype=torch.float64)
        shift = torch.zeros(num_heads, dtype=torch.float64)

    zbl = None
    if "pair_repulsion_fn" in root.modules:
        pair = root.module("pair_repulsion_fn")
        zbl = ZBLRepulsion(
            c=pair.tensor("c").to(torch.float64),
            p=int(pair.tensor("p").item()),
            covalent_radii=pair.tensor("covalent_radii").to(torch.float64),
            a_exp=pair.tensor("a_exp").to(torch.float64),
            a_prefactor=pair.tensor("a_prefactor").to(torch.float64),
        )

    model = MACE(
        atomic_numbers=atomic_numbers,
        r_max=r_max,
        max_ell=max_ell,
        heads=heads,
        embedding=embedding,
        atomic_energies=e0.contiguous(),
        scale=scale.contiguous(),
        shift=shift.contiguous(),
        radial=radial,
        interactions=interactions,
        products=products,
        readouts=readouts,
        readout_layers=readout_layers,
        zbl=zbl,
    )
    return model.eval()


def load_model(path: str | os.PathLike, device: str | torch.device | None = None,
               dtype: str | torch.dtype = "float64", fused: bool = True, radial: str = "auto") -> MACE:
    """Read an official MACE ``.model`` file (safely) and return the :class:`MACE` module.

    Args:
        path: the model file (as written by mace-torch).
        device: ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``); ``None`` picks CUDA when available.
        dtype: ``"float64"`` (the files' own precision) or ``"float32"`` (weights are rounded from float64, as
            mace-torch's ``default_dtype="float32"`` does).
        fused: use the fast, chunked convolution (:mod:`mace_ase.model.fused`; exact, checked against the
            reference at load). ``False`` keeps the plain reference code everywhere.
        radial: ``"auto"`` (default: on the CPU kernel the radial weights tabulated as piecewise quintic
            polynomials, :mod:`mace_ase.model.radial_spline`, 2-2.5x faster calls, in float64 at most
            1.1e-11 eV/atom and 1.2e-9 eV/Å from mace-torch on the test fixtures; elsewhere ``"exact"``),
            ``"exact"`` (the radial MLP of the file, for every edge) or ``"spline"`` (always tabulated).
            Tables are built at first use, per element pair met. ``"spline"`` implies ``fused``.

    Raises:
        ModelFileError: the file cannot be read safely; UnsupportedModelError: unsupported architecture.
    """
    from mace_ase.model.radial_spline import check_radial, set_radial

    check_radial(radial)  # a typo fails before the file is read
    model_file = read_model_file(path)
    try:
        model = build_model(model_file)
    except ModelFileError:
        raise
    except (LookupError, TypeError, AttributeError, ValueError, ArithmeticError, RecursionError, MemoryError,
            RuntimeError) as exc:  # a damaged file whose records do not fit together
        raise ModelFileError(f"{model_file.path!r}: the file is corrupted or not a mace model: "
                             f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    model = model.to(device=torch.device(resolve_device(device)), dtype=resolve_dtype(dtype))
    if fused:
        from mace_ase.model.fused import enable_fused

        enable_fused(model)
    set_radial(model, radial)
    return model


def export_torchscript(model: MACE, path: str | os.PathLike, lammps: bool = False, head: int = 0) -> None:
    """Compile ``model`` with TorchScript and save it; ``torch.jit.load(path)`` then needs only torch.

    The scripted module has the same ``forward`` as :class:`MACE` and keeps ``atomic_numbers``, ``r_max`` and
    ``heads`` as attributes. With ``lammps=True`` it is instead the interface of mace-torch's LAMMPS
    ``pair_style mace`` for head index ``head`` (see :mod:`mace_ase.model.lammps_wrapper`), in the model's dtype.
    Scripted code evaluates the radial MLP for every edge (``radial="exact"``), whatever ``model``'s radial mode.
    """
    from mace_ase.model.export import save_torchscript  # torch 2.13's TorchScript deprecation silenced there only

    if lammps:
        from mace_ase.model.lammps_wrapper import LammpsMACE

        save_torchscript(LammpsMACE(model, head), path)
        return
    save_torchscript(model, path)
