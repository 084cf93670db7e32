"""Banyan: a distributed job submission system.

One broker holds a durable shared queue in LMDB; worker daemons claim the jobs that fit their
free resources and run them. Everything travels over ZeroMQ as msgpack.

Inside a job, `banyan.progress(42.5, "epoch 3/10")` reports progress (a no-op elsewhere).
"""

from banyan.job import progress

__all__ = ["progress"]
__version__ = "0.1.0"
