"""The bad-input table's row that reaches Ray: a run that fails inside the Ray Train workers must
still answer with one line, exit code 2, and leave no checkpoint (the rest of the table is
unit/cli/test_bad_input.py)."""
import pytest

from tests.helpers import C, check_bad_input_row, config


CASES = [
    # a run that fails inside the Ray Train workers
    pytest.param(
        ["train", C, "--set", "optim.lr=1e30", "--num-cpus", "4"], lambda t: config(t),
        ["loss is nan at epoch 0, step", "optim.lr"], id="workers-nan-loss", marks=pytest.mark.ray,
    ),
]


@pytest.mark.parametrize("args, setup, fragments", CASES)
def test_bad_input_is_one_line_exit_2_and_nothing_written(request, tmp_path, args, setup, fragments):
    check_bad_input_row(request, tmp_path, args, setup, fragments)
