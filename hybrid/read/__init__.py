"""Stage 1, reading: config.json, tensor names, the safetensors checkpoint, block-FP8, tiny checkpoints, the expert store and the converter that writes it."""
