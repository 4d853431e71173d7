"""`raytrain serve`: the real CLI in a subprocess, on its own local Ray cluster, asked over real HTTP.

One server for the module (starting Ray and Serve takes most of the time); the last test stops it.
"""
from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import raytrain
from raytrain.checkpoints import seal
from tests.helpers import BROKEN_PNGS, broken_png, checkpoint, free_port, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]
MAX_PIXELS = 20_000  # the server's RAYTRAIN_MAX_PIXELS: IMAGE fits, BIG_IMAGE does not
BODY_TIMEOUT_S = 8  # the server's --body-timeout-s


def png(array: np.ndarray, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format)
    return buffer.getvalue()


IMAGE = np.random.default_rng(0).integers(0, 256, (40, 90, 3), dtype=np.uint8)
BIG_IMAGE = np.zeros((100, 201, 3), np.uint8)


def half_road_checkpoint(tmp: Path, name: str, val_iou: float) -> Path:
    """A real checkpoint of a tiny untrained model, its head's bias moved so that about half of
    IMAGE's pixels come out road: a mask that is neither all road nor none tells models apart."""
    path = checkpoint(tmp, name, {"val_iou": val_iou})
    weights = torch.load(path / "model.pt", weights_only=True)
    median = float(np.median(raytrain.predict(raytrain.load_model(path), [IMAGE])[0]))
    weights["head.bias"] -= float(np.log(median / (1 - median)))
    torch.save(weights, path / "model.pt")
    seal(path)
    return path


def serve_actors(ray) -> list[str]:
    """The live actors of Ray Serve (controller, HTTP proxy, replicas) on the cluster."""
    from ray.util.state import list_actors

    # The address given: other Ray clusters on this machine would make "the" cluster ambiguous.
    alive = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")], limit=1000)
    return [actor.class_name for actor in alive if actor.class_name.startswith(("Serve", "Proxy"))]


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    """The CLI serving on the session's cluster (RAY_ADDRESS), as on a cluster of one's own: a second
    local cluster would cost this suite its start-up time again."""
    tmp = tmp_path_factory.mktemp("serve")
    half_road_checkpoint(tmp, "worse", 0.3)
    best = half_road_checkpoint(tmp, "best", 0.6)
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "RAYTRAIN_MAX_PIXELS": str(MAX_PIXELS)}
    process = subprocess.Popen(
        [sys.executable, "-m", "raytrain.cli", "serve", tmp / "exp", "--port", str(port), "--max-batch-size", "4", "--tta", "flip",
         "--body-timeout-s", str(BODY_TIMEOUT_S)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    line = process.stdout.readline()  # the one line it prints once the endpoint answers
    if not line.startswith("serving"):
        process.kill()
        pytest.fail(f"no server: {line}{process.communicate(timeout=30)[1]}")
    yield {"process": process, "url": f"http://127.0.0.1:{port}/", "port": port, "best": best, "line": line}
    if process.poll() is None:
        process.kill()
        process.wait(timeout=60)
    from ray import serve

    serve.shutdown()  # whatever a failed test left: later tests need the session's CPUs


def post(url: str, body: bytes, content_type: str | None = "image/png", **headers) -> tuple[int, str, bytes]:
    """(status, Content-Type, body) of a POST; http.client sends no header it is not given."""
    address = urllib.parse.urlsplit(url)
    headers = {**({"Content-Type": content_type} if content_type else {}), **headers}
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    try:
        connection.request("POST", address.path + (f"?{address.query}" if address.query else ""), body, headers)
        answer = connection.getresponse()
        return answer.status, answer.getheader("Content-Type"), answer.read()
    finally:
        connection.close()


def decoded(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)))


def test_the_mask_is_predicts_mask_from_the_experiments_best_checkpoint(server):
    assert server["line"].strip() == f"serving {server['best']} at {server['url']} (Ctrl-C to stop)"
    status, content_type, body = post(server["url"], png(IMAGE))
    assert (status, content_type) == (200, "image/png")
    model = raytrain.load_model(server["best"])
    expected = raytrain.predict(model, [IMAGE], masks=True, tta="flip")[0]  # the server runs with --tta flip
    assert 0 < expected.mean() < 1  # some road, not all
    np.testing.assert_array_equal(decoded(body), expected)
    assert not np.array_equal(expected, raytrain.predict(model, [IMAGE], masks=True)[0])  # so the flip reached it


def test_concurrent_requests_each_get_their_own_mask(server):
    model = raytrain.load_model(server["best"])
    images = [np.roll(IMAGE, shift, axis=1) for shift in range(6)]
    answers = [None] * len(images)

    def ask(index):
        answers[index] = post(server["url"], png(images[index]))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for image, (status, _, body) in zip(images, answers):
        assert status == 200
        np.testing.assert_array_equal(decoded(body), raytrain.predict(model, [image], masks=True, tta="flip")[0])


