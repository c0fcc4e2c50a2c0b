"""Benchmarks of rlhf-ray against TRL and against this machine's matmul ceiling (`python -m bench.run`).

Not part of the tests: nothing here is asserted by tests/, it only prints and records figures.
"""
