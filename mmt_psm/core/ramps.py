"""Schedules for the weight of unsupervised losses.

``unsup_weight`` is the MMT-PSM schedule (authors' ``weight_sum_losses``): zero during burn-in, a Gaussian
ramp-up ``exp(-5 (1-x)^2)`` after it, a Gaussian ramp-down ``exp(-12 (1-x)^2)`` over the last iterations.
``sigmoid_rampup`` is the SSL4MIS / Laine & Aila form used by the semantic mean-teacher methods.
"""
from __future__ import annotations

import math

__all__ = ["sigmoid_rampup", "sigmoid_rampdown", "unsup_weight"]


def sigmoid_rampup(current: float, rampup_length: float) -> float:
    """``exp(-5 (1 - x)^2)`` with ``x = clip(current, 0, length) / length``; 1.0 when ``length == 0``."""
    if rampup_length <= 0:
        return 1.0
    x = min(max(float(current), 0.0), float(rampup_length)) / float(rampup_length)
    return math.exp(-5.0 * (1.0 - x) ** 2)


def sigmoid_rampdown(remaining: float, rampdown_length: float) -> float:
    """``exp(-12 (1 - x)^2)`` with ``x = clip(remaining, 0, length) / length``; 1.0 when ``length == 0``.

    ``remaining`` is the number of iterations left (``max_iter - t``): 1.0 at ``length`` left, ``exp(-12)``
    at 0.
    """
    if rampdown_length <= 0:
        return 1.0
    x = min(max(float(remaining), 0.0), float(rampdown_length)) / float(rampdown_length)
    return math.exp(-12.0 * (1.0 - x) ** 2)


def unsup_weight(
    iteration: int,
    burn_in: int,
    ramp_up: int,
    ramp_down: int,
    max_iter: int,
    base: float,
) -> float:
    """Weight of the unsupervised losses at ``iteration`` (0-based, as Detectron2's ``trainer.iter``).

    - ``iteration < burn_in``: 0 (supervised only).
    - ramp-up, ``burn_in <= t < burn_in + ramp_up``: ``base * exp(-5 (1 - (t - burn_in)/ramp_up)^2)``
      (``base * exp(-5)`` at ``t = burn_in``, ``base`` from ``t = burn_in + ramp_up`` on).
    - ramp-down, ``max_iter - t < ramp_down``: ``base * exp(-12 (1 - (max_iter - t)/ramp_down)^2)``
      (the authors' ``sigmoid_rampdown(total - step, ...)``; ``base * exp(-12)`` at ``t = max_iter``).
    - otherwise ``base``. A ramp length of 0 disables that ramp. Where the two ramps overlap (very short runs)
      their factors multiply, so the weight stays continuous (the authors' code lets the ramp-up win instead).
    """
    if iteration < burn_in:
        return 0.0
    factor = 1.0
    if ramp_up > 0 and iteration - burn_in < ramp_up:
        factor *= sigmoid_rampup(iteration - burn_in, ramp_up)
    if ramp_down > 0 and max_iter - iteration < ramp_down:
        factor *= sigmoid_rampdown(max_iter - iteration, ramp_down)
    return float(base) * factor
