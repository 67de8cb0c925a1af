"""``attnkit kvcache``: judge KV-cache selection policies (``attnkit.cache.choose_policies``) by the recall of a
model saved by ``attnkit quality --save`` (``judge``: the measurement; ``cli``: the command)."""
