"""Registers the exact family."""
