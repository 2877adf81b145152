"""Benchmarks and reports that drive Ratchet through its public interfaces (HTTP and CLI)."""
