"""Stage 3, the runtime's model: RoPE, layers, the MLA cache, routed experts, the model, the loader that applies a plan, and timing."""
