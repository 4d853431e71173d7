"""The bad-input table's rows that reach Ray: a run that fails inside the Ray Train workers (or the
Ray Data tasks that feed them) must still answer with one line, exit code 2, and leave no
checkpoint (the rest of the table is unit/cli/test_bad_input.py)."""
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import C, check_bad_input_row, config, png_header


def bomb_in_a_train_shard(tmp: Path) -> None:
    """tmp/c.yaml on shards whose first train shard, rewritten by hand, holds a 10-gigapixel PNG
    header as one row's image: a shard from elsewhere decodes through the same checked decoder."""
    config(tmp)
    png_header(tmp / "bomb.png", 100000, 100000)
    path = tmp / "shards/train-00000.parquet"
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    images[0] = (tmp / "bomb.png").read_bytes()
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary())), path)
    (tmp / "bomb.png").unlink()


CASES = [
    # a run that fails inside the Ray Train workers
    pytest.param(
        ["train", C, "--set", "optim.lr=1e30", "--num-cpus", "4"], lambda t: config(t),
        ["loss is nan at epoch 0, step", "optim.lr"], id="workers-nan-loss", marks=pytest.mark.ray,
    ),
    pytest.param(
        ["train", C, "--num-cpus", "4"], bomb_in_a_train_shard,
        ["{tmp}/shards: sample '", "image of 10000000000 pixels is over the limit", "RAYTRAIN_MAX_PIXELS"],
        id="train-shard-image-bomb", marks=pytest.mark.ray,
    ),
]


@pytest.mark.parametrize("args, setup, fragments", CASES)
def test_bad_input_is_one_line_exit_2_and_nothing_written(request, tmp_path, args, setup, fragments):
    check_bad_input_row(request, tmp_path, args, setup, fragments)
