"""attnkit.nn modules of the linear family."""

__all__: list[str] = []
