"""`raytrain serve`: a checkpoint behind an HTTP endpoint on Ray Serve (the `serve` extra).

POST an image to `/` (a PNG or JPEG body with its Content-Type, or multipart/form-data with the
image as its one file) and get, by `?output=` (else `Accept: application/json` means json):
  mask     (default) the class index per pixel as a PNG, exactly what `raytrain predict` writes;
  overlay  the image with predicted road in red (raytrain.viz.overlay), a PNG;
  json     {width, height, classes, fractions: {class: share of pixels}, probabilities:
           {width, height, values}}: the probabilities averaged down to at most PROBABILITY_SIDE
           cells along the longer side, 4 decimals ((h, w) for road; (C, h, w) multi-class).
Bad requests get a 4xx and one line of text. Requests are batched per replica (@serve.batch); the
model runs through inference.prediction.predict, as `raytrain predict` does.
"""
from __future__ import annotations

import asyncio
import io
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from raytrain.checkpoints import MAX_PARAMETERS_ENV, max_parameters
from raytrain.console import QUIET
from raytrain.data.images import MAX_PIXELS_ENV, max_image_bytes, max_pixels, read_rgb
from raytrain.errors import DataError, RaytrainError, one_line
from raytrain.inference.loading import checkpoint_files, load_model_from_files
from raytrain.inference.prediction import labels_of, predict
from raytrain.launch.session import ensure_ray
from raytrain.viz import overlay

APP_NAME = "raytrain"
OUTPUTS = ("mask", "overlay", "json")
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG"}  # Content-Type -> the Pillow format it must hold
MULTIPART = "multipart/form-data"
PROBABILITY_SIDE = 64  # the JSON's probability grid: at most this many cells along the longer side
UPLOAD_SLOTS = 32  # a replica's slots beyond its batches, for bodies still arriving (ongoing_requests)


class RequestError(DataError):
    """A bad request: answered with `status` and the message as one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def read_body(request: Request, timeout_s: float) -> bytes:
    """The request body, refused once it is over an image file's limit (data.images.max_image_bytes,
    whose headroom holds a form's parts), whatever Content-Length says, or once it has taken more
    than `timeout_s` to arrive: a client that stalls mid-body holds a replica's slot only that long."""
    limit, chunks, size = max_image_bytes(), [], 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"request body: over {limit} bytes (the pixel limit, RAYTRAIN_MAX_PIXELS)")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
        raise RequestError(408, f"request body: {size} bytes arrived in {timeout_s:g} s, not all of it "
                                "(--body-timeout-s)") from None
    return b"".join(chunks)


async def image_of(request: Request, body_timeout_s: float) -> np.ndarray:
    """The request's image as an RGB array, checked as image files are (data.images.read_rgb); its
    body must arrive within `body_timeout_s` (read_body)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in (*IMAGE_TYPES, MULTIPART):
        raise RequestError(415, f"Content-Type {content_type or 'missing'!r}: send image/png, image/jpeg or {MULTIPART}")
    data = await read_body(request, body_timeout_s)
    name, formats = "request body", [IMAGE_TYPES.get(content_type)]
    if content_type == MULTIPART:
        name, content_type, data = await _form_file(request, data)
        formats = [IMAGE_TYPES[content_type]] if content_type in IMAGE_TYPES else list(IMAGE_TYPES.values())
    if not data:
        raise RequestError(400, f"{name}: empty (send a PNG or JPEG image)")
    try:
        return read_rgb(bytes(data), name, formats)
    except DataError as err:
        raise RequestError(400, str(err)) from None


async def _form_file(request: Request, body: bytes) -> tuple[str, str, bytes]:
    """(name, content type, bytes) of the one file in a multipart form already read into `body`."""
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
    except (HTTPException, MultiPartException) as err:
        raise RequestError(400, f"request body: not a valid {MULTIPART} form ({getattr(err, 'detail', None) or err})") from None
    files = [(key, value) for key, value in form.multi_items() if isinstance(value, UploadFile)]
    if not files:
        raise RequestError(400, "request body: the form holds no file (send the image as a file field)")
    key, upload = files[0]
    content_type = (upload.content_type or "").split(";")[0].strip().lower()
    return f"form field {key!r}", content_type, await upload.read()


def output_of(request: Request) -> str:
    """What to answer with: ?output=, else json if the client accepts application/json, else mask."""
    output = request.query_params.get("output")
    if output is None:
        return "json" if "application/json" in request.headers.get("accept", "") else "mask"
    if output not in OUTPUTS:
        raise RequestError(400, f"output={output!r}: expected one of {', '.join(OUTPUTS)}")
    return output


def respond(output: str, image: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> Response:
    if output == "json":
        return JSONResponse(summary(probabilities, classes))
    if output == "overlay":
        return Response(png_bytes(overlay(image, probabilities, classes)), media_type="image/png")
    return Response(png_bytes(labels_of(probabilities)), media_type="image/png")


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def summary(probabilities: np.ndarray, classes: list[str]) -> dict:
    """The JSON answer: each class's share of the mask's pixels and the probabilities, averaged down."""
    labels, binary = labels_of(probabilities), len(classes) == 1
    channels = torch.from_numpy(probabilities[None] if probabilities.ndim == 2 else probabilities)
    height, width = channels.shape[1:]
    scale = min(1.0, PROBABILITY_SIDE / max(height, width))
    cells = (max(1, round(height * scale)), max(1, round(width * scale)))
    grid = F.adaptive_avg_pool2d(channels[None], cells)[0].numpy()
    fractions = {name: float(np.mean(labels == (1 if binary else index))) for index, name in enumerate(classes)}
    return {
        "width": width, "height": height, "classes": classes, "fractions": fractions,
        "probabilities": {"width": cells[1], "height": cells[0], "values": np.round((grid[0] if binary else grid).astype(np.float64), 4).tolist()},
    }


@serve.deployment(name=APP_NAME)
class SegmentationServer:
    """One replica: the checkpoint's model, answering batches of requests."""

    def __init__(self, files: dict[str, bytes], device: str, max_batch_size: int, batch_wait_timeout_s: float,
                 body_timeout_s: float, tta: str | None = None):
        # The checkpoint's bytes, not its path: a replica's node need not see the path.
        self.model, self.tta, self.body_timeout_s = load_model_from_files(files, device), tta, body_timeout_s
        self.predict_batch.set_max_batch_size(max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch  # sizes set per replica in __init__, from the command line
    async def predict_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return predict(self.model, images, batch_size=len(images), tta=self.tta)

    async def __call__(self, request: Request) -> Response:
        try:
            if request.method != "POST":
                raise RequestError(405, f"{request.method}: POST an image")
            output = output_of(request)
            image = await image_of(request, self.body_timeout_s)
        except RequestError as err:
            return PlainTextResponse(f"error: {one_line(err)}\n", status_code=err.status)
        return respond(output, image, await self.predict_batch(image), self.model.classes)


@dataclass(frozen=True)
class Server:
    """A served checkpoint: POST images to `url`; `handle` is Serve's DeploymentHandle."""

    url: str
    checkpoint: Path
    handle: object

    def shutdown(self) -> None:
        """Serve and its HTTP proxy stop (serve.shutdown, as `serve run` does on Ctrl-C)."""
        serve.shutdown()


def ongoing_requests(max_batch_size: int) -> int:
    """A replica's default limit of requests in progress: two batches (one filling while another
    runs), and room beside them for UPLOAD_SLOTS clients still sending their bodies."""
    return 2 * max_batch_size + UPLOAD_SLOTS


def check_port_free(host: str, port: int) -> None:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, port))
    except OSError as err:
        raise RaytrainError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err})") from None


