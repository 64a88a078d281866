"""DeepSeek-V2/V3-style language models: Multi-Head Latent Attention and DeepSeekMoE, and their training engine.

Import from the modules themselves (`from deepseek.model import DeepSeekLM`, `from deepseek.config import
ModelConfig`): a package that imports nothing lets each pipeline stage load, and depend on, only what it uses.
"""
