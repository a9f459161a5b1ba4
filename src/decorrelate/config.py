"""The options of a training run: :class:`TrainConfig`, a dataclass of every training option.

The same :class:`TrainConfig` is filled from defaults, then a YAML/JSON file (``--config``), then
command-line flags (which are generated from the fields, so a new option is added in one
place). Unknown keys and invalid values are rejected with the list of valid choices. The resolved
config (with model-specific defaults filled in) is saved as ``config.json`` next to every run.
The machinery (merging, coercion, validation, files, flags) is :mod:`decorrelate.schema`, shared
with the other option sets (``decorrelate fixedpoint``'s).

TrainConfig is assembled from the generic options (:class:`TrainOptions`, below) and the options
each rule family declares beside its rules (:func:`decorrelate.rules.register_options`, e.g.
``feedback_*`` in :mod:`decorrelate.rules.feedback`); the names stay flat, so a config file or a
flag names every option alike.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import schema
from .options import (
    all_positive,
    betas_ok,
    fraction_closed,
    fraction_open,
    non_negative,
    opt,
    positive,
)
from .rules import available_rules, rule_class, rule_options, shorthands
from .schema import Options, check_no_repeats

__all__ = [
    "FIELDS",
    "TrainConfig",
    "TrainOptions",
    "all_positive",
    "betas_ok",
    "check_no_repeats",
    "choices_of",
    "code_references",
    "coerce",
    "fraction_closed",
    "fraction_open",
    "load_config_file",
    "make_config",
    "non_negative",
    "opt",
    "positive",
    "save_config",
    "validate",
    "without_code",
]

# ----------------------------------------------------------------------------- choices


def _datasets() -> tuple[str, ...]:
    from .data import DATASETS

    return DATASETS


def _models() -> tuple[str, ...]:
    from .models import MODELS

    return MODELS


def _activations() -> tuple[str, ...]:
    from .models import ACTIVATIONS

    return ACTIVATIONS


def _normalizations() -> tuple[str, ...]:
    from .data import NORMALIZATIONS

    return NORMALIZATIONS


def _weight_inits() -> tuple[str, ...]:
    from .models import WEIGHT_INITS

    return WEIGHT_INITS


def _rules() -> tuple[str, ...]:
    """The rules a training run can use (not those of another command, e.g. fixedpoint)."""
    return (*available_rules("train"), *shorthands())


def _check_rule(value: str) -> str | None:
    """Point a rule of another command (a fixed-point rule) to that command."""
    if value not in available_rules():
        return None  # unknown: the list of choices says what there is
    command = rule_class(value).command
    if command == "train":
        return None
    return f"a rule of `decorrelate {command}`: run `decorrelate {command} --rule {value}`"


def expand_shorthands(values: dict[str, Any]) -> dict[str, Any]:
    """A shorthand rule (:func:`~decorrelate.rules.register_shorthand`) → its rule, with the
    decorrelation it implies unless another method is given (``rule: danp`` → ``rule: anp``,
    ``decor: copi``, ``decor_lr: 1e-3``, ``decor_sample_frac: 1.0``, each option unless given)."""
    implied = shorthands().get(str(values.get("rule")))
    if implied is None:
        return values
    rule, decorrelation = implied
    values = {**values, "rule": rule}
    if values.get("decor", "none") == "none":
        values["decor"] = decorrelation["decor"]
        for key, value in decorrelation.items():
            values.setdefault(key, value)
    return values


def _decor_methods() -> tuple[str, ...]:
    from .nn import METHODS

    return ("none", *METHODS)


def _losses() -> tuple[str, ...]:
    from .losses import LOSSES

    return LOSSES


OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine")
DEVICES = ("auto", "cpu", "cuda")

# ----------------------------------------------------------------------------- fields


@dataclass
class TrainOptions(Options):
    """The generic options of a training run (TrainConfig adds the rule families' own)."""

    # data
    dataset: str = opt("mnist", "dataset", "str", choices=_datasets, group="data")
    data_dir: str | None = opt(
        None, "directory holding the dataset files", "str", optional=True, group="data"
    )
    val_split: float = opt(
        0.0,
        "fraction of the training set held out for validation",
        "float",
        check=fraction_open,
        group="data",
    )
    train_size: int | None = opt(
        None,
        "use only this many training examples (low-data runs)",
        "int",
        check=positive,
        optional=True,
        group="data",
    )
    normalize: str = opt(
        "standard",
        "input scaling: standard (per channel, training-set statistics), unit (pixels/255, the "
        "node perturbation authors'), none (raw pixels 0-255); true/false: standard/unit",
        "str",
        choices=_normalizations,
        aliases={True: "standard", False: "unit"},
        group="data",
    )
    synthetic_shape: list[int] = opt(
        [3, 32, 32],
        "input shape of the synthetic dataset",
        "ints",
        check=all_positive,
        group="data",
    )
    synthetic_classes: int = opt(
        10,
        "classes of the synthetic dataset",
        "int",
        check=lambda v: None if v >= 2 else "must be >= 2",
        group="data",
    )
    synthetic_train: int = opt(
        5000, "training examples of the synthetic dataset", "int", check=positive, group="data"
    )
    synthetic_test: int = opt(
        1000, "test examples of the synthetic dataset", "int", check=positive, group="data"
    )
    # model
    model: str = opt("mlp", "model architecture", "str", choices=_models, group="model")
    widths: list[int] | None = opt(
        None,
        "hidden fully connected widths (mlp default 1000,1000,1000; convnet default 1000)",
        "ints",
        check=all_positive,
        optional=True,
        group="model",
    )
    channels: list[int] | None = opt(
        None,
        "conv channels, a 2x2 max-pool after every second (default 32,32,64,64)",
        "ints",
        check=all_positive,
        optional=True,
        group="model",
    )
    activation: str = opt(
        "leaky-relu", "hidden activation", "str", choices=_activations, group="model"
    )
    leaky_slope: float = opt(
        0.01,
        "negative-side slope of leaky-relu (paper 1: 0.01; the NP authors' TensorFlow: 0.2)",
        "float",
        check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)",
        group="model",
    )
    weight_init: str = opt(
        "torch",
        "weight init of standard models: torch (PyTorch's default) or he-normal (Keras' "
        "truncated HeNormal, zero biases: the NP authors' TensorFlow)",
        "str",
        choices=_weight_inits,
        group="model",
    )
    # learning rule and decorrelation
    rule: str = opt(
        "bp",
        "learning rule (how .grad is filled)",
        "str",
        choices=_rules,
        check=_check_rule,
        group="rule",
    )
    decor: str = opt(
        "none",
        "decorrelation method before every Linear/Conv2d",
        "str",
        choices=_decor_methods,
        group="rule",
    )
    decor_lr: float | None = opt(
        None,
        "decorrelation learning rate eta (default: per method)",
        "float",
        check=positive,
        optional=True,
        group="rule",
    )
    decor_kappa: float | None = opt(
        None,
        "dbp: weight of the variance term kappa (default: per method)",
        "float",
        check=lambda v: None if 0 <= v <= 1 else "must be in [0, 1]",
        optional=True,
        group="rule",
    )
    decor_sample_frac: float = opt(
        0.1, "fraction of each batch used to update R", "float", check=fraction_closed, group="rule"
    )
    decor_max_samples: int | None = opt(
        256,
        "cap on the conv patches (positions) per R update; none: every position of the sampled "
        "images, as the authors",
        "int",
        check=positive,
        optional=True,
        group="rule",
    )
    decor_var_floor: float | None = opt(
        None,
        "copi/dbp/scaled: freeze R's rows of inputs whose running variance is below this "
        "fraction of the mean (default 1e-2; 0: off, as the authors)",
        "float",
        check=fraction_open,
        optional=True,
        group="rule",
    )
    decor_demean: bool = opt(
        False, "subtract a running mean before decorrelating", "bool", group="rule"
    )
    decor_every: int | None = opt(
        None,
        "step R every N training steps (default: 1; zca/newton recompute every 10)",
        "int",
        check=positive,
        optional=True,
        group="rule",
    )
    decor_block_size: int | None = opt(
        None,
        "block-diagonal R with blocks of at most N inputs (default: full R, the paper's method)",
        "int",
        check=positive,
        optional=True,
        group="rule",
    )
    decor_block_above: int | None = opt(
        4096,
        "without --decor-block-size: block-diagonal R (blocks of at most 1024) on layers with "
        "more than N inputs; none: full R everywhere, the paper's method",
        "int",
        check=positive,
        optional=True,
        group="rule",
    )
    decor_exclude: str = opt(
        "",
        "comma-separated layer names (as in model.named_modules()) to leave undecorrelated",
        "str",
        group="rule",
    )
    alignment_every: int = opt(
        0,
        "every N steps log the angle between each layer's update and the BP gradient (0: off)",
        "int",
        check=non_negative,
        group="rule",
    )
    alignment_score: bool = opt(
        False,
        "bp only: also accumulate the align-zero prediction of the weight change and log the "
        "alignment score per layer (and its shuffled control) every epoch",
        "bool",
        group="rule",
    )
    # optimisation
    optimizer: str = opt("adam", "optimizer", "str", choices=OPTIMIZERS)
    lr: float = opt(1e-3, "learning rate", "float", check=positive)
    momentum: float = opt(
        0.9, "sgd momentum", "float", check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)"
    )
    betas: list[float] = opt([0.9, 0.999], "adam betas (beta1,beta2)", "floats", check=betas_ok)
    weight_decay: float = opt(
        0.0, "weight decay (L2, as in torch.optim)", "float", check=non_negative
    )
    lr_schedule: str = opt(
        "constant", "learning-rate schedule over all steps", "str", choices=SCHEDULES
    )
    loss: str = opt(
        "cross-entropy", "loss (mse-shifted: one-hot targets minus 0.1)", "str", choices=_losses
    )
    batch_size: int = opt(256, "training batch size", "int", check=positive)
    eval_batch_size: int = opt(1000, "evaluation batch size", "int", check=positive)
    epochs: int = opt(5, "training epochs", "int", check=non_negative)
    max_loss_growth: float = opt(
        1e3,
        "stop as diverged (exit 3) once the training loss exceeds this many times its value "
        "before training (0: never)",
        "float",
        check=lambda v: None if v == 0 or v > 1 else "must be 0 (off) or > 1",
    )
    # run
    seed: int = opt(
        0, "run seed (model init, data order, rule noise)", "int", check=non_negative, group="run"
    )
    device: str = opt(
        "auto", "device: auto picks cuda when available", "str", choices=DEVICES, group="run"
    )
    threads: int | None = opt(
        None,
        "CPU threads for torch (default: torch's choice)",
        "int",
        check=positive,
        optional=True,
        group="run",
    )
    dist_timeout: float = opt(
        300.0,
        "multi-process runs: seconds a collective may wait for the other ranks before failing",
        "float",
        check=positive,
        group="run",
    )
    dist_backend: str = opt(
        "auto",
        "multi-process runs: torch.distributed backend (auto: nccl on CUDA, gloo on CPU)",
        "str",
        choices=("auto", "gloo", "nccl"),
        group="run",
    )
    out: str | None = opt(
        None,
        "output directory (default runs/<dataset>-<model>-<rule>-<decor>-s<seed>)",
        "str",
        optional=True,
        group="run",
    )


