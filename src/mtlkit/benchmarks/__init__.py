"""Benchmarks (not tests): ``speed`` measures each balancer's step time and peak memory
relative to a plain sum of the losses, optionally beside TorchJD's implementation."""
