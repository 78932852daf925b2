"""Model and LoRA files: resolving and hashing them, the kohya/SGM file layouts, SDXL's component
configs for single-file checkpoints, the farm's cache and the tiny random-weight model.
"""
