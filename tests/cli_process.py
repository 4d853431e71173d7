"""The `raytrain` CLI as a child process, for tests.

`run_cli` forks each call from a server process that has imported torch and raytrain once
(multiprocessing's forkserver with preload): every call is still its own process, with its own exit
code, standard streams, working directory and environment, but skips the seconds a fresh interpreter
spends importing torch. `run_cli_fresh` is `python -m raytrain.cli` itself; the rows that need a fresh
interpreter use it (a memory limit, dropped capabilities, starting Ray, signals), and
test_bad_input checks that both give the same answers.
"""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Not Ray: the CLI sets Ray's logging variables before Ray is first imported.
PRELOAD = [
    "torch", "torchvision", "segmentation_models_pytorch", "pyarrow.parquet", "PIL.Image", "pydantic", "yaml",
    "raytrain.cli", "raytrain.api", "raytrain.inference", "raytrain.preflight", "raytrain.data.shards",
]
_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def cli_environment() -> dict[str, str]:
    # A local cluster of --num-cpus, never the test session's shared one.
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _child(args: list[str], cwd: str, env: dict[str, str], umask: int | None, stdout: str, stderr: str) -> None:
    os.chdir(cwd)
    if umask is not None:
        os.umask(umask)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        opened = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(opened, fd)
        os.close(opened)
    from raytrain.cli import main

    sys.exit(main(args))


def run_cli(args: list, cwd: Path | str | None = None, env: dict[str, str] | None = None,
            timeout: float = 600, umask: int | None = None) -> subprocess.CompletedProcess:
    """`raytrain ARGS` in a forked child process; stdout and stderr as text, like subprocess.run."""
    args = [str(a) for a in args]
    with tempfile.TemporaryDirectory(prefix="raytrain-cli-") as streams:
        stdout, stderr = Path(streams, "stdout"), Path(streams, "stderr")
        stdout.touch()
        stderr.touch()
        process = _forkserver().Process(
            target=_child, args=(args, str(cwd or os.getcwd()), env or cli_environment(), umask, str(stdout), str(stderr)),
        )
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(["raytrain", *args], timeout)
        return subprocess.CompletedProcess(
            ["raytrain", *args], process.exitcode,
            stdout.read_text(), stderr.read_text(),
        )


def run_cli_fresh(args: list, cwd: Path | str | None = None, env: dict[str, str] | None = None,
                  timeout: float = 600, prefix: list[str] = (), preexec_fn=None) -> subprocess.CompletedProcess:
    """`python -m raytrain.cli ARGS` in a fresh interpreter, optionally under a prefix command."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "raytrain.cli", *map(str, args)], capture_output=True, text=True,
        timeout=timeout, cwd=cwd, env=env or cli_environment(), preexec_fn=preexec_fn,
    )
