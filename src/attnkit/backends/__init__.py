"""Backends of attnkit's operations with declared capabilities and one dispatch (see ``base`` and ``catalog``).

``attnkit.backends.backends()`` (and ``attnkit backends`` on the command line) lists what is installed and usable
here; ``engine="auto"`` in ``attnkit.attention``, ``attnkit.neighborhood`` and ``attnkit.linear_attention`` picks
the first backend, by its rank on the call's device, that supports the call; a named engine that cannot run it
raises ``attnkit.NotSupportedError`` with its reasons.
"""

from attnkit.backends.base import Backend, backends, get_backend, list_backends, register_backend, select, use_engine

__all__ = ["Backend", "backends", "get_backend", "list_backends", "register_backend", "select", "use_engine"]
