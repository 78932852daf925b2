"""Everything that touches Ray (with the cli and bench entry points): connecting and auth, the
dispatch driver, worker pools, the job queue, GPU-pinned actors and metrics.
"""
