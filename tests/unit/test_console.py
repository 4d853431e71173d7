"""console: the per-epoch line and the progress display."""
import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios

from raytrain.console import epoch_line, progress

# A long step as a command would run one: 5 updates of a 5-image job.
FIVE_UPDATES = "from raytrain.console import progress\nshow = progress('predict')\nfor done in range(1, 6): show(done, 5)\n"


def test_epoch_line_shows_metrics_and_the_time_left():
    metrics = {"epoch": 3, "train_loss": 0.123456, "val_f1": 0.5, "val_iou": 0.25, "images_per_s": 12.34, "epoch_s": 30.0}
    assert epoch_line("trial_0", metrics, 5) == (
        "trial_0  epoch 3/5  loss 0.1235  val_f1 0.5000  val_iou 0.2500  12.3 img/s  ETA 1m00s"
    )


def test_epoch_line_shows_a_dash_for_a_missing_metric():
    assert epoch_line("run", {"epoch": 1}, 1) == "run  epoch 1/1  loss -  val_f1 -  val_iou -  - img/s  ETA 0m00s"


def test_progress_writes_lines_not_a_bar_when_stderr_is_not_a_terminal():
    done = subprocess.run([sys.executable, "-c", FIVE_UPDATES], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "RAYTRAIN_PROGRESS_EVERY_S": "0"})
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    lines = done.stderr.splitlines()
    # Until it is done: the command's own last line says that (and a bad input's error stays one line).
    assert [line.split(" images,")[0] for line in lines] == [f"predict: {n}/5" for n in range(1, 5)]
    assert all(" images/s, " in line and line.endswith(" left") for line in lines)


def test_progress_lines_wait_their_interval(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    show = progress("predict", every_s=3600)
    for done in range(1, 4):
        show(done, 4)
    assert err.getvalue() == ""


def test_progress_is_one_redrawn_bar_on_a_terminal():
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty has 0 columns
    try:
        done = subprocess.run([sys.executable, "-c", FIVE_UPDATES], stderr=follower, stdout=subprocess.DEVNULL,
                              timeout=60, env={**os.environ, "RAYTRAIN_PROGRESS_EVERY_S": "0"})
        os.close(follower)
        written = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal's other side is closed: all read
                break
            if not chunk:
                break
            written += chunk
    finally:
        os.close(leader)
    assert done.returncode == 0
    text = written.decode()
    assert "\r" in text and "predict" in text and "5/5" in text
    assert "images/s, " not in text  # the bar, not the lines
