"""libra-fx: visual-token compression for vision-language models, as TorchDynamo graph passes."""

from libra_fx.api import compile
from libra_fx.dynamo_backend import CompileRecord, LibraBackend, backend
from libra_fx.config import CompressionConfig
from libra_fx.errors import LibraFallbackWarning, UnsupportedGraph
from libra_fx.methods import DECODER_METHODS, METHODS, VISION_METHODS, method, visual_token_counts

__all__ = [
    "DECODER_METHODS",
    "METHODS",
    "VISION_METHODS",
    "CompileRecord",
    "CompressionConfig",
    "LibraBackend",
    "LibraFallbackWarning",
    "UnsupportedGraph",
    "backend",
    "compile",
    "method",
    "visual_token_counts",
]
__version__ = "0.1.0"
