"""The worker daemon: claims jobs, runs them as process groups, reports back."""
