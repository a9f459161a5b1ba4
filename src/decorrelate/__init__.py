"""decorrelate: learning rules beyond backprop, and decorrelation that makes them work.

The one idea: a learning rule is a way to fill ``.grad``. Decorrelation lives in the model and
updates itself after each optimizer step, so every rule composes with every decorrelation method
and every optimizer. Five lines on your own model::

    import decorrelate as dc
    model = dc.nn.decorrelate(my_model, "scaled")        # R before every Linear/Conv2d
    rule = dc.get_rule("bp"); rule.attach(model, dc.Loss("cross-entropy"))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for x, y in batches:
        opt.zero_grad(); rule.backward(model, x, y); opt.step(); dc.nn.local_update(model)
"""

from . import fixedpoint as fixedpoint  # registers the fixed-point rules
from . import metrics as metrics
from . import nn as nn
from .config import TrainConfig, make_config
from .context import BatchShard, StepContext
from .errors import DataError, TrainingDiverged, UserError
from .losses import Loss
from .models import MLP, ConvNet, build_model
from .rules import LearningRule, StepOutput, available_rules, get_rule, register_rule
from .train import RunResult, Trainer, evaluate, evaluate_checkpoint, resume, train

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "BatchShard",
    "ConvNet",
    "DataError",
    "LearningRule",
    "Loss",
    "RunResult",
    "StepContext",
    "StepOutput",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "UserError",
    "available_rules",
    "build_model",
    "evaluate",
    "evaluate_checkpoint",
    "get_rule",
    "make_config",
    "register_rule",
    "resume",
    "train",
]
