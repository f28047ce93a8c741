"""Dihedral TTA of the PSM probability: views mapped back exactly, the average against a hand computation."""
import numpy as np
import torch
from torch import nn

from mmt_psm.nuclei.tta import dihedral_probability, dihedral_views


class _Pointwise(nn.Module):
    """Class-1 logit = the image's first channel: exactly equivariant to any rotation/flip."""

    def forward(self, batched):
        x = batched[0]["image"].float()
        assert x.shape[-2:] == (batched[0]["height"], batched[0]["width"])
        return [{"sem_seg": torch.stack([torch.zeros_like(x[0]), x[0]])}]


class _ColumnRamp(nn.Module):
    """Class-1 logit = the column index of the view: depends on orientation only, not on the image."""

    def forward(self, batched):
        h, w = batched[0]["height"], batched[0]["width"]
        ramp = torch.arange(w, dtype=torch.float32).expand(h, w) / w
        return [{"sem_seg": torch.stack([torch.zeros(h, w), ramp])}]


def _inputs(h, w):
    img = torch.from_numpy(np.random.RandomState(0).randn(3, h, w).astype(np.float32))
    return {"image": img, "height": h, "width": w}


def test_eight_distinct_views():
    assert len(set(dihedral_views())) == 8


def test_equivariant_model_unchanged_on_non_square_image():
    d = _inputs(5, 7)
    out = dihedral_probability(_Pointwise(), d)
    expected = 1.0 / (1.0 + np.exp(-d["image"][0].numpy()))
    assert out.shape == (5, 7)
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_orientation_dependent_model_averaged_by_hand():
    n = 4
    out = dihedral_probability(_ColumnRamp(), _inputs(n, n))
    # by hand: in the 8 views a pixel (r, c) of the original lands on columns c, n-1-c (flips), r, n-1-r
    # (quarter turns), each twice
    sig = lambda v: 1.0 / (1.0 + np.exp(-v / n))  # noqa: E731
    r, c = np.mgrid[0:n, 0:n].astype(np.float64)
    expected = (2 * sig(c) + 2 * sig(n - 1 - c) + 2 * sig(r) + 2 * sig(n - 1 - r)) / 8
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    # and the result is invariant under the dihedral group
    np.testing.assert_allclose(out, np.rot90(out), rtol=1e-5)
    np.testing.assert_allclose(out, out[:, ::-1], rtol=1e-5)
