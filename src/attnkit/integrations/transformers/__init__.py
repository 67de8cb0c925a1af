"""attnkit inside Hugging Face ``transformers`` models: attention by name, in-place conversion, attention transfer.

transformers looks up a model's attention function by name (``config._attn_implementation``) in
``AttentionInterface``, and the function that builds the mask for it in ``AttentionMaskInterface``. This module
registers attnkit there:

- :func:`register` ``(mechanism, **params) -> name``: any registered attnkit mechanism (``attnkit list``) as
  ``attn_implementation=name``, for ``AutoModelForCausalLM.from_config(cfg, attn_implementation=name)`` or an
  existing model's ``model.set_attn_implementation(name)``. ``register("softmax")`` reproduces the model's own
  eager / sdpa attention (tested to float tolerance), masks included.
- :func:`convert` ``(model, mechanism=, layers=)``: swap the attention of chosen layers in place, keeping every
  weight (the mechanism's own parameters, e.g. Hedgehog feature maps, are added to the attention modules as
  ``attnkit_attention``); the other layers keep exact softmax attention.
- :func:`distill`: attention transfer (Zhang et al., "The Hedgehog & the Porcupine: Expressive Linear Attentions
  with Softmax Mimicry", ICLR 2024: its attention-distillation loss, the cross-entropy between softmax and linear
  attention weights; and LoLCATs, Zhang et al., "LoLCATs: On Low-Rank Linearizing of Large Language Models",
  2024: its attention-transfer loss, the MSE between attention outputs): every converted layer's mechanism learns
  to mimic that layer's softmax attention on the same queries and keys, while the model runs on softmax outputs
  (so each layer is trained on exact inputs). :func:`finetune` then optionally trains the converted model on
  next-token prediction.
- :func:`attention_errors` (per-layer relative error of the attention output against softmax), :func:`perplexity`,
  and :func:`attention_transfer`, which runs the whole recipe and reports both before and after.
- :func:`sample_text` / :func:`byte_sequences`: English text that ships with the package (attnkit's own
  docstrings) as byte tokens (vocabulary 256), so nothing is downloaded.

Masks follow ``sdpa_attention_forward`` exactly: the mask function registered for attnkit's names is
transformers' ``sdpa_mask``, so an attention function receives ``None`` (no padding: causal for ``q_len > 1``
when the module is causal, with keys cropped to ``q_len`` if there are more, as SDPA's top-left ``is_causal``
does; every key for ``q_len == 1``) or a boolean mask ``[batch, 1, q_len, kv_len]`` (``True``: attend). A float
mask passed by the caller is additive, as in eager attention. Mechanisms other than ``"softmax"`` run with the
mask's structure (causal or bidirectional); a padding mask raises ``NotSupportedError``, and a sliding-window mask
is replaced by the mechanism's own pattern (the mechanism replaces the model's attention).

Decoding (``generate``) uses the model's own cache for keys and values; causal kernelized linear attention
(the ``linear`` family) also keeps its recurrent state (``LinearAttentionState``, as in
``attnkit.RecurrentStateCache``) on the layer, so each new token costs O(1) in the sequence length. With every
layer converted to such a mechanism, ``generate(..., cache=state_cache())`` keeps only those states: memory
O(1) in the sequence length too.

Shapes: transformers passes ``query [batch, heads, q_len, head_dim]``, ``key, value [batch, kv_heads, kv_len,
head_dim]`` (grouped-query attention when ``kv_heads < heads``); the functions return ``[batch, q_len, heads,
head_dim]`` as transformers expects.
"""

from __future__ import annotations

from attnkit.integrations.transformers._common import DISPATCH_NAME
from attnkit.integrations.transformers.attention import AttnkitAttention
from attnkit.integrations.transformers.cache import state_cache
from attnkit.integrations.transformers.convert import attention_modules, convert, converted_layers, register
from attnkit.integrations.transformers.train import (
    TransferReport,
    attention_errors,
    attention_transfer,
    byte_sequences,
    distill,
    finetune,
    perplexity,
    sample_text,
)

__all__ = [
    "DISPATCH_NAME", "AttnkitAttention", "register", "convert", "attention_modules", "converted_layers",
    "distill", "finetune", "perplexity", "attention_errors", "attention_transfer", "TransferReport",
    "sample_text", "byte_sequences", "state_cache",
]
