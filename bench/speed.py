"""Speed benchmark of the balancers: ``python bench/speed.py [--quick] [--peers] ...``.

A thin wrapper around :mod:`mtlkit.benchmarks.speed` (also ``mtlkit bench speed``).
"""

from mtlkit.benchmarks.speed import main

if __name__ == "__main__":
    raise SystemExit(main())