def test_json_overlay_and_multipart_answers(server):
    probabilities = raytrain.predict(raytrain.load_model(server["best"]), [IMAGE], tta="flip")[0]
    mask = (probabilities > 0.5).astype(np.uint8)

    status, content_type, body = post(server["url"], png(IMAGE), Accept="application/json")
    assert (status, content_type) == (200, "application/json")
    answer = json.loads(body)
    assert (answer["width"], answer["height"], answer["classes"]) == (90, 40, ["road"])
    assert answer["fractions"]["road"] == pytest.approx(mask.mean())
    grid = np.array(answer["probabilities"]["values"])
    assert grid.shape == (answer["probabilities"]["height"], answer["probabilities"]["width"]) == (28, 64)
    assert grid.mean() == pytest.approx(probabilities.mean(), abs=0.01)

    status, content_type, body = post(server["url"] + "?output=overlay", png(IMAGE))
    overlay = decoded(body)
    assert (status, content_type, overlay.shape) == (200, "image/png", IMAGE.shape)
    np.testing.assert_array_equal(np.all(overlay == (255, 0, 0), axis=-1) & (mask == 1), mask == 1)
    np.testing.assert_array_equal(overlay[mask == 0], IMAGE[mask == 0])

    jpeg = png(IMAGE, "JPEG")
    boundary = uuid.uuid4().hex
    form = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="street.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode() + jpeg + f"\r\n--{boundary}--\r\n".encode()
    status, _, body = post(server["url"], form, f"multipart/form-data; boundary={boundary}")
    assert status == 200
    street = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    np.testing.assert_array_equal(decoded(body), raytrain.predict(raytrain.load_model(server["best"]), [street], masks=True, tta="flip")[0])


@pytest.mark.parametrize("query,body,content_type,status,message", [
    ("", b"", "image/png", 400, "request body: empty"),
    ("", b"not an image", "image/png", 400, "request body: not a readable image (UnidentifiedImageError)"),
    ("", png(IMAGE), "image/jpeg", 400, "request body: a PNG image, expected JPEG"),
    ("", png(IMAGE), "text/plain", 415, "Content-Type 'text/plain'"),
    ("", png(IMAGE), None, 415, "Content-Type 'missing'"),
    ("", png(BIG_IMAGE), "image/png", 400, f"image is 201x100, over the limit of {MAX_PIXELS} pixels (RAYTRAIN_MAX_PIXELS)"),
    ("", b"\0" * (4 * MAX_PIXELS + (1 << 20) + 1), "image/png", 413, "request body: over"),
    ("?output=logits", png(IMAGE), "image/png", 400, "output='logits': expected one of mask, overlay, json"),
    ("", b'--x\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n--x--\r\n', "multipart/form-data; boundary=x",
     400, "request body: the form holds no file"),
    ("", b"--x\r\n\r\n--x--\r\n", "multipart/form-data; boundary=x", 400, "request body: not a valid multipart/form-data form"),
    *[("", broken_png(damage), "image/png", 400, "request body: not a readable image") for damage in BROKEN_PNGS],
], ids=["empty", "not-an-image", "png-as-jpeg", "text", "no-type", "too-many-pixels", "too-many-bytes", "output", "no-file",
        "bad-form", *[f"png-{damage}" for damage in BROKEN_PNGS]])
def test_a_bad_request_is_a_4xx_with_one_line_and_the_server_goes_on(server, query, body, content_type, status, message):
    answer = post(server["url"] + query, body, content_type)
    assert answer[:2] == (status, "text/plain; charset=utf-8")
    text = answer[2].decode()
    assert text.startswith("error: ") and message in text and text.count("\n") == 1
    assert post(server["url"], png(IMAGE))[0] == 200


def test_clients_stalled_mid_body_get_a_408_and_never_keep_a_good_request_waiting(server):
    """20 clients send their headers and 200 bytes of a body, then nothing. They hold 20 of the
    replica's 2 x 4 + 32 slots, so a good request is answered at once; each of them gets a 408 once
    --body-timeout-s has passed, which frees its slot."""
    head = b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
    started = time.monotonic()
    stalled = [socket.create_connection(("127.0.0.1", server["port"]), timeout=60) for _ in range(20)]
    try:
        for client in stalled:
            client.sendall(head + png(IMAGE)[:200])
        time.sleep(2)  # the proxy hands each request to the replica once its headers are in
        status, _, body = post(server["url"], png(IMAGE))
        answered = time.monotonic() - started
        assert status == 200, body
        assert answered < BODY_TIMEOUT_S  # not after the stalled requests' 408s freed their slots
        for client in stalled:
            answer = http.client.HTTPResponse(client)
            answer.begin()
            assert answer.status == 408
            assert answer.read().decode() == f"error: request body: 200 bytes arrived in {BODY_TIMEOUT_S} s, not all of it (--body-timeout-s)\n"
        assert time.monotonic() - started >= BODY_TIMEOUT_S
    finally:
        for client in stalled:
            client.close()
    assert post(server["url"], png(IMAGE))[0] == 200


def test_sigterm_stops_serve_and_frees_the_port(server, ray_cluster):
    assert len(serve_actors(ray_cluster)) >= 3  # controller, proxy, replica
    process = server["process"]
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=90)
    assert process.returncode == 0, err
    assert "Traceback" not in err and err.strip().endswith("raytrain: stopped serving")
    wait_for(lambda: not serve_actors(ray_cluster), "Serve's actors to exit", timeout=30)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", server["port"]))
