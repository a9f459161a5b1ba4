import json

import pytest

from decorrelate.config import TrainConfig, load_config_file, make_config, save_config
from decorrelate.errors import UserError


def test_defaults_are_valid_and_round_trip(tmp_path):
    cfg = make_config({"widths": "512,256", "lr": "3e-4", "normalize": "false"})
    assert cfg.widths == [512, 256] and cfg.lr == pytest.approx(3e-4)
    assert cfg.normalize == "unit"  # the former boolean option: false kept pixels/255
    save_config(cfg, tmp_path / "c.json")
    again = make_config(load_config_file(tmp_path / "c.json"))
    assert again == cfg


def test_yaml_and_json_files_with_dashes(tmp_path):
    (tmp_path / "c.yaml").write_text("batch-size: 32\nrule: bp\nbetas: [0.9, 0.9999]\n")
    cfg = make_config(load_config_file(tmp_path / "c.yaml"))
    assert cfg.batch_size == 32 and cfg.betas == [0.9, 0.9999]
    (tmp_path / "c.json").write_text(json.dumps({"epochs": 7}))
    assert make_config(load_config_file(tmp_path / "c.json")).epochs == 7


def test_later_layers_win():
    cfg = make_config({"lr": 0.1, "epochs": 3}, {"lr": 0.01})
    assert cfg.lr == 0.01 and cfg.epochs == 3


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"learning_rate": 1}, "unknown option 'learning_rate'; valid options: dataset"),
        ({"rule": "magic"}, "choose one of: bp"),
        ({"dataset": "imagenet"}, "choose one of: mnist, fashion-mnist"),
        ({"optimizer": "lbfgs"}, "choose one of: adam, sgd"),
        ({"lr": -1}, "must be > 0"),
        ({"lr": "fast"}, "invalid value for lr"),
        ({"epochs": 1.5}, "invalid value for epochs"),
        ({"batch_size": True}, "expected an integer"),
        ({"val_split": 1.0}, "must be in [0, 1)"),
        ({"betas": [0.9]}, "two numbers"),
        ({"widths": "10,-3"}, "must be > 0"),
        ({"lr": float("nan")}, "finite"),
    ],
)
def test_bad_values_are_rejected_with_the_choices(values, message):
    with pytest.raises(UserError) as err:
        make_config(values)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_malformed_files(tmp_path):
    (tmp_path / "bad.yaml").write_text("lr: [1, 2\n")
    with pytest.raises(UserError, match="cannot parse config file"):
        load_config_file(tmp_path / "bad.yaml")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="mapping"):
        load_config_file(tmp_path / "list.json")
    with pytest.raises(UserError, match="cannot read"):
        load_config_file(tmp_path / "missing.yaml")


def test_replace_validates():
    cfg = TrainConfig()
    assert cfg.replace(seed=3).seed == 3
    with pytest.raises(UserError):
        cfg.replace(seed=-1)


# ----------------------------------------------------------------------------- any schema


def _toy_schema():
    """A small option set declared like TrainConfig: the machinery is not TrainConfig's own."""
    from dataclasses import dataclass

    from decorrelate.options import at_least, opt
    from decorrelate.schema import Options

    @dataclass
    class Toy(Options):
        size: int = opt(3, "a size", "int", check=at_least(2), group="shape")
        mode: str = opt("fast", "a mode", "str", choices=("fast", "slow"), group="shape")
        scales: list[float] = opt([1.0], "scales", "floats", group="other")
        long_label: str | None = opt(None, "a label", "str", optional=True, group="other")
        flag: bool = opt(False, "a switch", "bool", group="other")

        def check(self) -> None:
            if self.mode == "slow" and self.size > 10:
                raise UserError("slow mode takes size <= 10")

    return Toy


def test_the_machinery_serves_any_option_dataclass(tmp_path):
    import argparse

    from decorrelate import schema

    Toy = _toy_schema()
    assert schema.make(Toy) == Toy()
    cfg = Toy.make({"size": "4", "scales": "0.5,2"}, {"mode": "slow", "long-label": "none"})
    assert (cfg.size, cfg.mode, cfg.scales, cfg.long_label) == (4, "slow", [0.5, 2.0], None)
    assert cfg.replace(size=5).size == 5 and cfg.size == 4
    for values, message in (
        ({"sise": 3}, "unknown option 'sise'; valid options: size, mode, scales, long-label, flag"),
        ({"size": 1}, "invalid value for size: 1 (must be >= 2)"),
        ({"mode": "medium"}, "invalid value for mode: 'medium'; choose one of: fast, slow"),
        ({"flag": "maybe"}, "invalid value for flag: 'maybe' (expected true or false)"),
        ({"mode": "slow", "size": 11}, "slow mode takes size <= 10"),
        ({"long_label": "a", "long-label": "b"}, "option long-label is given twice"),
    ):
        with pytest.raises(UserError) as err:
            Toy.make(values)
        assert message in str(err.value) and "\n" not in str(err.value)
    path = tmp_path / "toy.yaml"
    path.write_text("size: 6\nmode: slow\n")
    parser = argparse.ArgumentParser()
    schema.add_flags(parser, Toy)
    args = parser.parse_args(["--size", "7", "--flag", "--scales", "3,4"])
    given = schema.given_flags(args, Toy)
    assert given == {"size": "7", "flag": True, "scales": "3,4"}  # only the flags given
    cfg = Toy.make(schema.load_config_file(path), given)
    assert (cfg.size, cfg.mode, cfg.flag, cfg.scales) == (7, "slow", True, [3.0, 4.0])
    assert schema.given_flags(parser.parse_args(["--no-flag"]), Toy) == {"flag": False}


