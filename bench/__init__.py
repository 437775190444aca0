"""Benchmarks (`kvrack bench ...`), the trace simulator (`kvrack sim`) and the daemon launcher that
tests and benchmarks use. Not part of what an engine imports."""
