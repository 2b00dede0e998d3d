"""The fast path (mace_ase.model.fused: chunked convolution, compiled CPU kernels) gives the reference's numbers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import fixture_model
from mace_ase.model import fused
from mace_ase.model.build import load_model

MODELS = ["mp0a_medium", "mpa0_density", "mp0b_agnesi_zbl", "mp0a_l2", "off_like", "plain_mace", "multihead"]


@pytest.fixture(autouse=True)
def _component_linears_at_any_size(monkeypatch):
    """The test graphs are small: run the fast path's per-node linears (fused.component_linear) on them too, not
    the reference linears that it uses below COMPONENT_LINEAR_MIN_NODES nodes."""
    monkeypatch.setattr(fused, "COMPONENT_LINEAR_MIN_NODES", 0)


def _graph(model, n_atoms: int = 24, seed: int = 1):
    """A random cluster (some atoms farther than r_max apart), both edge directions, irregular neighbour counts."""
    generator = torch.Generator().manual_seed(seed)
    positions = torch.rand(n_atoms, 3, generator=generator, dtype=torch.float64) * 1.4 * model.r_max_value
    species = torch.randint(0, int(model.atomic_numbers.shape[0]), (n_atoms,), generator=generator)
    i, j = torch.meshgrid(torch.arange(n_atoms), torch.arange(n_atoms), indexing="ij")
    vectors = positions[j] - positions[i]
    length = vectors.norm(dim=-1)
    keep = (i != j) & (length < model.r_max_value) & (length > 0.8)
    return vectors[keep], torch.stack([i[keep], j[keep]]), species


def _both(model, *args):
    fused._set(model, True, fused.load_kernel()[0] is not None)
    fast = model.energy_and_edge_gradients(*args)
    fused._set(model, False, False)
    reference = model.energy_and_edge_gradients(*args)
    return fast, reference


def test_kernel_load_survives_an_interrupted_build(tmp_path) -> None:
    """A build killed midway (Ctrl-C at the first call) leaves torch's ``lock`` file; the next process must not wait
    for it forever: it loads the kernel and removes the leftover."""
    assert fused.load_kernel()[0] is not None  # built (or loaded) here first
    leftover = fused.kernel_directory() / "lock"
    leftover.touch()
    script = "from mace_ase.model import fused; module, reason = fused.load_kernel(); assert module is not None, reason"
    # the child imports this very copy of the package (the kernel folder is per checkout): not one found from its
    # working directory
    env = {**os.environ, "PYTHONPATH": str(Path(fused.__file__).resolve().parents[2])}
    try:
        subprocess.run([sys.executable, "-c", script], check=True, timeout=240, cwd=tmp_path, env=env)
    finally:
        stale = leftover.exists()
        leftover.unlink(missing_ok=True)
    assert not stale


def test_each_torch_installation_has_its_own_kernel_folder(monkeypatch, tmp_path) -> None:
    """Two virtualenvs with the same torch version must not share a build folder: their include paths differ, so a
    shared folder was rebuilt (a minute) at every switch between them."""
    monkeypatch.setenv("MACE_ASE_KERNEL_DIR", str(tmp_path / "kernels"))
    here = fused.kernel_directory()
    assert fused.kernel_directory() == here  # stable within one installation
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "other-venv" / "torch" / "__init__.py"))
    elsewhere = fused.kernel_directory()
    assert elsewhere.parent == here.parent and elsewhere != here


def test_each_checkout_has_its_own_kernel_folder(monkeypatch, tmp_path) -> None:
    """Two checkouts of the same sources (e.g. git worktrees) write their own paths into the build file: sharing a
    folder rebuilt the kernels at every switch between them."""
    monkeypatch.setenv("MACE_ASE_KERNEL_DIR", str(tmp_path / "kernels"))
    here = fused.kernel_directory()
    copy = tmp_path / "checkout" / "kernels"
    shutil.copytree(fused._KERNELS, copy)
    monkeypatch.setattr(fused, "_KERNELS", copy)
    monkeypatch.setattr(fused, "_SOURCES", [copy / source.name for source in fused._SOURCES])
    elsewhere = fused.kernel_directory()
    assert elsewhere.parent == here.parent and elsewhere != here


def test_kernel_builds_where_a_compiler_is_present() -> None:
    """With g++ and ninja (CI, the dev machines) the compiled kernel is what runs; without, the fallback says why."""
    module, reason = fused.load_kernel()
    model = load_model(fixture_model("mp0a_small"), device="cpu", dtype="float64")
    if shutil.which("g++") or shutil.which("c++"):
        assert module is not None, reason
        assert all(interaction.fused_kernel for interaction in model.interactions)
        assert all(product.fused for product in model.products)
    else:
        assert module is None and reason
        assert all(interaction.fused and not interaction.fused_kernel for interaction in model.interactions)


def _distinct_rows(model, vectors, edge_index, species):
    """What the model's exact mode gets from distinct_radial_rows on this graph (None: the chunked MLP path)."""
    order, inverse, species_sorted, counts, sender, receiver = model.group_by_element(species, edge_index)
    padded, padded_sender = model.pad_edges(vectors, sender, receiver, species.shape[0])
    lengths, z_sender, z_receiver = model.edge_geometry(padded, species_sorted, padded_sender)
    envelope = model.radial(lengths, z_sender, z_receiver)[1]
    return fused.distinct_radial_rows(model, lengths, z_sender, z_receiver, envelope)


