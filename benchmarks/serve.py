"""`raytrain serve` under load, beside in-process `raytrain.predict` on the same images.

    python benchmarks/serve.py [--requests 200] [--concurrency 8] [--max-seconds 30]

A checkpoint of the quickstart's U-Net (untrained: the cost is the same) is served on a local Ray
with 1 and 2 replicas, batching on (--max-batch-size 8) and off (1), on 127.0.0.1. Each setting
gets the same --requests PNG bodies (--size, random pixels) from --concurrency client threads, cut
off after --max-seconds; latency is per request (client side, connect to last byte). One more
setting sends them one at a time (1 replica, no batching): the cost of HTTP and Serve per request.
In-process:
decode + predict one image at a time, then 8 at a time, on one torch thread (what a replica has).
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import http.client
import io
import time
from concurrent.futures import ThreadPoolExecutor

from common import NOISE_NOTE, emit, header, log, scratch_dir

import numpy as np
from PIL import Image

SETTINGS = [(1, 8, None), (1, 1, None), (2, 8, None), (2, 1, None), (1, 1, 1)]  # replicas, max batch size, clients


def quickstart_checkpoint(root) -> str:
    import torch

    from raytrain.checkpoints import save_checkpoint
    from raytrain.config import load_config
    from raytrain.models import create_model

    config = load_config("quickstart", {"data.path": str(root / "none")})
    torch.manual_seed(0)
    model = create_model(config.model.name, num_classes=config.num_classes, **config.model.kwargs())
    return str(save_checkpoint(root / "ckpt", model, torch.optim.SGD(model.parameters(), lr=0.1), None, 1, config, {}))


def post(port: int, body: bytes) -> float:
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("POST", "/", body, {"Content-Type": "image/png"})
        answer = connection.getresponse()
        answer.read()
        if answer.status != 200:
            raise RuntimeError(f"HTTP {answer.status}")
    finally:
        connection.close()
    return time.perf_counter() - started


def load(port: int, bodies: list[bytes], concurrency: int, max_seconds: float) -> dict:
    deadline = time.perf_counter() + max_seconds

    def one(body):
        return post(port, body) if time.perf_counter() < deadline else None

    for body in bodies[:concurrency]:  # warm-up: the replicas' first batches
        post(port, body)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = [t for t in pool.map(one, bodies) if t is not None]
    return summary(latencies, time.perf_counter() - started)


def summary(latencies: list[float], wall: float) -> dict:
    return {
        "requests": len(latencies), "wall_s": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 1),
        "p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 1),
    }


def in_process(checkpoint: str, bodies: list[bytes], batch: int) -> dict:
    """decode + predict, `batch` images per call, timed per call (each image's latency is its call's)."""
    import torch

    from raytrain.data.images import read_rgb
    from raytrain.inference.loading import load_model
    from raytrain.inference.prediction import predict

    torch.set_num_threads(1)
    model = load_model(checkpoint)
    predict(model, [read_rgb(bodies[0], "warm-up")])
    latencies, started = [], time.perf_counter()
    for start in range(0, len(bodies), batch):
        began = time.perf_counter()
        chunk = bodies[start : start + batch]
        predict(model, [read_rgb(body, "body") for body in chunk], batch_size=batch)
        latencies += [time.perf_counter() - began] * len(chunk)
    return summary(latencies, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=30)
    parser.add_argument("--size", default="384x128", help="WIDTHxHEIGHT of the request images")
    args = parser.parse_args()
    from ray import serve

    from raytrain import api
    from raytrain.console import QUIET
    from raytrain.launch.session import ensure_ray, free_port

    width, height = map(int, args.size.split("x"))
    rng = np.random.default_rng(0)
    bodies = []
    for _ in range(args.requests):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
        bodies.append(buffer.getvalue())
    checkpoint = quickstart_checkpoint(scratch_dir("serve"))
    result = {**header("serve"), "note": NOISE_NOTE, "settings": vars(args), "served": [], "in_process": {}}
    for batch in (1, 8):
        log(f"in-process predict, {batch} per call")
        result["in_process"][f"batch_{batch}"] = in_process(checkpoint, bodies, batch)
    ensure_ray(4, verbosity=QUIET)  # 4 logical CPUs on this machine's 2 cores: 2 replicas fit beside the proxy
    for replicas, batch, clients in SETTINGS:
        clients = clients or args.concurrency
        log(f"serving: {replicas} replica(s), max batch size {batch}, {clients} client(s)")
        port = free_port()
        api.serve(checkpoint, replicas=replicas, port=port, max_batch_size=batch)
        try:
            result["served"].append({"replicas": replicas, "max_batch_size": batch, "clients": clients,
                                     **load(port, bodies, clients, args.max_seconds)})
        finally:
            serve.shutdown()
    emit(result)


if __name__ == "__main__":
    main()
