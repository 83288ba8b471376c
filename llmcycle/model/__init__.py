"""The one model implementation, shared by training, post-training, evaluation and serving."""

from llmcycle.model.config import SIZES, ModelConfig, config_for_size
from llmcycle.model.generate import generate
from llmcycle.model.kv_cache import KVCache
from llmcycle.model.transformer import Transformer

__all__ = ["SIZES", "KVCache", "ModelConfig", "Transformer", "config_for_size", "generate"]