# "distinct": the radial MLP once per distinct (length, pair) value, through the kernel's table path (the default
# where the tables fit); "chunks-N": the chunked MLP path with N edge rows per chunk (64: many chunks)
PATHS = ["distinct", "chunks-64", "chunks-100000"]


def _use_path(path: str, monkeypatch) -> None:
    if path.startswith("chunks"):
        monkeypatch.setattr(fused, "PAIRED_TABLE_BYTES", 0)
        monkeypatch.setattr(fused, "CHUNK_EDGES", int(path.split("-")[1]))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("path", PATHS)
def test_fused_matches_reference_float64(name: str, path: str, monkeypatch) -> None:
    _use_path(path, monkeypatch)
    model = load_model(fixture_model(name), device="cpu", dtype="float64", fused=False)
    args = _graph(model)
    fused._set(model, True, fused.load_kernel()[0] is not None)
    rows = _distinct_rows(model, *args)
    if path == "distinct":  # each edge and its reverse share one row, nothing else does in a random cluster
        assert rows is not None and int(rows[1].max()) + 1 == args[1].shape[1] // 2
    else:
        assert rows is None
    (energy, grad), (energy_ref, grad_ref) = _both(model, *args)
    assert torch.allclose(energy, energy_ref, rtol=0, atol=1e-12)
    assert torch.allclose(grad, grad_ref, rtol=0, atol=1e-12)
    assert grad.abs().max() > 1e-3  # the check is not vacuous


def test_fused_matches_reference_float32() -> None:
    model = load_model(fixture_model("mp0a_medium"), device="cpu", dtype="float32", fused=False)
    vectors, edge_index, species = _graph(model)
    (energy, grad), (energy_ref, grad_ref) = _both(model, vectors.float(), edge_index, species)
    assert torch.allclose(energy, energy_ref, rtol=0, atol=2e-5)
    assert torch.allclose(grad, grad_ref, rtol=0, atol=2e-5 * (1 + float(grad_ref.abs().max())))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("kernel", [True, False])
