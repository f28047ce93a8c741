"""Training: Detectron2's DefaultTrainer with this project's data, evaluators and teacher hooks."""
from .hooks import EMATeacherHook, TrainingStateHook
from .trainer import Trainer

__all__ = ["Trainer", "EMATeacherHook", "TrainingStateHook"]
