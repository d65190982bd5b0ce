"""GPU and CPU benchmarks: ``python -m bench --help``."""