def test_node_blocks_give_the_numbers_of_one_block(name: str, kernel: bool) -> None:
    """The fast path runs block by block on the CPU (MACE.node_blocks, for cache locality): blocks of 5 nodes,
    several straddling two elements, give the energies, edge gradients and descriptors of one block, with the
    compiled kernels and with the chunked torch code."""
    model = load_model(fixture_model(name), device="cpu", dtype="float64", fused=False)
    fused._set(model, True, kernel and fused.load_kernel()[0] is not None)
    vectors, edge_index, species = _graph(model)
    one_block = model.energy_and_edge_gradients(vectors, edge_index, species)
    descriptors = model.node_features(vectors, edge_index, species)
    model.node_block = 5
    counts = torch.bincount(species, minlength=int(model.atomic_numbers.shape[0])).tolist()
    blocks = model.node_blocks(counts, False)
    assert [sum(column) for column in zip(*blocks)] == counts and max(sum(b) for b in blocks) <= 5
    assert any(sum(1 for c in b if c) > 1 for b in blocks)  # some block holds two elements
    blocked = model.energy_and_edge_gradients(vectors, edge_index, species)
    assert torch.allclose(blocked[0], one_block[0], rtol=0, atol=1e-13)
    assert torch.allclose(blocked[1], one_block[1], rtol=0, atol=1e-13)
    for h, h_one in zip(model.node_features(vectors, edge_index, species), descriptors):
        assert torch.allclose(h, h_one, rtol=0, atol=1e-13)


def _curvature(model, vectors, edge_index, species) -> torch.Tensor:
    """d/dr of sum(g^2) with g = dE/dr: a double backward, as for Hessians."""
    vectors = vectors.clone().requires_grad_(True)
    energy = model.graph_energies(vectors, edge_index, species).sum()
    (grad,) = torch.autograd.grad(energy, vectors, create_graph=True)
    return torch.autograd.grad((grad**2).sum(), vectors)[0]


@pytest.mark.parametrize("name", ["mp0a_medium", "mpa0_density"])
def test_node_blocks_second_derivatives(name: str, monkeypatch) -> None:
    """A double backward through several receiver blocks (the blocks share h_up and its gradient) is that of one."""
    monkeypatch.setattr(fused, "CHUNK_EDGES", 64)
    model = load_model(fixture_model(name), device="cpu", dtype="float64", fused=False, radial="exact")
    fused._set(model, True, fused.load_kernel()[0] is not None)
    args = _graph(model)
    one_block = _curvature(model, *args)
    model.node_block = 5
    blocked = _curvature(model, *args)
    assert torch.allclose(blocked, one_block, rtol=0, atol=1e-11)
    assert one_block.abs().max() > 1e-3