def test_train_offers_only_the_rules_it_can_train():
    from decorrelate.config import choices_of
    from decorrelate.rules import available_rules

    rules = choices_of("rule")
    assert "bp" in rules and "np" in rules and "dnp" in rules
    fixed_point = set(available_rules("fixedpoint"))
    assert fixed_point == {"euclidean", "bptt", "reparam", "linearized", "linearized-g"}
    assert not fixed_point & set(rules)
    assert fixed_point < set(available_rules())  # still registered (get_rule works)
    for name in sorted(fixed_point):
        with pytest.raises(UserError) as err:
            make_config({"rule": name})
        message = str(err.value)
        assert f"decorrelate fixedpoint --rule {name}" in message and "\n" not in message


# ----------------------------------------------------------------------------- rule options


def test_rule_options_are_declared_beside_their_rules():
    import dataclasses

    from decorrelate import schema
    from decorrelate.config import FIELDS, TrainOptions
    from decorrelate.rules import rule_options
    from decorrelate.rules.align import AlignOptions, LastLayerOptions
    from decorrelate.rules.feedback import FEEDBACK_INITS, FeedbackOptions
    from decorrelate.rules.perturbation import PerturbationOptions

    declared = {
        FeedbackOptions: {"feedback_init", "feedback_scale", "feedback_straight_through"},
        PerturbationOptions: {"np_sigma", "np_samples", "np_noise", "np_inaccessible"},
        AlignOptions: {"align_bn_mixing"},
        LastLayerOptions: {"readout"},
    }
    assert set(declared) <= set(rule_options())
    generic = set(schema.fields_of(TrainOptions))
    for options, names in declared.items():
        assert set(schema.fields_of(options)) == names
        assert not names & generic  # declared once, by the family
        for name in names:  # and part of TrainConfig under the same flat name
            assert FIELDS[name].metadata == schema.fields_of(options)[name].metadata
    assert set(FIELDS) == generic | set().union(*declared.values())
    assert list(FIELDS)[: len(generic)] == list(schema.fields_of(TrainOptions))
    assert choices_of_field("feedback_init") == FEEDBACK_INITS
    cfg = make_config({"feedback-init": "weight", "np_sigma": "0.01", "readout": "fc"})
    assert (cfg.feedback_init, cfg.np_sigma, cfg.readout) == ("weight", 0.01, "fc")
    assert dataclasses.is_dataclass(cfg)
    # each family's options are an option set of their own as well
    assert PerturbationOptions.make({"np-samples": 4}).np_samples == 4
    with pytest.raises(UserError, match=r"invalid value for np-samples: 0 \(must be > 0\)"):
        make_config({"np_samples": 0})
    with pytest.raises(UserError, match=r"invalid value for np-noise: 'x\.npz'.*one of: gaussian"):
        make_config({"np_noise": "x.npz"})


def choices_of_field(name: str):
    from decorrelate.config import choices_of

    return choices_of(name)


def test_shorthand_rules_are_registered_by_their_family():
    from decorrelate.rules import shorthands

    assert {k: v[0] for k, v in shorthands().items()} == {"dnp": "np", "dinp": "inp", "danp": "anp"}
    cfg = make_config({"rule": "dinp"})
    assert (cfg.rule, cfg.decor, cfg.decor_lr, cfg.decor_sample_frac) == ("inp", "copi", 1e-3, 1.0)
    cfg = make_config({"rule": "danp", "decor_lr": 0.01})  # each implied option can be overridden
    assert (cfg.rule, cfg.decor, cfg.decor_lr, cfg.decor_sample_frac) == ("anp", "copi", 0.01, 1.0)
    cfg = make_config({"rule": "dnp", "decor": "scaled"})  # another method: nothing implied
    assert (cfg.rule, cfg.decor, cfg.decor_lr, cfg.decor_sample_frac) == ("np", "scaled", None, 0.1)


def test_alignment_score_needs_a_rule_that_gives_the_true_gradient(tiny):
    from decorrelate import train
    from decorrelate.rules import rule_class

    assert rule_class("bp").exact_gradient and not rule_class("fa").exact_gradient
    with pytest.raises(UserError, match="--alignment-score measures BP training"):
        train(make_config(tiny, {"rule": "fa", "alignment_score": True, "epochs": 0}))
