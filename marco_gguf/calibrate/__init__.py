"""Calibration and quality checks against the original weights: importance matrices and `verify`.

Needs torch (the `[calibrate]` extra) for the reference forward pass; nothing else in the package does.
"""
