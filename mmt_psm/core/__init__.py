"""The teacher-student core shared by every method; it imports no task package.

Tasks contribute their mappers, evaluators, data-set checks and hooks through :mod:`mmt_psm.core.registry`;
the :class:`~mmt_psm.core.trainer.Trainer` (a ``DefaultTrainer`` subclass) uses them by name.
"""
from mmt_psm.core.config import add_core_config
from mmt_psm.core.ema import EMATeacherHook
from mmt_psm.core.trainer import Trainer

__all__ = ["Trainer", "EMATeacherHook", "add_core_config"]
