"""Unsupervised-loss weight schedule: values at the boundaries of burn-in, ramp-up and ramp-down."""
import math

import pytest

from mmt_psm.core.ramps import sigmoid_rampdown, sigmoid_rampup, unsup_weight

KW = dict(burn_in=1000, ramp_up=250, ramp_down=250, max_iter=5000, base=5.0)


def test_zero_during_burn_in():
    assert unsup_weight(0, **KW) == 0.0
    assert unsup_weight(999, **KW) == 0.0


def test_ramp_up():
    assert unsup_weight(1000, **KW) == pytest.approx(5.0 * math.exp(-5.0))
    assert unsup_weight(1125, **KW) == pytest.approx(5.0 * math.exp(-5.0 * 0.25))
    assert unsup_weight(1249, **KW) == pytest.approx(5.0 * math.exp(-5.0 * (1 / 250) ** 2))
    assert unsup_weight(1250, **KW) == 5.0
    assert unsup_weight(3000, **KW) == 5.0


def test_ramp_down():
    assert unsup_weight(4750, **KW) == 5.0  # 250 iterations left: factor exp(0)
    assert unsup_weight(4875, **KW) == pytest.approx(5.0 * math.exp(-12.0 * 0.25))
    # Last iteration of a 0-based run (t = max_iter - 1) and the end point t = max_iter.
    assert unsup_weight(4999, **KW) == pytest.approx(5.0 * math.exp(-12.0 * (1 - 1 / 250) ** 2))
    assert unsup_weight(5000, **KW) == pytest.approx(5.0 * math.exp(-12.0))


def test_zero_length_ramps():
    kw = dict(KW, ramp_up=0, ramp_down=0)
    assert unsup_weight(999, **kw) == 0.0
    assert unsup_weight(1000, **kw) == 5.0
    assert unsup_weight(5000, **kw) == 5.0
    kw = dict(KW, burn_in=0, ramp_up=0, ramp_down=0)
    assert unsup_weight(0, **kw) == 5.0


def test_overlapping_ramps_multiply():
    kw = dict(burn_in=0, ramp_up=10, ramp_down=10, max_iter=10, base=1.0)
    assert unsup_weight(5, **kw) == pytest.approx(math.exp(-5 * 0.25) * math.exp(-12 * 0.25))


def test_sigmoid_rampup_clipped():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5.0))
    assert sigmoid_rampup(-5, 100) == pytest.approx(math.exp(-5.0))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(100, 100) == 1.0
    assert sigmoid_rampup(1e6, 100) == 1.0
    assert sigmoid_rampup(3, 0) == 1.0
    assert sigmoid_rampdown(0, 10) == pytest.approx(math.exp(-12.0))
    assert sigmoid_rampdown(10, 10) == 1.0
    assert sigmoid_rampdown(3, 0) == 1.0
