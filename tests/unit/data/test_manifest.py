"""data/manifest: a dataset's manifest read back, its class weights, groups and shard paths;
a bad `groups` entry is refused."""

import json
import os
import shutil

import pyarrow.parquet as pq
import pytest

from raytrain.data.manifest import read_manifest
from raytrain.errors import DataError


def test_inverse_frequency_class_weights_come_from_the_manifest(tiny_shards):
    manifest = read_manifest(tiny_shards)
    frequencies = manifest.pixel_frequencies
    background, road = manifest.class_weights("inverse_frequency")
    assert road / background == pytest.approx(frequencies["background"] / frequencies["road"])
    assert background + road == pytest.approx(2.0)
    assert manifest.class_weights([1.0, 3.0]) == [1.0, 3.0]


def test_shards_without_groups_have_no_group_column_and_a_bad_groups_entry_is_refused(tiny_shards, tmp_path):
    manifest = read_manifest(tiny_shards)
    assert manifest.groups is None and "group_by" not in manifest.split and manifest.metric_groups("val") == []
    assert "group" not in pq.read_schema(read_manifest(tiny_shards).shard_paths("val")[0]).names
    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    for groups in ({"train": {}, "val": {"a b": 1}}, {"val": {"a": 1}}, ["a"], {"train": {"a": "1"}, "val": {}}):
        (copy / "manifest.json").write_text(json.dumps({**manifest.model_dump(mode="json"), "groups": groups}))
        with pytest.raises(DataError, match="`groups` must map train and val"):
            read_manifest(copy)


def test_per_group_metrics_are_capped(tmp_path):
    from raytrain.data.manifest import MAX_GROUP_METRICS

    few = manifest_with_groups({f"g{i}": 1 for i in range(MAX_GROUP_METRICS)})
    many = manifest_with_groups({f"g{i}": 1 for i in range(MAX_GROUP_METRICS + 1)})
    assert len(few.metric_groups("val")) == MAX_GROUP_METRICS and many.metric_groups("val") == []


def manifest_with_groups(val_groups: dict[str, int]):
    from raytrain.data.manifest import Manifest

    return Manifest(schema_version=1, format="kitti", classes=[{"name": "road", "id": 1, "color": [255, 0, 255]}],
                    num_samples={"train": 1, "val": sum(val_groups.values())}, files={"train": [], "val": []},
                    pixel_frequencies={}, groups={"train": {}, "val": val_groups})


def test_a_manifest_written_by_write_shards_reads_back(tiny_shards):
    manifest = read_manifest(tiny_shards)
    assert manifest.format == "kitti" and manifest.class_names == ["road"]
    assert manifest.count("train") + manifest.count("val") == 24 and manifest.count("val") > 0
    assert manifest.num_samples == {"train": manifest.count("train"), "val": manifest.count("val")}
    for split in ("train", "val"):
        paths = manifest.shard_paths(split)
        assert len(paths) == -(-manifest.count(split) // 4)  # rows_per_shard=4
        assert all(os.path.isfile(path) and os.path.dirname(path) .startswith(str(tiny_shards)) for path in paths)
    assert manifest.groups is None and manifest.metric_groups("val") == []


def test_the_groups_of_a_grouped_manifest(grouped_shards):
    manifest = read_manifest(grouped_shards)
    assert manifest.groups == {"train": {"um": 14}, "val": {"umm": 5, "uu": 5}}
    assert manifest.metric_groups("val") == ["umm", "uu"] and manifest.count("val") == 10
