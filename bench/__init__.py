"""GPU benchmarks, run as scripts (`python bench/X.py`); a package only so `bench.common` imports."""
