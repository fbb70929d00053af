"""libra-fx: visual-token compression for vision-language models, as TorchDynamo graph passes."""

from libra_fx.dynamo_backend import CompileRecord, LibraBackend, LibraFallbackWarning, backend
from libra_fx.api import compile
from libra_fx.config import CompressionConfig
from libra_fx.methods import METHODS, VISION_METHODS, visual_token_counts
from libra_fx.passes import UnsupportedGraph

__all__ = [
    "METHODS",
    "VISION_METHODS",
    "CompileRecord",
    "CompressionConfig",
    "LibraBackend",
    "LibraFallbackWarning",
    "UnsupportedGraph",
    "backend",
    "compile",
    "visual_token_counts",
]
__version__ = "0.1.0"
