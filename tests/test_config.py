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
