"""grok_moe: Grok-1-style sparse mixture-of-experts transformers in JAX/Haiku."""

from grok_moe.api import GenerationStats, Model
from grok_moe.checkpoint import (checkpoint_config, load_checkpoint, quantize_params,
                                 save_checkpoint)
from grok_moe.config import BENCH, GROK_1, PRESETS, TINY, ModelConfig
from grok_moe.errors import (CheckpointError, ConfigError, GrokMoeError, InputError,
                             MeshError, TokenizerError)
from grok_moe.kv_cache import KVCache, init_cache
from grok_moe.manifest import checkpoint_manifest, parameter_shapes
from grok_moe.memory import MemoryPlan, memory_plan
from grok_moe.model import ModelOutput, Routing, forward
from grok_moe.params import abstract_params, init_params, stack_release
from grok_moe.quant import QuantizedWeight, dequantize, quantize
from grok_moe.sampling import SamplingConfig
from grok_moe.sharding import ShardingPlan, make_mesh
from grok_moe.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "BENCH", "GROK_1", "PRESETS", "TINY", "CheckpointError", "ConfigError", "GenerationStats",
    "GrokMoeError", "InputError", "KVCache", "MemoryPlan", "MeshError", "Model", "ModelConfig",
    "ModelOutput", "QuantizedWeight", "Routing", "SamplingConfig", "ShardingPlan", "Tokenizer",
    "TokenizerError", "abstract_params", "checkpoint_config", "checkpoint_manifest",
    "dequantize", "forward",
    "init_cache", "init_params", "load_checkpoint", "make_mesh", "memory_plan",
    "parameter_shapes", "quantize", "quantize_params", "save_checkpoint", "stack_release",
]
