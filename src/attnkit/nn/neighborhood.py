"""attnkit.nn modules of the neighborhood family."""

__all__: list[str] = []
