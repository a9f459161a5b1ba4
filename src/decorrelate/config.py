"""The one configuration system: a dataclass of every training option.

The same :class:`TrainConfig` is filled from defaults, then a YAML/JSON file (``--config``), then
command-line flags (which are generated from the fields below, so a new option is added in one
place). Unknown keys and invalid values are rejected with the list of valid choices. The resolved
config (with model-specific defaults filled in) is saved as ``config.json`` next to every run.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

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


#: Rule names that are shorthands for a rule plus decorrelation: paper 2's decorrelated NP
#: variants, as the authors' code runs them: the copi rule at decorrelation learning rate 1e-3,
#: with R learned from the whole batch (``decor_sample_frac`` 1.0; our default elsewhere is
#: ⌊0.1·B⌋ + 1 samples, paper 1's choice). Each can still be overridden.
RULE_SHORTHANDS = {"dnp": "np", "dinp": "inp", "danp": "anp"}
SHORTHAND_DECOR = {"decor": "copi", "decor_lr": 1e-3, "decor_sample_frac": 1.0}


def _normalizations() -> tuple[str, ...]:
    from .data import NORMALIZATIONS

    return NORMALIZATIONS


def _weight_inits() -> tuple[str, ...]:
    from .models import WEIGHT_INITS

    return WEIGHT_INITS


def _rules() -> tuple[str, ...]:
    from .rules import available_rules

    return (*available_rules(), *RULE_SHORTHANDS)


def expand_shorthands(values: dict[str, Any]) -> dict[str, Any]:
    """``rule: danp`` → ``rule: anp`` with copi decorrelation unless another method is given."""
    rule = values.get("rule")
    if rule not in RULE_SHORTHANDS:
        return values
    values = {**values, "rule": RULE_SHORTHANDS[rule]}
    if values.get("decor", "none") == "none":
        values["decor"] = SHORTHAND_DECOR["decor"]
        for key in ("decor_lr", "decor_sample_frac"):
            values.setdefault(key, SHORTHAND_DECOR[key])
    return values


def _decor_methods() -> tuple[str, ...]:
    from .nn import METHODS

    return ("none", *METHODS)


def _feedback_inits() -> tuple[str, ...]:
    from .rules.feedback import FEEDBACK_INITS

    return FEEDBACK_INITS


def _check_noise(value: Any) -> str | None:
    """Checks the form of a noise source; never imports (see :func:`code_references`)."""
    from .rules.perturbation import NOISES, resolve_noise_spec

    try:
        resolve_noise_spec(value)
    except UserError as exc:
        return f"{exc}; or one of: {', '.join(NOISES)}"
    return None


def _names_code(value: Any) -> bool:
    from .rules.perturbation import is_import_spec

    return is_import_spec(value)


def _losses() -> tuple[str, ...]:
    from .losses import LOSSES

    return LOSSES


OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine")
DEVICES = ("auto", "cpu", "cuda")

# ----------------------------------------------------------------------------- fields

# kind: "str" | "int" | "float" | "bool" | "ints" | "floats"; optional: None allowed.


def opt(
    default: Any,
    help: str,
    kind: str,
    *,
    choices: Callable[[], tuple[str, ...]] | tuple[str, ...] | None = None,
    check: Callable[[Any], str | None] | None = None,
    optional: bool = False,
    group: str = "training",
    code: Callable[[Any], bool] | None = None,
    aliases: dict[Any, Any] | None = None,
) -> Any:
    """A config field with what the CLI and the validator need to know about it.

    ``code(value)`` is true when the value names Python code to import (see
    :func:`code_references`). ``aliases`` maps earlier spellings of a value (e.g. the
    booleans of a former bool option) to the current one, so old config files and saved runs
    keep loading.
    """
    meta = {
        "help": help,
        "kind": kind,
        "choices": choices,
        "check": check,
        "optional": optional,
        "group": group,
        "code": code,
        "aliases": aliases or {},
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def fraction_open(v: float) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def fraction_closed(v: float) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


def all_positive(v: list) -> str | None:
    return None if all(x > 0 for x in v) else "all entries must be > 0"


def betas_ok(v: list) -> str | None:
    return None if len(v) == 2 and all(0 <= b < 1 for b in v) else "must be two numbers in [0, 1)"


@dataclass
class TrainConfig:
    """Every option of a training run. See ``decorrelate train --help`` for the same list."""

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
    test_size: int | None = opt(
        None,
        "evaluate on a fixed random subset of this many test examples (faster evaluation)",
        "int",
        check=positive,
        optional=True,
        group="data",
    )
    epoch_size: int | None = opt(
        None,
        "repeat a smaller training set until one epoch has at least this many examples",
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
        "bp", "learning rule (how .grad is filled)", "str", choices=_rules, group="rule"
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
    feedback_init: str = opt(
        "uniform",
        "fa/dfa: how feedback matrices are drawn (weight: B = W, FA then equals BP)",
        "str",
        choices=_feedback_inits,
        group="rule",
    )
    feedback_scale: float = opt(
        1.0,
        "fa/dfa: feedback scale relative to the forward init",
        "float",
        check=positive,
        group="rule",
    )
    feedback_straight_through: bool = opt(
        False,
        "fa: straight-through activations in the backward pass (f' := 1; paper 1's 'DFA')",
        "bool",
        group="rule",
    )
    np_sigma: float = opt(
        1e-3, "np/inp/anp: noise scale sigma", "float", check=positive, group="rule"
    )
    np_samples: int = opt(
        1,
        "np/inp/anp: noisy passes K per clean pass (per layer for inp)",
        "int",
        check=positive,
        group="rule",
    )
    np_noise: str = opt(
        "gaussian",
        "np/inp/anp: noise source: gaussian, bernoulli, centred-bernoulli, a recorded trace "
        "(FILE.pt/.npy/.txt, replayed in order, scaled by sigma) or a sampler "
        "module:function(shape, generator, device, dtype)",
        "str",
        check=_check_noise,
        group="rule",
        code=_names_code,
    )
    np_inaccessible: bool = opt(
        False,
        "anp: the noise cannot be read; learn from pairs of noisy passes, no clean pass",
        "bool",
        group="rule",
    )
    align_bn_mixing: str = opt(
        "real",
        "align-ada: where the twin's backward signal enters a layer followed by batch norm: "
        "real (after the norm, then through the network's own batch statistics, as the authors' "
        "code) or twin (at the layer output, through the twin's batch norm)",
        "str",
        choices=("real", "twin"),
        group="rule",
    )
    readout: str = opt(
        "",
        "last-layer: the layer to train, a name from model.named_modules() (default: the layer "
        "called last in the forward pass)",
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

    # ------------------------------------------------------------------ helpers
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with ``changes`` applied (keys may use dashes or underscores)."""
        return make_config(self.to_dict(), changes)

    def default_out(self) -> str:
        return f"runs/{self.dataset}-{self.model}-{self.rule}-{self.decor}-s{self.seed}"


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}


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
    c = FIELDS[name].metadata["choices"]
    return c() if callable(c) else c


