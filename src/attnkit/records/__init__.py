"""The registry's records, one module per family (``attnkit.registry.FAMILY_MODULES`` lists them): importing a
module registers its family's mechanisms. A record names the functions (``attnkit.functional``, ``attnkit.ops``)
and modules (``attnkit.nn``) that run a mechanism; nothing below this layer imports it."""
