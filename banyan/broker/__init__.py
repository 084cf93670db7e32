"""The broker: the pure job state machine, its LMDB store, and the ZeroMQ server around them."""
