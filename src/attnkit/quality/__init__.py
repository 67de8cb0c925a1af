"""Quality benchmark (``attnkit quality``): small models trained with each mechanism on synthetic tasks (MQAR,
ListOps, copy, in-context regression), scored against their recurrent state / KV cache size.

The model (:class:`QualityModel`) is the Zoology / Based block for every mechanism: pre-norm residual blocks of
``[short causal depthwise convolution (kernel 3) -> token mixer]`` + MLP, no positional embedding
(``--no-conv``: no convolution, learned positions instead). Each (task, mechanism) trains once per learning rate
of a grid and seed, and reports the best learning rate (mean over seeds, with the spread), every value kept in
``quality.json``. ``--sweep state`` trains each mechanism at several state sizes for the recall-memory frontier.

The mixer slot takes any of:

- a registry attention record (``kind="attention"``), through ``attnkit.nn.MultiheadAttention``;
- ``linear:<feature map>`` (optionally ``@qk_dim=16``: queries/keys projected to 16 per head, as Based);
- a registry token mixer (``kind="mixer"``), built by the record's factory with ``dim=embed_dim, causal=...``
  (plus the other shapes its ``needs`` lists); its state per layer comes from
  ``extras["state_size"](dim=, seq_len=, **params)`` when the record gives one.

Parameters for the short task sequences come from the record's ``small_params`` (else :data:`QUALITY_PARAMS`).

Devices (:mod:`attnkit.quality.device`): ``QualityConfig.device`` (``attnkit quality --device {cpu,cuda,auto}``)
and ``precision`` (``"auto"``: bf16 autocast on CUDA except the mechanisms that need float32); the Zoology preset
(:mod:`attnkit.quality.presets`, ``--preset zoology``): MQAR accuracy against model width at Zoology's scale.

Checkpoints (for analyses that reuse trained models): ``attnkit quality --save DIR`` (``QualityConfig.save_dir``)
writes ``DIR/<task>--<mechanism>.pt`` for every trained (task, mechanism), the run at its best learning rate and
first seed, holding the weights and everything needed to rebuild the model (mechanism spec, model shape, task and
its parameters, training settings, metric); :func:`load_checkpoint` ``(path) -> (model, info)`` rebuilds the model
in eval mode (see :mod:`attnkit.quality.checkpoint` for ``info``)::

    model, info = attnkit.quality.load_checkpoint("ckpt/mqar--softmax.pt")
    logits = model(token_ids)  # [batch, seq, vocab]; info["task_params"] regenerates the data
"""

from attnkit.quality.checkpoint import load_checkpoint, save_checkpoint
from attnkit.quality.model import (
    QUALITY_PARAMS,
    FeatureMapAttention,
    MechanismSpec,
    QualityModel,
    ShortConv,
    parse_mechanism,
    state_size,
)
from attnkit.quality.tasks import (
    TASKS,
    Task,
    TaskBatch,
    copy_task,
    evaluate_listops,
    get_task,
    icl_regression,
    listops,
    mqar,
)
from attnkit.quality.train import DEFAULT_LRS, DEFAULT_MECHANISMS, QualityConfig, run_quality, train_one

__all__ = [
    "TASKS", "Task", "TaskBatch", "copy_task", "evaluate_listops", "get_task", "icl_regression", "listops", "mqar",
    "QUALITY_PARAMS", "FeatureMapAttention", "MechanismSpec", "QualityModel", "ShortConv", "parse_mechanism",
    "state_size",
    "DEFAULT_LRS", "DEFAULT_MECHANISMS", "QualityConfig", "run_quality", "train_one", "load_checkpoint",
    "save_checkpoint",
]
