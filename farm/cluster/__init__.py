"""The only layer that imports Ray: connecting, the dispatch driver, worker pools, the job queue,
GPU-pinned actors and metrics.
"""
