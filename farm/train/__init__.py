"""Training: kohya datasets and step math, the LoRA / DreamBooth trainer (`trainer` wires the
model, step, checkpoint, resume and progress modules), regularization sets and studies
(train → render checkpoints). No Ray: the cluster layer runs a `TrainRun` on a worker.
"""
