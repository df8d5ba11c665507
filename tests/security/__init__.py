"""Attacks on the SDK, written as tests: each holds one rule of the security model."""
