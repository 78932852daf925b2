"""Training: kohya datasets and step math, the LoRA trainer, regularization sets and studies
(train → render checkpoints). No Ray: the cluster layer runs a `TrainRun` on a worker.
"""