@dataclass
class TrainConfig(*reversed(rule_options()), TrainOptions):  # type: ignore[misc]
    """Every option of a training run. See ``decorrelate train --help`` for the same list.

    The fields are :class:`TrainOptions`' followed by those of each rule family's registered
    options (:func:`decorrelate.rules.rule_options`), in registration order.
    """

    @classmethod
    def prepare(cls, values: dict[str, Any]) -> dict[str, Any]:
        return expand_shorthands(values)

    def default_out(self) -> str:
        return f"runs/{self.dataset}-{self.model}-{self.rule}-{self.decor}-s{self.seed}"


FIELDS: dict[str, dataclasses.Field] = schema.fields_of(TrainConfig)


def code_references(config: TrainConfig) -> dict[str, str]:
    """The options of ``config`` whose values name Python code to import (``module:function``).

    Validating a config never imports anything; the code is imported only when a run uses it.
    A config read from a checkpoint must not decide that on its own: :func:`decorrelate.resume`
    asks the user to name these values themselves.
    """
    refs = {}
    for name, f in FIELDS.items():
        names_code = f.metadata.get("code")
        value = getattr(config, name)
        if names_code is not None and value is not None and names_code(value):
            refs[name] = value
    return refs


def without_code(config: TrainConfig) -> TrainConfig:
    """``config`` with every option that names code (:func:`code_references`) at its default.

    For uses that never run those options, such as evaluating a checkpoint's weights.
    """
    refs = code_references(config)
    if not refs:
        return config
    return config.replace(**{name: FIELDS[name].default for name in refs})


