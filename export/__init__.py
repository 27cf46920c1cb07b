"""edgemoe's workstation side (import name `edgemoe_export`): checkpoint readers, calibration, compression, writers.

Install with `pip install edgemoe[export]`. The device side (`edgemoe`) never imports this package at module level.
"""

from .checkpoint import Checkpoint, open_checkpoint
from .pipeline import export

__all__ = ["Checkpoint", "export", "open_checkpoint"]