def check_resources(replicas: int, gpus_per_replica: float) -> None:
    """A local cluster too small for the replicas would leave Serve waiting for them for ever."""
    import ray

    if os.environ.get("RAY_ADDRESS"):  # a cluster of its own may scale up
        return
    have = ray.cluster_resources()
    if have.get("CPU", 0) < replicas:
        raise RaytrainError(f"--replicas {replicas}: each takes a CPU, the local cluster has {have.get('CPU', 0):g} (--num-cpus)")
    if gpus_per_replica and have.get("GPU", 0) < replicas * gpus_per_replica:
        raise RaytrainError(f"--replicas {replicas} --gpus-per-replica {gpus_per_replica:g}: this cluster has {have.get('GPU', 0):g} GPUs")


def limits_set_here() -> dict[str, str]:
    """RAYTRAIN_MAX_PIXELS and RAYTRAIN_MAX_PARAMETERS as this process has them (checked), for the
    replicas: on a cluster of its own they would otherwise run with that cluster's environment."""
    max_pixels(), max_parameters()  # a bad value is a one-line error here, not in every request
    return {name: os.environ[name] for name in (MAX_PIXELS_ENV, MAX_PARAMETERS_ENV) if os.environ.get(name, "").strip()}


def start(checkpoint: Path, *, replicas: int, gpus_per_replica: float, host: str, port: int, max_batch_size: int,
          batch_wait_timeout_s: float, body_timeout_s: float, max_ongoing_requests: int | None, num_cpus: int | None,
          tta: str | None = None) -> Server:
    """Start Serve on the cluster (a local one unless RAY_ADDRESS) and deploy the checkpoint.
    max_ongoing_requests: requests a replica holds at once, still arriving or waiting for a batch;
    None: ongoing_requests(max_batch_size)."""
    check_port_free(host, port)
    ensure_ray(num_cpus, verbosity=QUIET)
    check_resources(replicas, gpus_per_replica)
    resources = {"num_cpus": 1, "num_gpus": gpus_per_replica, "runtime_env": {"env_vars": limits_set_here()}}
    deployment = SegmentationServer.options(
        num_replicas=replicas, ray_actor_options=resources,
        max_ongoing_requests=max_ongoing_requests or ongoing_requests(max_batch_size),
    )
    device = "cuda" if gpus_per_replica else "cpu"
    try:
        serve.start(http_options={"host": host, "port": port})
        handle = serve.run(deployment.bind(checkpoint_files(checkpoint), device, max_batch_size, batch_wait_timeout_s, body_timeout_s, tta),
                           name=APP_NAME, route_prefix="/")
    except BaseException:
        serve.shutdown()
        raise
    return Server(f"http://{f'[{host}]' if ':' in host else host}:{port}/", checkpoint, handle)