def test_chunked_torch_path_without_kernel(monkeypatch) -> None:
    """No compiler (or CUDA): the chunked, recomputing torch path, same numbers."""
    monkeypatch.setattr(fused, "CHUNK_EDGES", 64)
    model = load_model(fixture_model("mpa0_density"), device="cpu", dtype="float64", fused=False)
    args = _graph(model)
    reference = model.energy_and_edge_gradients(*args)
    fused._set(model, True, False)
    fast = model.energy_and_edge_gradients(*args)
    assert torch.allclose(fast[0], reference[0], rtol=0, atol=1e-12)
    assert torch.allclose(fast[1], reference[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("max_ell", [1, 2, 3])
def test_spherical_harmonics_kernel_matches_the_reference(max_ell: int, dtype: torch.dtype) -> None:
    """Values and both gradients (through the direction and through the length), a zero vector included."""
    from mace_ase.model.mace import spherical_harmonics

    generator = torch.Generator().manual_seed(max_ell)
    vectors = torch.randn(3000, 3, generator=generator, dtype=dtype) * 2.0
    vectors[7] = 0.0  # clamped length: zero gradient through it, as clamp_min gives
    weights = torch.randn(3000, (max_ell + 1) ** 2, generator=generator, dtype=dtype)
    results = []
    for kernel in (True, False):
        x = vectors.clone().requires_grad_(True)
        lengths = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        sh = (fused.fused_spherical_harmonics(x, lengths, max_ell) if kernel
              else spherical_harmonics(x / lengths.clamp_min(1e-12), max_ell))
        (grad,) = torch.autograd.grad((sh * weights).sum() + (lengths * lengths.detach()).sum(), x)
        results.append((sh.detach(), grad))
    (sh, grad), (sh_ref, grad_ref) = results
    tolerance = 1e-14 if dtype == torch.float64 else 2e-6
    assert torch.allclose(sh, sh_ref, rtol=0, atol=tolerance * 10)
    assert torch.allclose(grad, grad_ref, rtol=0, atol=tolerance * float(grad_ref.abs().max()))
    assert grad_ref.abs().max() > 1.0


def test_parallel_index_add_rows_is_torchs_index_add() -> None:
    """Same additions in the same order per row: the same bits; a bad index is an error, not a write."""
    kernel = fused.load_kernel()[0]
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float64, torch.float32):
        out = torch.randn(300, 4, 16, generator=generator, dtype=dtype)
        index = torch.randint(0, 300, (20000,), generator=generator)
        src = torch.randn(20000, 4, 16, generator=generator, dtype=dtype)
        expected = out.clone().index_add_(0, index, src)
        kernel.index_add_rows(out, index, src)
        assert torch.equal(out, expected)
    before = out.clone()
    with pytest.raises(RuntimeError, match="out of range"):
        kernel.index_add_rows(out, torch.tensor([300]), src[:1])
    assert torch.equal(out, before)


def _monomials_by_torch(a, singles, pairs, triple_pair, triple_single):
    """P [N, Q, C]: the symmetric contraction's monomials, singles | pairs | pair x single, as the kernel forms them."""
    pair_values = a[:, pairs[0]] * a[:, pairs[1]]
    return torch.cat([a[:, singles], pair_values, pair_values[:, triple_pair] * a[:, triple_single]], dim=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels", [16, 80, 200])
def test_symmetric_contraction_kernel_in_channel_blocks(channels: int, dtype: torch.dtype) -> None:
    """The forward kernel runs per block of 256 bytes of channels (64 float32, 32 float64) plus a remainder: every
    split gives B[i, m, c] = sum_q V[group_i, q, m, c] P[i, q, c], and the backward kernel (several nodes of one
    element at a time) its gradient."""
    kernel = fused.load_kernel()[0]
    generator = torch.Generator().manual_seed(channels)
    n_nodes, dim, outputs = 37, 16, 3
    singles = torch.randint(0, dim, (9,), generator=generator)
    pairs = torch.randint(0, dim, (2, 23), generator=generator)
    triple_pair = torch.randint(0, 23, (41,), generator=generator)
    triple_single = torch.randint(0, dim, (41,), generator=generator)
    tables = (singles, pairs, triple_pair, triple_single)
    a = torch.randn(n_nodes, dim, channels, generator=generator, dtype=dtype)
    folded = torch.randn(3, 9 + 23 + 41, outputs, channels, generator=generator, dtype=dtype)
    # three elements, nodes grouped as the model sorts them; the backward kernel takes up to 4 nodes of one element
    # at a time, and these runs (13, 2, 22) end inside its groups
    group = torch.tensor([0] * 13 + [1] * 2 + [2] * 22)
    x = a.clone().requires_grad_(True)
    expected = torch.einsum("nqmc,nqc->nmc", folded[group], _monomials_by_torch(x, *tables))
    grad_b = torch.randn(n_nodes, outputs, channels, generator=generator, dtype=dtype)
    (expected_grad,) = torch.autograd.grad(expected, x, grad_b)
    result = kernel.symmetric_contraction_forward(a, folded, group, *tables)
    grad = kernel.symmetric_contraction_backward(grad_b, a, folded, group, *tables)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-4
    expected = expected.detach()
    assert torch.allclose(result, expected, rtol=0, atol=tolerance * float(expected.abs().max()))
    assert torch.allclose(grad, expected_grad, rtol=0, atol=tolerance * float(expected_grad.abs().max()))


@pytest.mark.parametrize("path", ["distinct", "chunks-64"])
def test_second_derivatives_through_fused_path(path: str, monkeypatch) -> None:
    """Hessian-vector products (create_graph=True) go through the differentiable recomputation: from the MLP inputs,
    also after a forward pass through the distinct-edge tables (which hold only W and dW/dr)."""
    _use_path(path, monkeypatch)
    model = load_model(fixture_model("mp0a_medium"), device="cpu", dtype="float64", fused=False)
    vectors, edge_index, species = _graph(model, n_atoms=10)
    direction = torch.randn(vectors.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def hvp(enabled: bool) -> torch.Tensor:
        fused._set(model, enabled, enabled)
        x = vectors.clone().requires_grad_(True)
        energy = model.graph_energies(x, edge_index, species).sum()
        (grad,) = torch.autograd.grad(energy, x, create_graph=True)
        (second,) = torch.autograd.grad((grad * direction).sum(), x)
        return second

    reference = hvp(False)
    assert torch.allclose(hvp(True), reference, rtol=0, atol=1e-10)
    assert reference.abs().max() > 1e-3


@pytest.mark.parametrize("name", ["mp0a_medium", "mpa0_density", "mp0b_agnesi_zbl"])
@pytest.mark.parametrize("envelope_in_features", [True, False])
def test_radial_r_derivatives_are_those_of_autograd(name: str, envelope_in_features: bool) -> None:
    """The closed-form d/dr of the radial features and envelope (Bessel, Agnesi, polynomial envelope), which the
    distinct-edge tables' dW/dr is built from, against forward-mode autograd, inside and beyond r_max."""
    model = load_model(fixture_model(name), device="cpu", dtype="float64")
    model.radial.apply_cutoff = envelope_in_features
    n = 300
    lengths = torch.linspace(0.4, 1.2 * model.r_max_value, n, dtype=torch.float64).unsqueeze(-1)
    elements = model.atomic_numbers
    z_sender = elements[torch.arange(n) % len(elements)]
    z_receiver = elements[(7 * torch.arange(n) + 1) % len(elements)]
    closed_form = model.radial.r_derivatives(lengths, z_sender, z_receiver)
    _, autograd = torch.func.jvp(lambda r: model.radial(r, z_sender, z_receiver), (lengths,),
                                 (torch.ones_like(lengths),))
    for got, expected in zip(closed_form, autograd):
        assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert autograd[0].abs().max() > 0.1 and autograd[1].abs().max() > 0.1


def test_distinct_edges_with_the_envelope_outside_the_mlp() -> None:
    """Files where the envelope multiplies the MLP's output (``apply_cutoff`` off): the table's dW/dr then has the
    product rule's second term."""
    model = load_model(fixture_model("mpa0_density"), device="cpu", dtype="float64", fused=False)
    model.radial.apply_cutoff = False
    for interaction in model.interactions:
        interaction.apply_cutoff = False
    args = _graph(model)
    (energy, grad), (energy_ref, grad_ref) = _both(model, *args)
    fused._set(model, True, True)
    assert _distinct_rows(model, *args) is not None
    assert torch.allclose(energy, energy_ref, rtol=0, atol=1e-12)
    assert torch.allclose(grad, grad_ref, rtol=0, atol=1e-12) and grad.abs().max() > 1e-3


def test_distinct_edge_table_overwritten_before_its_backward_pass() -> None:
    """The distinct-edge table's storage is reused between calls: two forward passes, then the first one's backward
    pass, must still give the first graph's gradients (the overwritten table is recomputed)."""
    model = load_model(fixture_model("mpa0_density"), device="cpu", dtype="float64")
    first, second = _graph(model, seed=1), _graph(model, seed=2)
    expected = model.energy_and_edge_gradients(*first)[1]
    assert _distinct_rows(model, *first) is not None
    x = first[0].clone().requires_grad_(True)
    energy = model.graph_energies(x, first[1], first[2]).sum()
    model.graph_energies(second[0].clone().requires_grad_(True), second[1], second[2]).sum()  # reuses the storage
    (grad,) = torch.autograd.grad(energy, x)
    assert torch.allclose(grad, expected, rtol=0, atol=1e-13)
    assert expected.abs().max() > 1e-3


def test_distinct_edges_of_a_symmetric_crystal() -> None:
    """In a perfect crystal many edges have bit-identical lengths: the radial MLP runs for far fewer rows than edges,
    and the forces (zero by symmetry) and energy are the chunked path's."""
    from ase.build import bulk

    from mace_ase.calculator import MACECalculator

    model = load_model(fixture_model("mp0a_medium"), device="cpu", dtype="float64")
    element = int(model.atomic_numbers[0])
    atoms = bulk("X", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    atoms.numbers[:] = element
    calc = MACECalculator(model_paths=model, device="cpu", default_dtype="float64")
    graph = calc._graph(atoms)
    vectors = graph["positions"][graph["edge_index"][1]] - graph["positions"][graph["edge_index"][0]] + (
        graph["unit_shifts"] @ graph["cell"])
    rows = _distinct_rows(model, vectors, graph["edge_index"], graph["species"])
    assert rows is not None and int(rows[1].max()) + 1 < graph["edge_index"].shape[1] // 20
    atoms.calc = calc
    energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    original = fused.PAIRED_TABLE_BYTES
    try:
        fused.PAIRED_TABLE_BYTES = 0
        calc.reset()
        chunked = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    finally:
        fused.PAIRED_TABLE_BYTES = original
    assert abs(energy - chunked[0]) < 1e-10
    assert abs(forces - chunked[1]).max() < 1e-10 and abs(stress - chunked[2]).max() < 1e-10


def test_self_check_falls_back_with_one_warning(monkeypatch) -> None:
    """A fast path that disagrees with the reference is not used; the user is told once."""
    model = load_model(fixture_model("mp0a_medium"), device="cpu", dtype="float64", fused=False)
    original = fused.coupling_tables

    def broken(interaction):
        pa, pairs, terms, values, d_out = original(interaction)
        return pa, pairs, terms, values * 1.001, d_out

    monkeypatch.setattr(fused, "coupling_tables", broken)
    monkeypatch.setattr(fused, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fused.enable_fused(model) == "reference"
        for interaction in model.interactions:
            del interaction.fused_tables
        assert fused.enable_fused(model) == "reference"
    assert len([w for w in caught if "fast convolution disagrees" in str(w.message)]) == 1
    assert not any(interaction.fused for interaction in model.interactions)


def test_torchscript_export_uses_reference(tmp_path) -> None:
    model = load_model(fixture_model("mp0a_medium"), device="cpu", dtype="float64")
    assert all(interaction.fused for interaction in model.interactions)
    scripted = torch.jit.script(model)
    args = _graph(model, n_atoms=8)
    expected = model.energy_and_edge_gradients(*args)[0]
    got = scripted.graph_energies(args[0], args[1], args[2], 0)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["mp0a_medium", "mpa0_density", "off_like"])
def test_component_linears_are_the_reference_linears(name: str) -> None:
    """The copy-free per-node linears of the fast path (fused.component_linear): the reference's values, and
    gradients in x and the row divisor (first and second derivatives, as a Hessian needs) by finite differences."""
    model = load_model(fixture_model(name), device="cpu", dtype="float64", fused=False)
    generator = torch.Generator().manual_seed(5)
    species_counts = [3, 0, 2][: int(model.atomic_numbers.shape[0])] or [5]
    n_nodes = sum(species_counts)
    checked_slots = 0
    for interaction in model.interactions:
        for linear in (interaction.linear_up, interaction.linear):
            x = torch.randn(n_nodes, int(linear.gather.shape[0]), linear.weights[0].shape[0] // (
                linear.gather_lengths[0] // linear.out_dims[0]), generator=generator, dtype=torch.float64)
            divisor = 1.0 + torch.rand(n_nodes, generator=generator, dtype=torch.float64)
            checked_slots += max(length // dim for length, dim in zip(linear.gather_lengths, linear.out_dims))
            for divide in (None, divisor, divisor[:1]):
                expected = linear(x, divide)
                linear.fused = True
                try:
                    assert torch.allclose(linear(x, divide), expected, rtol=0, atol=1e-13)
                    x_grad = x[:2].clone().requires_grad_(True)  # finite differences on a few rows: fast enough
                    if divide is None:
                        assert torch.autograd.gradgradcheck(lambda v: linear(v), (x_grad,))
                    else:
                        d_grad = divide[: min(2, divide.shape[0])].clone().requires_grad_(True)
                        assert torch.autograd.gradgradcheck(lambda v, d: linear(v, d), (x_grad, d_grad))
                finally:
                    linear.fused = False
        skip = interaction.skip
        # one input component more than any slot reads: its gradient must be zero, not garbage
        components = max((start + dim for start, dim, path in skip.out_slots if path >= 0), default=0) + 1
        x = torch.randn(n_nodes, components, skip.weight.shape[2], generator=generator, dtype=torch.float64)
        expected = skip(x, species_counts)
        skip.fused = True
        try:
            assert torch.allclose(skip(x, species_counts), expected, rtol=0, atol=1e-13)
            small = [1, 0, 1][: len(species_counts)] if len(species_counts) > 1 else [2]
            x_grad = x[: sum(small)].clone().requires_grad_(True)
            assert torch.autograd.gradgradcheck(lambda v: skip(v, small), (x_grad,))
        finally:
            skip.fused = False
    assert checked_slots > len(model.interactions)  # some output irrep sums several input slots


@pytest.mark.parametrize("radial", ["spline", "exact"])
def test_backward_work_buffers_are_reused_and_first_layer_senders_skipped(radial: str, monkeypatch) -> None:
    """The backward kernels' scratch buffers live from call to call (fused._Workspace): a call after them holding
    NaN from an earlier one gives the same bits. The first layer's sender features depend on the species alone: no
    dL/dx is computed for them (an empty buffer), the second layer's is."""
    if fused.load_kernel()[0] is None:
        pytest.skip("no C++ compiler: the backward kernels are not built")
    model = load_model(fixture_model("mpa0_density"), device="cpu", dtype="float64", fused=False, radial=radial)
    fused._set(model, True, True)
    args = _graph(model)
    first = model.energy_and_edge_gradients(*args)
    assert fused._workspace.buffers
    for buffer in fused._workspace.buffers.values():
        buffer.fill_(float("nan"))
    taken = []
    take = fused._workspace.take
    monkeypatch.setattr(fused._workspace, "take", lambda name, shape, like: taken.append((name, shape)) or
                        take(name, shape, like))
    second = model.energy_and_edge_gradients(*args)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    sender_buffers = [shape for name, shape in taken if name == "grad_x"]
    assert sender_buffers[-1] == (0,)  # the last backward pass is the first layer's
    assert all(shape != (0,) for shape in sender_buffers[:-1]) and len(sender_buffers) == len(model.interactions)


def test_few_nodes_take_the_reference_linears(monkeypatch) -> None:
    """Below COMPONENT_LINEAR_MIN_NODES nodes the fast path's linears are the reference's own (the same bits)."""
    model = load_model(fixture_model("mpa0_density"), device="cpu", dtype="float64", fused=False)
    linear = model.interactions[1].linear
    x = torch.randn(3, int(linear.gather.shape[0]), model.interactions[1].linear_up.weights[0].shape[1],
                    dtype=torch.float64)
    divisor = 1.0 + torch.rand(3, dtype=torch.float64)
    linear.fused = True
    calls = []
    monkeypatch.setattr(fused, "component_linear", lambda *args: calls.append(args) or 0)
    monkeypatch.setattr(fused, "COMPONENT_LINEAR_MIN_NODES", 4)
    assert torch.equal(linear(x, divisor), linear.reference_forward(x, divisor)) and not calls
    monkeypatch.setattr(fused, "COMPONENT_LINEAR_MIN_NODES", 3)
    linear(x, divisor)
    assert calls
