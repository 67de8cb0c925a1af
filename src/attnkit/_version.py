"""The package version (a module of its own so that tools can read it without importing the package face)."""

__version__ = "0.1.0"
