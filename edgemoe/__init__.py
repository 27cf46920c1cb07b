"""edgemoe: run large Mixture-of-Experts language models on small devices under a hard memory budget."""

from .arch import ArchSpec
from .errors import EdgeMoEError, FormatError, UnsupportedModelError
from .model import Model, load

__version__ = "0.1.0"
__all__ = ["ArchSpec", "EdgeMoEError", "FormatError", "Model", "UnsupportedModelError", "load"]