# ----------------------------------------------------------------------------- parsing


def _normalise_key(key: str) -> str:
    return str(key).strip().replace("-", "_")


def _bad(name: str, value: Any, why: str) -> UserError:
    return UserError(f"invalid value for {name.replace('_', '-')}: {value!r} ({why})")


def coerce(name: str, value: Any) -> Any:
    """Convert ``value`` (from a file or the command line) to the field's type, or raise."""
    meta = FIELDS[name].metadata
    kind = meta["kind"]
    value = _alias(meta["aliases"], value)
    if value is None or (
        isinstance(value, str) and value.strip().lower() in ("none", "null") and meta["optional"]
    ):
        if meta["optional"]:
            return None
        raise _bad(name, value, "a value is required")
    try:
        if kind == "str":
            if not isinstance(value, str):
                raise TypeError("expected a string")
            return value
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if kind in ("int", "float"):
            return _number(value, kind)
        if kind in ("ints", "floats"):
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)):
                raise TypeError("expected a list")
            return [
                _number(v, kind[:-1]) for v in items if not (isinstance(v, str) and not v.strip())
            ]
    except (TypeError, ValueError) as err:
        raise _bad(name, value, str(err)) from None
    raise AssertionError(kind)


def _alias(aliases: dict[Any, Any], value: Any) -> Any:
    """The current spelling of ``value`` (booleans also given as true/false/yes/no/1/0)."""
    if not aliases:
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "yes", "on", "1"):
            value = True
        elif text in ("false", "no", "off", "0"):
            value = False
    if isinstance(value, bool) and value in aliases:
        return aliases[value]
    return value


def _number(value: Any, kind: str) -> int | float:
    if isinstance(value, bool):
        raise TypeError(f"expected {'an integer' if kind == 'int' else 'a number'}")
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            return int(value.strip())
        raise TypeError("expected an integer")
    number = float(value.strip()) if isinstance(value, str) else float(value)
    if not math.isfinite(number):
        raise ValueError("must be finite")
    return number


