"""Banyan: a distributed job submission system.

One broker holds a durable shared queue in LMDB; worker daemons claim the jobs that fit their
free resources and run them. Everything travels over ZeroMQ as msgpack.
"""

__version__ = "0.1.0"
