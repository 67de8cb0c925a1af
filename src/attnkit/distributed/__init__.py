"""Sequence parallelism on ``torch.distributed`` (gloo on CPU, NCCL on CUDA): the sequence is sharded across ranks.

* :func:`ring_attention` (Ring Attention) and :func:`striped_attention` (Striped Attention): exact softmax
  attention with backward; key/value blocks travel around the ring overlapped with compute, merged by log-sum-exp;
* :func:`ring_self_attention` (Ring Self-Attention, Li et al.): the same result in two ring passes (keys, softmax,
  values) holding ``(n/P) x n`` scores; :func:`sequence_parallel_traffic` compares what each sends and keeps;
  :func:`count_traffic` measures the bytes a rank sends;
* :func:`tree_decode` (Tree Attention): one-query decoding over a sharded KV cache by all-reduce of
  ``(max, sum, weighted values)``;
* :func:`lasp` (LASP): causal linear attention passing the ``d x d`` state point-to-point, with backward;
* :func:`shard`, :func:`unshard`, :func:`shard_positions`: contiguous and striped layouts;
* :func:`run_local`: start a local process group for tests and examples (use ``torchrun`` for jobs).
"""

from ._comm import count_traffic
from .lasp import lasp
from .launch import RankFailure, free_port, run_local
from .layout import LAYOUTS, shard, shard_positions, unshard, unshard_list
from .merge import block_attention, merge_partials
from .ring import ring_attention, striped_attention
from .rsa import ring_self_attention, sequence_parallel_traffic
from .tree import attention_energy, local_decode_stats, tree_decode

__all__ = [
    "ring_attention", "striped_attention", "tree_decode", "lasp", "shard", "unshard", "unshard_list",
    "shard_positions", "LAYOUTS", "block_attention", "merge_partials", "local_decode_stats", "attention_energy",
    "run_local", "free_port", "RankFailure", "ring_self_attention", "sequence_parallel_traffic", "count_traffic",
]
