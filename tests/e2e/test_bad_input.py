"""The bad-input table's row that reaches Ray: a run that fails inside the Ray Train workers must
still answer with one line, exit code 2, and leave no checkpoint (the rest of the table is
unit/cli/test_bad_input.py)."""
import pytest

from tests.helpers import C, REACH_RAY, assert_one_line_error, config, needs_a_fresh_interpreter, run_raytrain, snapshot


CASES = [
    # a run that fails inside the Ray Train workers
    pytest.param(
        ["train", C, "--set", "optim.lr=1e30", "--num-cpus", "4"], lambda t: config(t),
        ["loss is nan at epoch 0, step", "optim.lr"], id="workers-nan-loss", marks=pytest.mark.ray,
    ),
]


@pytest.mark.parametrize("args, setup, fragments", CASES)
def test_bad_input_is_one_line_exit_2_and_nothing_written(request, tmp_path, args, setup, fragments):
    setup(tmp_path)
    before = snapshot(tmp_path)
    run = run_raytrain([a.format(tmp=tmp_path) for a in args], tmp_path, needs_a_fresh_interpreter(request))
    assert_one_line_error(run, fragments, tmp_path)
    after = snapshot(tmp_path)
    if request.node.callspec.id in REACH_RAY:
        assert not [p for p in after if "checkpoint_" in p]
        after = {p: s for p, s in after.items() if not p.startswith("results")}
    assert after == before
