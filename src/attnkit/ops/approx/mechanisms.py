"""Registers this family's mechanisms (filled in by the family's issue)."""
