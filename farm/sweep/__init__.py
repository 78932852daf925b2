"""Job specs → tasks: the typed spec (pydantic, one-line errors naming the YAML path), sampler
names and prompt syntax as A1111/ComfyUI read them, and the plan: frozen tasks with content-hash ids.
No torch, no Ray.
"""