def validate(config: TrainConfig) -> TrainConfig:
    """Check choices and ranges of every field; raise a one-line :class:`UserError` otherwise."""
    for name, f in FIELDS.items():
        value = getattr(config, name)
        if value is None:
            continue
        choices = choices_of(name)
        if choices is not None and value not in choices:
            raise UserError(
                f"invalid value for {name.replace('_', '-')}: {value!r}; "
                f"choose one of: {', '.join(choices)}"
            )
        check = f.metadata["check"]
        if check is not None:
            why = check(value)
            if why:
                raise _bad(name, value, why)
    return config


def check_no_repeats(keys: Iterable[Any], where: str) -> None:
    """Refuse a layer that names one option twice (``batch_size`` and ``batch-size``)."""
    seen: dict[str, Any] = {}
    for key in keys:
        name = _normalise_key(key)
        if name in seen:
            same = "" if key == seen[name] else f" (as {seen[name]!r} and {key!r})"
            raise UserError(f"option {name.replace('_', '-')} is given twice in {where}{same}")
        seen[name] = key


def make_config(*layers: Mapping[str, Any] | None) -> TrainConfig:
    """Merge mappings of options (later ones win) over the defaults, coerce and validate.

    Within one mapping an option may appear once: two spellings of it would leave which one
    wins to the mapping's order.
    """
    values: dict[str, Any] = {}
    for layer in layers:
        check_no_repeats((layer or {}).keys(), "one set of options")
        for key, value in (layer or {}).items():
            name = _normalise_key(key)
            if name not in FIELDS:
                raise UserError(
                    f"unknown option {key!r}; valid options: "
                    f"{', '.join(n.replace('_', '-') for n in FIELDS)}"
                )
            values[name] = coerce(name, value)
    return validate(TrainConfig(**expand_shorthands(values)))


class _Pairs(list):
    """A parsed mapping kept as its (key, value) pairs, in file order, repeats included."""


def _yaml_pairs(text: str) -> Any:
    """``yaml.safe_load``, but every mapping comes back as its list of (key, value) pairs, so a
    key written twice is seen (PyYAML would keep the last silently)."""
    import yaml

    class PairLoader(yaml.SafeLoader):
        pass

    def pairs(loader: yaml.SafeLoader, node: yaml.MappingNode) -> _Pairs:
        loader.flatten_mapping(node)
        return _Pairs(
            (loader.construct_object(k, deep=True), loader.construct_object(v, deep=True))
            for k, v in node.value
        )

    PairLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, pairs)
    return yaml.load(text, Loader=PairLoader)  # a SafeLoader subclass: plain data only


#: Where shipped configuration files live (``--config NAME`` finds ``NAME.yaml`` there).
EXPERIMENTS_DIR = Path(__file__).resolve().parent / "experiments"


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping of options (no validation yet: see :func:`make_config`).

    A bare name that is not a file, e.g. ``np-authors``, is looked up among the configuration
    files shipped in ``decorrelate/experiments`` (the papers' settings).
    """
    path = Path(path)
    shipped = EXPERIMENTS_DIR / f"{path.name}.yaml"
    if not path.exists() and path.parent == Path(".") and not path.suffix and shipped.is_file():
        path = shipped
    try:
        raw = path.read_bytes()
    except OSError as err:
        names = ", ".join(sorted(f.stem for f in EXPERIMENTS_DIR.glob("*.yaml")))
        shipped_hint = f" (shipped configs: {names})" if names and not path.suffix else ""
        raise UserError(
            f"cannot read config file {path}: {err.strerror or err}{shipped_hint}"
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"config file {path} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset "
            f"{err.start}); save it as UTF-8"
        ) from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text, object_pairs_hook=_Pairs)
        else:
            data = _yaml_pairs(text)
    except Exception as err:  # malformed file: report it in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot parse config file {path}: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, _Pairs):
        raise UserError(f"config file {path} must hold a mapping of option: value")
    check_no_repeats((key for key, _ in data), f"config file {path}")
    return {key: _plain(value) for key, value in data}


def _plain(value: Any) -> Any:
    """A nested mapping (pairs) becomes a dict again (option values are scalars or lists)."""
    if isinstance(value, _Pairs):
        return {k: _plain(v) for k, v in value}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write ``config.json`` atomically (a temp file renamed into place, like the checkpoint)."""
    from .checkpoint import atomic_write_bytes

    text = json.dumps(config.to_dict(), indent=2) + "\n"
    atomic_write_bytes(Path(path), lambda f: f.write(text.encode()))


def field_names(group: str | None = None) -> Iterable[str]:
    return [n for n, f in FIELDS.items() if group is None or f.metadata["group"] == group]
