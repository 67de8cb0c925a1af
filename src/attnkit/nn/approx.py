"""attnkit.nn modules of the approx family."""

__all__: list[str] = []
