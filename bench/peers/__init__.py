"""Celery + Redis and HyperQueue, run beside Banyan as references in W1, W2 and W3.

`harness.py` runs in the bench's own environment and starts the peers' services as
subprocesses; `celery_app.py` and `driver.py` run in the peers' environment
(`bench/peers/.venv`, made by `install.py`), which has Celery and HyperQueue but not Banyan.
Nothing here imports anything at package level, so either side can import its modules.
"""
