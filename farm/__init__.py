"""sdfarm: a Ray render farm and job queue for SDXL LoRA / DreamBooth experiments.

Data flow, one module a stage: spec → plan → dispatch (queue, scheduling) → actors (render) →
render results → manifest → grid. Only `actors`, `dispatch` and `cli` import Ray.
"""

__version__ = "0.1.0"
