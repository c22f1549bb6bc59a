"""Server-side metrics: per-request statistics and their Prometheus export."""
