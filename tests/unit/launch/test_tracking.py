"""launch/tracking: the checks made before training (tracking off, remote storage, an unusable
tracking URI); the MLflow runs of real runs are e2e/test_tracking.py."""

from pathlib import Path

import pytest

from raytrain.errors import ConfigError, RaytrainError
from tests.helpers import tiny_config


def test_tracking_off_adds_no_callbacks(tiny_shards, tmp_path):
    from raytrain.launch import tracking

    config = tiny_config(tiny_shards, tmp_path)
    assert tracking.train_callbacks(config, str(tmp_path)) == []
    assert tracking.tune_callbacks(config, str(tmp_path)) == []


def test_remote_storage_needs_a_tracking_uri(tiny_shards, tmp_path):
    with pytest.raises(ConfigError, match="set train.tracking_uri"):
        tiny_config(tiny_shards, tmp_path, **{"train.tracking": "mlflow", "train.storage_path": "s3://bucket/runs"})
    config = tiny_config(tiny_shards, tmp_path, **{
        "train.tracking": "mlflow", "train.storage_path": "s3://bucket/runs", "train.tracking_uri": "sqlite:///runs.db",
    })
    assert config.train.tracking_uri == f"sqlite:///{Path('runs.db').resolve()}"  # the controller runs elsewhere


def test_an_unusable_tracking_uri_is_one_line_before_training(tiny_shards, tmp_path):
    from raytrain.launch import tracking

    config = tiny_config(tiny_shards, tmp_path, **{"train.tracking": "mlflow", "train.tracking_uri": "nosuch://x"})
    with pytest.raises(RaytrainError, match="train.tracking_uri nosuch://x"):
        tracking.train_callbacks(config, str(tmp_path))
