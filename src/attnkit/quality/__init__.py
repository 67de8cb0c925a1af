"""Quality benchmark (``attnkit quality``): small models trained with each mechanism on synthetic tasks (MQAR,
ListOps, copy, in-context regression), scored against their recurrent state / KV cache size."""

from attnkit.quality.checkpoint import load_checkpoint, save_checkpoint
from attnkit.quality.model import (
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
    "FeatureMapAttention", "MechanismSpec", "QualityModel", "ShortConv", "parse_mechanism", "state_size",
    "DEFAULT_LRS", "DEFAULT_MECHANISMS", "QualityConfig", "run_quality", "train_one", "load_checkpoint",
    "save_checkpoint",
]
