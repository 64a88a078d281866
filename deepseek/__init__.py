"""DeepSeek-V2/V3-style language models: Multi-Head Latent Attention and DeepSeekMoE."""
from deepseek.attention import LatentCache, MultiHeadLatentAttention
from deepseek.config import PRESETS, ModelConfig
from deepseek.model import DeepSeekLM, ModelOutput
from deepseek.moe import MoE, Router

__all__ = ["DeepSeekLM", "LatentCache", "ModelConfig", "ModelOutput", "MoE", "MultiHeadLatentAttention",
           "PRESETS", "Router"]
