"""storage/safe_yaml: every YAML file raytrain reads refuses aliases."""

import pytest

from raytrain.config import parse_override
from raytrain.errors import ConfigError


def test_every_yaml_raytrain_reads_refuses_aliases(tmp_path):
    """One loader for configs, --set, class maps and saved configs: an alias (the billion-laughs bomb)
    is a one-line error naming the file, never expanded."""
    from raytrain import experiments
    from raytrain.storage.safe_yaml import load_yaml
    from raytrain.errors import CheckpointError, DataError

    assert load_yaml("a: &x 1\nb: 2\n", "f.yaml") == {"a": 1, "b": 2}  # an anchor alone repeats nothing
    with pytest.raises(ConfigError, match=r"^f.yaml: line 2: YAML aliases \(\*name\) are not allowed$"):
        load_yaml("a: &x [1, 2]\nb: *x\n", "f.yaml")
    with pytest.raises(DataError, match="^f.yaml: line 2: not valid YAML"):
        load_yaml("a: [\n", "f.yaml", DataError)
    with pytest.raises(ConfigError, match="YAML aliases"):
        parse_override("train.epochs=[&a 1, *a]")
    experiment = tmp_path / "exp"
    experiment.mkdir()
    (experiment / "config.yaml").write_text("data: &d {path: x}\nmodel: *d\n")
    with pytest.raises(CheckpointError, match=rf"^{experiment}/config.yaml: unreadable .*YAML aliases"):
        experiments.experiment_config(str(experiment))


def test_every_yaml_raytrain_reads_refuses_a_key_given_twice(tmp_path):
    """YAML keeps the last of two equal keys; raytrain's one loader says which key, and where, instead."""
    from raytrain import experiments
    from raytrain.errors import CheckpointError
    from raytrain.storage.safe_yaml import load_yaml

    assert load_yaml("<<: {a: 1, b: 2}\na: 3\n", "f.yaml") == {"a": 3, "b": 2}  # a merge's keys give way, as YAML says
    with pytest.raises(ConfigError, match=r"^f.yaml: line 3: duplicate key 'lr'$"):
        load_yaml("optim:\n  lr: 0.1\n  lr: 0.2\n", "f.yaml")
    with pytest.raises(ConfigError, match=r"^--set 'search.space=\{a: 1, a: 2\}': duplicate key 'a'$"):
        parse_override("search.space={a: 1, a: 2}")
    experiment = tmp_path / "exp"
    experiment.mkdir()
    (experiment / "config.yaml").write_text("name: a\nname: b\n")
    with pytest.raises(CheckpointError, match=rf"^{experiment}/config.yaml: unreadable .*duplicate key 'name'"):
        experiments.experiment_config(str(experiment))
