"""Benchmarks of qgoft_kernels against its peers: ``python -m benchmarks.run``."""
