"""An o3.Linear whose input irreps split equal irreps into blocks differently from the features it reads.

mace-torch 0.3.0-0.3.4 files (the first MACE-MP-0 releases) give the interaction's linear the simplified irreps of
the tensor-product output; the fixtures of ``references_v033.json`` cover the real files, these tests any split.
"""

from __future__ import annotations

import pytest
import torch
from e3nn import o3

from mace_ase.io.model_file import ModelFileError
from mace_ase.model.build import build_linear, component_offsets, linear_input_segments, parse_irreps

LAYOUT = "8x0e+8x0e+8x1o+8x1o+8x1o+8x2e"  # what a tensor product writes: one slot per path, 8 channels each


class _LinearRecord:
    """The two methods of a file record that build_linear reads, over a live e3nn module."""

    def __init__(self, linear: o3.Linear) -> None:
        self.linear = linear

    def get(self, name: str):
        return {"irreps_in": str(self.linear.irreps_in), "irreps_out": str(self.linear.irreps_out),
                "instructions": self.linear.instructions}[name]

    def tensor(self, name: str) -> torch.Tensor:
        assert name == "weight"
        return self.linear.weight.detach()


def _to_e3nn(x: torch.Tensor, layout: list) -> torch.Tensor:
    """Our ``[N, D, C]`` features -> e3nn's flat ``[N, sum mul (2l+1)]`` (channel-major within each block)."""
    blocks = []
    for (mul, l, _), start in zip(layout, component_offsets(layout)):
        blocks.append(x[:, start : start + 2 * l + 1, :].transpose(1, 2).reshape(x.shape[0], -1))
    return torch.cat(blocks, dim=1)


@pytest.mark.parametrize("irreps_in", [
    "16x0e+24x1o+8x2e",  # simplified, as mace-torch 0.3.0-0.3.4 write it
    "8x0e+8x0e+8x1o+8x1o+8x1o+8x2e",  # the same slots
    "4x0e+12x0e+8x1o+16x1o+8x2e",  # blocks that cut through a slot
    "16x0e+2x1o+22x1o+3x2e+5x2e",
])
def test_linear_reads_any_split_of_the_same_irreps(irreps_in: str) -> None:
    torch.manual_seed(0)
    linear = o3.Linear(irreps_in, "8x0e+8x1o+8x2e").to(torch.float64)
    with torch.no_grad():
        linear.weight.normal_()
    layout = parse_irreps(LAYOUT)
    ours = build_linear(_LinearRecord(linear), "test.model", layout)
    x = torch.randn(5, sum(2 * l + 1 for _, l, _ in layout), 8, dtype=torch.float64)
    expected = linear(_to_e3nn(x, layout))  # [N, 8*1 + 8*3 + 8*5]
    got = ours(x)  # [N, 1 + 3 + 5, 8]
    assert torch.allclose(_to_e3nn(got, parse_irreps("8x0e+8x1o+8x2e")), expected, atol=1e-12, rtol=0)


def test_segments_follow_the_channels() -> None:
    segments = linear_input_segments(parse_irreps("16x0e+24x1o"), parse_irreps("8x0e+8x0e+8x1o+8x1o+8x1o"), "f")
    assert segments == [[(0, 0, 0, 8), (1, 0, 8, 8)], [(2, 0, 0, 8), (3, 0, 8, 8), (4, 0, 16, 8)]]


@pytest.mark.parametrize("irreps_in", ["16x0e+24x1e", "24x1o+16x0e", "16x0e+16x1o", "16x0e+32x1o"])
def test_inconsistent_irreps_are_refused(irreps_in: str) -> None:
    with pytest.raises(ModelFileError, match="o3.Linear reads irreps"):
        linear_input_segments(parse_irreps(irreps_in), parse_irreps("8x0e+8x0e+8x1o+8x1o+8x1o"), "f.model")
