"""The config schema: YAML in, typed config out, and one-line errors that name the key and file."""

import pytest

from raytrain.config import load_config, parse_override, parse_size
from raytrain.errors import ConfigError

from tests.helpers import run_cli
from tests.helpers import REPO


VALID = """
name: demo
data:
  path: /data/shards
  size: 128x64
model:
  name: unet
  depth: 3
search:
  space:
    optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
    model.depth: {choice: [2, 3, 4]}
"""


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_valid_yaml_loads_typed_values(tmp_path):
    config = load_config(write(tmp_path, VALID))
    assert config.data.size == (128, 64)
    assert config.model.kwargs() == {"depth": 3}
    assert config.optim.lr == 1e-4  # default
    assert config.num_classes == 1


def test_overrides_parse_yaml_scalars(tmp_path):
    config = load_config(write(tmp_path, VALID), ["optim.lr=3e-3", "train.epochs=5", "data.size=64x32", "model.name=simple"])
    assert config.optim.lr == pytest.approx(3e-3)
    assert config.train.epochs == 5
    assert config.data.size == (64, 32)
    assert config.model.name == "simple"
    assert parse_override("classes=[road, car]") == ("classes", ["road", "car"])


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        (VALID.replace("depth: 3", "depht: 3"), [], "run.yaml: model.depht: unknown key"),
        (VALID.replace("depth: 3", "depth: three"), [], "run.yaml: model.depth: Input should be a valid integer"),
        (VALID.replace("size: 128x64", "size: 128by64"), [], "run.yaml: data.size: expected WIDTHxHEIGHT such as 256x128"),
        (VALID.replace("  path: /data/shards\n", ""), [], "run.yaml: data.path: required key is missing"),
        (VALID, ["train.epochs=0"], "train.epochs: Input should be greater than or equal to 1"),
        (VALID, ["train.epoch=3"], "train.epoch: unknown key"),
        (VALID, ["optim.lr.x=3"], "--set unknown key 'optim.lr.x'"),
        (VALID, ["nonsense"], "--set 'nonsense': expected key=value"),
        (VALID + "    model.colour: {choice: [1]}\n", [], "run.yaml: search.space.model.colour: unknown key"),
        (VALID + "    model.depth2: {between: [1, 2]}\n", [], "search.space.model.depth2.between"),
        (VALID.replace("[2, 3, 4]", "[2, 0]"), [], "search.space.model.depth: choice value 0: Input should be greater than or equal to 1"),
        (VALID, ["search.scheduler.name=pbt", "search.algorithm=optuna"], "search: scheduler.name pbt samples its own values: use algorithm random, not optuna"),
        (VALID, ["search.scheduler.name=pbt", "search.max_concurrent_trials=2"], "max_concurrent_trials: pbt trains its whole population together"),
        (VALID, ["search.scheduler.name=pbt", "search.scheduler.mutate=[model.depth]"], "scheduler.mutate: model.depth cannot change within a trial"),
        (VALID, ["search.scheduler.name=pbt", "search.scheduler.mutate=[optim.momentum]"], "scheduler.mutate: optim.momentum is not a key of search.space"),
        (VALID.replace("    optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n", ""), ["search.scheduler.name=pbt"], "pbt needs a searched key it can change"),
        ("data: [unclosed\n", [], "run.yaml: line 2: not valid YAML"),
        ("- a list\n", [], "run.yaml: expected a mapping"),
    ],
)
def test_bad_config_is_one_line_naming_key_and_file(tmp_path, text, overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_pbt_changes_every_searched_key_but_the_architecture_by_default(tmp_path):
    config = load_config(write(tmp_path, VALID), ["search.scheduler.name=pbt"])
    assert config.search.pbt_mutations == ["optim.lr"]
    assert set(config.search.space) == {"optim.lr", "model.depth"}


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_parse_size():
    assert parse_size("256x128") == (256, 128)
    assert parse_size([32, 16]) == (32, 16)
    with pytest.raises(ValueError):
        parse_size("0x5")


def test_every_shipped_config_is_valid():
    configs = sorted((REPO / "tune_configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def test_cli_config_error_is_one_line_exit_2(tmp_path):
    path = write(tmp_path, VALID.replace("depth: 3", "depht: 3"))
    run = run_cli(["train", path], timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip() == f"raytrain: error: {path}: model.depht: unknown key"
    assert "Traceback" not in run.stderr
