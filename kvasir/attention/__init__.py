"""Attention backends: an interface, a registry, a torch reference and a Triton backend."""