def choices_of(name: str) -> tuple[str, ...] | None:
    return schema.choices_of(TrainConfig, name)


# ----------------------------------------------------------------------------- parsing


def coerce(name: str, value: Any) -> Any:
    """Convert ``value`` (from a file or the command line) to the field's type, or raise."""
    return schema.coerce(TrainConfig, name, value)


def validate(config: TrainConfig) -> TrainConfig:
    """Check choices and ranges of every field; raise a one-line :class:`UserError` otherwise."""
    return schema.validate(config)


def make_config(*layers: Mapping[str, Any] | None) -> TrainConfig:
    """Merge mappings of options (later ones win) over the defaults, coerce and validate.

    Within one mapping an option may appear once: two spellings of it would leave which one
    wins to the mapping's order.
    """
    return schema.make(TrainConfig, *layers)


#: Where shipped configuration files live (``--config NAME`` finds ``NAME.yaml`` there).
EXPERIMENTS_DIR = Path(__file__).resolve().parent / "experiments"


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping of options (no validation yet: see :func:`make_config`).

    A bare name that is not a file, e.g. ``np-authors``, is looked up among the configuration
    files shipped in ``decorrelate/experiments`` (the papers' settings).
    """
    return schema.load_config_file(path, shipped=EXPERIMENTS_DIR)


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write ``config.json`` atomically (a temp file renamed into place, like the checkpoint)."""
    from .checkpoint import atomic_write_bytes

    text = json.dumps(config.to_dict(), indent=2) + "\n"
    atomic_write_bytes(Path(path), lambda f: f.write(text.encode()))
