"""hybrid: DeepSeek-V3-family MoE inference with GPU attention and CPU routed experts."""

__version__ = "0.1.0"
