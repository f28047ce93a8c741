"""Step guards on one process: a non-finite loss raises naming the terms and the iteration. The 2-process
behaviour (every rank stops) is tested in test_ddp_guards.py."""
from __future__ import annotations

import pytest
import torch

from mmt_psm.core.step_guards import check_losses_finite


def test_non_finite_loss_names_terms_and_iteration():
    check_losses_finite({"loss_a": torch.tensor(1.0), "loss_b": torch.tensor(2.0)}, 3)
    with pytest.raises(FloatingPointError, match=r"iteration=7 \(rank 0: \{'loss_b': nan\}\)"):
        check_losses_finite({"loss_a": torch.tensor(1.0), "loss_b": torch.tensor(float("nan"))}, 7)
    with pytest.raises(FloatingPointError, match="'loss_a': inf"):
        check_losses_finite({"loss_a": torch.tensor(float("inf"), dtype=torch.float16)}, 0)
