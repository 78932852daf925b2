"""One image from one task: pipeline loading and memory plans, the LoRA adapter cache, prompt
conditioning, k-diffusion sampling and A1111 PNG info. No Ray: a worker calls `Renderer`.
"""
