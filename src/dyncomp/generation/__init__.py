"""Batched decoding with per-sequence compression."""
