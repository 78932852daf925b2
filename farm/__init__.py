"""sdfarm: a Ray render farm and job queue for SDXL LoRA / DreamBooth experiments.

The subpackages read as the data flow, each importing only from those before it
(scripts/import_layers.py checks it):

    errors → files → models → sweep → render → runs → score → train → cluster → cli, bench

Only `cluster` (and the two entry points) import Ray.
"""

__version__ = "0.1.0"
