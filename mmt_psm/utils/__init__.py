"""Utilities that are not part of training itself (drawing predictions and pseudo-labels)."""
