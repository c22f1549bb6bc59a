"""Benchmarks: `kvasir bench latency|throughput|serve`."""
