"""The `kvrack` command line: status and administration of a running daemon, benchmarks, the simulator."""
