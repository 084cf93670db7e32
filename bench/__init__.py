"""Banyan's benchmarks: one script per figure, run alone or all together by run_all.py."""
