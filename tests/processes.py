"""Child processes for tests, started in a fraction of a second: the `raytrain` CLI, and torch
process groups.

`run_cli` forks each call from a server process that has imported torch and raytrain once
(multiprocessing's forkserver with preload): every call is still its own process, with its own exit
code, standard streams, working directory and environment, but skips the seconds a fresh interpreter
spends importing torch. `run_cli_fresh` is `python -m raytrain.cli` itself; the rows that need a fresh
interpreter use it (dropped capabilities, starting Ray, signals), and
test_bad_input checks that both give the same answers. `forkserver()` is the same server for
torch.multiprocessing (start_method="forkserver"): its DDP workers skip the imports too.
"""
from __future__ import annotations

import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

# Not Ray: the CLI sets Ray's logging variables before Ray is first imported.
PRELOAD = [
    "torch", "torchvision", "segmentation_models_pytorch", "pyarrow.parquet", "PIL.Image", "pydantic", "yaml",
    "raytrain.cli", "raytrain.api", "raytrain.inference.files", "raytrain.inference.evaluation", "raytrain.inference.exporting",
    "raytrain.preflight", "raytrain.data.shards",
]
_context = None


def forkserver():
    """multiprocessing's forkserver context, its server preloaded with PRELOAD."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def cli_environment() -> dict[str, str]:
    # A local cluster of --num-cpus, never the test session's shared one.
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _data_size() -> int:
    """This process's data (heap and private writable mappings: what RLIMIT_DATA counts), in bytes."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmData:"))


def _child(args: list[str], cwd: str, env: dict[str, str], umask: int | None, memory_limit: int | None,
           stdout: str, stderr: str) -> None:
    if memory_limit is not None:  # on top of what the server's imports hold: what the command itself allocates
        limit = _data_size() + memory_limit
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
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
            timeout: float = 600, umask: int | None = None, memory_limit: int | None = None) -> subprocess.CompletedProcess:
    """`raytrain ARGS` in a forked child process; stdout and stderr as text, like subprocess.run.
    memory_limit: the bytes of data the command may allocate (RLIMIT_DATA over what the imports hold)."""
    args = [str(a) for a in args]
    with tempfile.TemporaryDirectory(prefix="raytrain-cli-") as streams:
        stdout, stderr = Path(streams, "stdout"), Path(streams, "stderr")
        stdout.touch()
        stderr.touch()
        process = forkserver().Process(
            target=_child, args=(args, str(cwd or os.getcwd()), env or cli_environment(), umask, memory_limit, str(stdout), str(stderr)),
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
