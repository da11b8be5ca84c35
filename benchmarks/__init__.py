"""Benchmarks and load tests run by hand (not part of the `hmt` package): `python -m benchmarks.NAME`."""
