"""Bridges to other libraries, each importing its library only when used.

- :mod:`attnkit.integrations.transformers`: attnkit mechanisms inside Hugging Face ``transformers`` models
  (``attn_implementation=``), in-place conversion of a model's attention (:func:`attnkit.convert`) and
  attention transfer (Hedgehog / LoLCATs). Needs the optional extra ``attnkit[hf]``.
"""
