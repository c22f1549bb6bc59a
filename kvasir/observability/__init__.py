"""Observability: OpenTelemetry tracing and the ``kvasir top`` terminal view."""
