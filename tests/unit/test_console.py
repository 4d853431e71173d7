"""console: the per-epoch line and the progress output."""
import io

from raytrain.console import epoch_line, progress_bar, progress_lines


def test_epoch_line_shows_metrics_and_the_time_left():
    metrics = {"epoch": 3, "train_loss": 0.123456, "val_f1": 0.5, "val_iou": 0.25, "images_per_s": 12.34, "epoch_s": 30.0}
    assert epoch_line("trial_0", metrics, 5) == (
        "trial_0  epoch 3/5  loss 0.1235  val_f1 0.5000  val_iou 0.2500  12.3 img/s  ETA 1m00s"
    )


def test_epoch_line_shows_a_dash_for_a_missing_metric():
    assert epoch_line("run", {"epoch": 1}, 1) == "run  epoch 1/1  loss -  val_f1 -  val_iou -  - img/s  ETA 0m00s"


def test_no_progress_bar_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert progress_bar("predict") is None


def test_progress_lines_print_at_the_end_even_when_fast(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    show = progress_lines("predict", every_s=3600)
    show(1, 3)  # too soon: nothing
    show(3, 3)
    [line] = err.getvalue().splitlines()
    assert line.startswith("predict: 3/3 images, ") and line.endswith(" images/s")
