"""Fuzz harnesses for every compiled entry point (see docs/fuzzing.md).

Each harness module exposes ``one(data: bytes) -> str``: it turns the bytes into one
structured, mostly-valid-then-mutated input, feeds it to the compiled code through its
Python surface, checks the outcome against an independent oracle, and returns a short
outcome label (used as feedback by the runner). Any other exception is a finding.
"""
