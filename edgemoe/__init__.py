"""edgemoe: run large Mixture-of-Experts language models on small devices under a hard memory budget."""

from .errors import EdgeMoEError, FormatError, UnsupportedModelError
from .model import Model, load

__version__ = "0.1.0"
__all__ = ["ArchSpec", "EdgeMoEError", "FormatError", "Model", "UnsupportedModelError", "load"]


def __getattr__(name: str):
    if name == "ArchSpec":  # made from the C core's table on first use (edgemoe.arch)
        from .arch import ArchSpec

        return ArchSpec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
