"""Speculative decoding: proposers, verification and adaptive speculation length."""
