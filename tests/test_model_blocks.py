"""Small pieces of the forward pass against their definitions."""

from __future__ import annotations

import torch
from e3nn import o3

from mace_ase.model.mace import polynomial_envelope, spherical_harmonics


def test_spherical_harmonics_match_e3nn_component_normalisation() -> None:
    vectors = torch.randn(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    unit = vectors / vectors.norm(dim=-1, keepdim=True)
    for max_ell in range(4):
        expected = o3.spherical_harmonics(list(range(max_ell + 1)), vectors, normalize=True, normalization="component")
        assert torch.allclose(spherical_harmonics(unit, max_ell), expected, atol=1e-13)


def test_envelope_is_one_at_zero_and_vanishes_smoothly_at_cutoff() -> None:
    r_max = torch.tensor(5.0, dtype=torch.float64)
    r = torch.tensor([0.0, 4.999999, 5.0, 6.0], dtype=torch.float64, requires_grad=True)
    value = polynomial_envelope(r, r_max, 5)
    assert value[0] == 1.0 and value[2] == 0.0 and value[3] == 0.0
    assert abs(value[1]) < 1e-12
    (gradient,) = torch.autograd.grad(value.sum(), r)
    assert abs(gradient[1]) < 1e-8 and gradient[0] == 0.0
