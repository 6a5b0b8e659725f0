"""The HTTP server against a real uvicorn on 127.0.0.1, driven with httpx."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("multipart")

from sam_hf.apps.serve.app import create_app  # noqa: E402
from sam_hf.apps.serve.requests import decode_png_mask, decode_rle, encode_png_mask, encode_rle  # noqa: E402
from sam_hf.apps.serve.settings import ServeSettings  # noqa: E402
from sam_hf.inference.predictor import SamPredictor  # noqa: E402

# Small limits so that every limit can be crossed cheaply; the nuclei images are 256 x 256 = 65,536 pixels. The
# server is compared with CPU predictors, so it runs on the CPU also where CUDA is present (its default there).
SETTINGS = ServeSettings(
    device="cpu",
    max_upload_bytes=1_000_000,
    max_image_pixels=300 * 300,
    max_prompts=16,
    max_points_per_prompt=8,
    max_boxes_and_points=40,
    max_auto_points=6,
    max_pending=64,
    request_timeout_s=60.0,
)


class ThreadedServer:
    """uvicorn in a background thread of this process, on a socket bound to a free port of 127.0.0.1."""

    def __init__(self, app) -> None:
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and without it each
        # response waits ~40 ms for a delayed ACK (Nagle).
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("The test server did not start; see the log above.")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


@pytest.fixture(scope="module")
def server(tiny_model_dir) -> Iterator[ThreadedServer]:
    with ThreadedServer(create_app(tiny_model_dir, settings=SETTINGS)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def predictor(tiny_model_dir) -> SamPredictor:
    """The library call the server's answers must match."""
    return SamPredictor.from_pretrained(str(tiny_model_dir))


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def nuclei_png(nuclei_dir) -> bytes:
    return sorted((nuclei_dir / "images").glob("*.png"))[0].read_bytes()


@pytest.fixture(scope="module")
def synthetic_png() -> bytes:
    """A non-square grayscale image (exercises the resize-and-pad path and the RGB conversion)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 40, (120, 200), dtype=np.uint8)
    pixels[30:80, 50:120] += 150
    return _png_bytes(Image.fromarray(pixels))


def _segment(client, image: bytes, prompts, mask_format: str | None = None, **kwargs) -> httpx.Response:
    params = {"mask_format": mask_format} if mask_format else None
    text = prompts if isinstance(prompts, str) else json.dumps(prompts)
    return client.post(
        "/segment", params=params, files={"image": ("image.png", image, "image/png")}, data={"prompts": text}, **kwargs
    )


def _decode_masks(body: dict) -> np.ndarray:
    decode = decode_rle if body["mask_format"] == "rle" else decode_png_mask
    return np.stack([np.stack([decode(m) for m in per_prompt]) for per_prompt in body["masks"]])


def _expected(predictor: SamPredictor, image: bytes, prompts: dict):
    predictor.set_image(Image.open(io.BytesIO(image)))
    kwargs = {k: v for k, v in prompts.items() if k != "multimask_output"}
    return predictor.predict(**kwargs, multimask_output=prompts.get("multimask_output", False))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width x height` pixels in a few dozen bytes (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------------------------------------------------------


def test_masks_round_trip_and_the_rle_codec_is_core_s():
    """The server writes COCO RLE with the one codec of `sam_hf.core.rle` (tested in tests/core/test_rle.py)."""
    import sam_hf.apps.serve as serve
    import sam_hf.core.rle as core_rle

    assert serve.decode_rle is decode_rle is core_rle.decode_rle
    assert serve.encode_rle is encode_rle is core_rle.encode_rle
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 5), (64, 33)]:
        for density in (0.0, 0.3, 1.0):
            m = rng.random(shape) < density
            np.testing.assert_array_equal(decode_rle(encode_rle(m, compressed=False)), m)
            np.testing.assert_array_equal(decode_png_mask(encode_png_mask(m)), m)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="max_prompts must be a positive integer"):
        ServeSettings(max_prompts=0)
    with pytest.raises(ValueError, match="request_timeout_s"):
        ServeSettings(request_timeout_s=float("nan"))
    assert ServeSettings(max_image_pixels=40e6).max_image_pixels == 40_000_000


def test_cli_serve_flags(capsys, monkeypatch):
    from sam_hf.apps.cli import build_parser, main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    assert "--max-prompts" in capsys.readouterr().out
    monkeypatch.setenv("SAM_HF_MODEL", "/models/tuned")
    args = build_parser().parse_args(["serve", "--max-prompts", "8", "--max-image-pixels", "4e6", "--port", "9000"])
    assert (args.model, args.max_prompts, args.max_image_pixels, args.port) == ("/models/tuned", 8, 4_000_000, 9000)
    args = build_parser().parse_args(["serve", "--max-points-per-prompt", "5", "--max-boxes-and-points", "300"])
    assert (args.max_points_per_prompt, args.max_boxes_and_points) == (5, 300)
    assert ServeSettings().max_points_per_prompt == 64 and ServeSettings().max_boxes_and_points == 2048
    assert args.request_timeout_s == ServeSettings().request_timeout_s
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-prompts", "0"])


def test_health(client, tiny_model_dir):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"model": os.fspath(tiny_model_dir), "device": "cpu", "ready": True}


BOXES = [[10.0, 12.0, 90.0, 80.0], [100.0, 40.0, 180.0, 110.0], [0.0, 0.0, 200.0, 120.0]]
POINTS = [[[40.0, 40.0], [5.0, 5.0]], [[140.0, 70.0], [120.0, 60.0]], [[190.0, 20.0], [10.0, 110.0]]]
LABELS = [[1, 0], [1, 1], [1, 0]]


@pytest.mark.parametrize("mask_format", ["rle", "png"])
@pytest.mark.parametrize(
    "prompts",
    [
        {"boxes": BOXES},
        {"points": POINTS, "point_labels": LABELS, "multimask_output": True},
        {"boxes": BOXES, "points": POINTS, "point_labels": LABELS},
        {"boxes": BOXES[:1], "multimask_output": True},
    ],
    ids=["boxes", "points-multimask", "boxes+points", "one-box-multimask"],
)
def test_segment_is_bit_identical_to_the_library(client, predictor, synthetic_png, prompts, mask_format):
    response = _segment(client, synthetic_png, prompts, mask_format)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"], body["mask_format"]) == (200, 120, mask_format)
    expected = _expected(predictor, synthetic_png, prompts)
    masks = _decode_masks(body)
    n = len(prompts["boxes"]) if "boxes" in prompts else len(prompts["points"])
    assert masks.shape == expected.masks.shape == (n, 3 if prompts.get("multimask_output") else 1, 120, 200)
    np.testing.assert_array_equal(masks, expected.masks)
    np.testing.assert_array_equal(np.asarray(body["scores"], np.float32), expected.scores)


def test_mask_format_as_form_field(client, predictor, nuclei_png):
    prompts = {"boxes": [[20, 30, 120, 140]]}
    response = client.post(
        "/segment",
        files={"image": ("cells.png", nuclei_png, "image/png")},
        data={"prompts": json.dumps(prompts), "mask_format": "png"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["mask_format"] == "png"
    np.testing.assert_array_equal(_decode_masks(response.json()), _expected(predictor, nuclei_png, prompts).masks)


def _bad_requests(nuclei_png: bytes, synthetic_png: bytes) -> list[tuple[str, dict, int, str]]:
    """(name, httpx.post kwargs for /segment, expected status, text the detail must contain)."""
    box = {"boxes": [[10, 10, 50, 50]]}

    def multipart(image: bytes = nuclei_png, prompts=box, filename: str = "image.png") -> dict:
        text = prompts if isinstance(prompts, str) else json.dumps(prompts)
        return {"files": {"image": (filename, image, "image/png")}, "data": {"prompts": text}}

    big = Image.fromarray(np.zeros((400, 400), np.uint8))  # 160,000 pixels > 90,000
    # 1.5 MB without Content-Length: a multipart body whose image part goes on past the limit.
    part_header = b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="i.png"\r\n\r\n'
    chunks = (part_header if i < 0 else b"x" * 100_000 for i in range(-1, 15))
    return [
        ("non-image bytes", multipart(b"this is not an image at all"), 400, "not an image"),
        ("truncated image", multipart(nuclei_png[: len(nuclei_png) // 2]), 400, "truncated"),
        ("empty image", multipart(b""), 400, "empty"),
        ("too many pixels", multipart(_png_bytes(big)), 413, "max_image_pixels"),
        ("decompression bomb", multipart(_png_header_only(60_000, 60_000)), 413, "max_image_pixels"),
        ("body over the limit", multipart(b"\0" * 1_200_000), 413, "max_upload_bytes"),
        (
            "chunked body over the limit",
            {"content": chunks, "headers": {"content-type": "multipart/form-data; boundary=xyz"}},
            413,
            "max_upload_bytes",
        ),
        ("malformed JSON", multipart(prompts='{"boxes": [[1, 2, 3, 4]'), 400, "not valid JSON"),
        ("JSON that is not an object", multipart(prompts="[[1, 2, 3, 4]]"), 422, "JSON object"),
        ("unknown prompt key", multipart(prompts={"box": [[1, 2, 3, 4]]}), 422, "Unknown key"),
        ("no prompt", multipart(prompts={}), 422, "at least one prompt"),
        ("box outside the image", multipart(prompts={"boxes": [[10, 10, 300, 50]]}), 422, "outside"),
        ("inverted box", multipart(prompts={"boxes": [[50, 50, 10, 60]]}), 422, "inverted"),
        ("NaN box", multipart(prompts='{"boxes": [[1, 2, NaN, 4]]}'), 422, "NaN"),
        ("huge number", multipart(prompts='{"boxes": [[1, 2, 3, 1' + "0" * 400 + "]]}"), 422, "too large"),
        ("deeply nested JSON", multipart(prompts="[" * 100_000), 400, "nested too deeply"),
        ("point outside", multipart(prompts={"points": [[[10, 300]]]}), 422, "outside"),
        ("bad point label", multipart(prompts={"points": [[[10, 30]]], "point_labels": [[2]]}), 422, "point_labels"),
        ("multimask not a bool", multipart(prompts={**box, "multimask_output": "yes"}), 422, "multimask_output"),
        ("too many prompts", multipart(prompts={"boxes": [[1, 1, 9, 9]] * 17}), 422, "max_prompts = 16"),
        (
            "too many points in one prompt",
            multipart(prompts={"points": [[[5, 5]] * 9]}),
            422,
            "9 points in one prompt, more than the server's max_points_per_prompt = 8 (--max-points-per-prompt)",
        ),
        (
            "60,000 points in one prompt",
            multipart(prompts={"points": [[[float(i % 250) + 0.5, 7.25] for i in range(60_000)]]}),
            422,
            "max_points_per_prompt = 8",
        ),
        (
            "too many boxes and points in one request",
            multipart(prompts={"boxes": [[1, 1, 9, 9]] * 16, "points": [[[5, 5]] * 2] * 16}),
            413,
            "48 boxes and points in one request, more than the server's max_boxes_and_points = 40 "
            "(--max-boxes-and-points)",
        ),
        (
            "chunked bytes that are not multipart",
            {
                "content": (b"x" * 100_000 for _ in range(15)),
                "headers": {"content-type": "multipart/form-data; boundary=xyz"},
            },
            400,
            "The multipart body could not be parsed: Invalid multipart data.",
        ),
        ("JSON body", {"json": {"prompts": box}}, 415, "multipart/form-data"),
        ("form-urlencoded body", {"data": {"prompts": "{}"}}, 415, "multipart/form-data"),
        (
            "multipart without a boundary",
            {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}},
            400,
            "boundary",
        ),
        ("no image part", {"files": {"prompts": ("p.json", json.dumps(box), "application/json")}}, 422, "`image`"),
        ("image as text", {"files": {"x": ("x", b"", "text/plain")}, "data": {"image": "abc"}}, 422, "file part"),
        ("no prompts part", {"files": {"image": ("i.png", nuclei_png, "image/png")}}, 422, "`prompts`"),
        ("unknown mask_format", {**multipart(), "params": {"mask_format": "jpeg"}}, 422, "mask_format"),
    ]


def test_bad_input_gets_a_helpful_4xx(client, server, predictor, nuclei_png, synthetic_png):
    failures = []
    for name, kwargs, status, text in _bad_requests(nuclei_png, synthetic_png):
        try:
            response = client.post("/segment", **kwargs)
        except httpx.TransportError as err:  # the server must answer, not drop the connection
            failures.append(f"{name}: {type(err).__name__} {err}")
            continue
        detail = response.json().get("detail") if response.headers.get("content-type") == "application/json" else None
        if response.status_code != status or not isinstance(detail, str) or text not in detail:
            failures.append(f"{name}: expected {status} with {text!r}, got {response.status_code} {response.text!r}")
    assert not failures, "\n".join(failures)
    # The server still answers, and correctly, after all of that (on a fresh connection as well).
    prompts = {"boxes": BOXES[:2]}
    for c in (client, httpx.Client(base_url=server.url, timeout=60)):
        response = _segment(c, synthetic_png, prompts)
        assert response.status_code == 200, response.text
        np.testing.assert_array_equal(
            _decode_masks(response.json()), _expected(predictor, synthetic_png, prompts).masks
        )
    assert client.get("/health").json()["ready"] is True


def _burst(url: str, image: bytes, boxes: list[list[float]]) -> list[httpx.Response]:
    """One `/segment` request per box, all at once."""

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(boxes), max_keepalive_connections=len(boxes))
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
            return await asyncio.gather(
                *(
                    c.post(
                        "/segment",
                        files={"image": ("cells.png", image, "image/png")},
                        data={"prompts": json.dumps({"boxes": [box]})},
                    )
                    for box in boxes
                )
            )

    return asyncio.run(burst())


def test_burst_of_50_concurrent_requests(server, predictor, nuclei_png):
    # A different box per request, so that an answer given to the wrong request would be caught.
    boxes = [[float(3 * i), float(2 * i), float(3 * i + 30 + i), float(2 * i + 50)] for i in range(50)]
    assert max(b[2] for b in boxes) <= 256 and max(b[3] for b in boxes) <= 256

    responses = _burst(server.url, nuclei_png, boxes)
    assert [r.status_code for r in responses] == [200] * 50, [r.text for r in responses if r.status_code != 200]
    # The same input as each request: one box. (Decoding all 50 boxes in one batch may flip a pixel whose logit is
    # within float noise of the threshold, so that is not the same input.)
    predictor.set_image(Image.open(io.BytesIO(nuclei_png)))
    for i, (box, response) in enumerate(zip(boxes, responses)):
        expected = predictor.predict(boxes=[box])
        body = response.json()
        np.testing.assert_array_equal(_decode_masks(body), expected.masks, err_msg=f"request {i}")
        np.testing.assert_array_equal(np.asarray(body["scores"], np.float32), expected.scores)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc (Linux)")
def test_memory_is_flat_over_200_requests(client, nuclei_png):
    """The server runs in this process, so this process's RSS is the server's (plus a client that keeps nothing).

    Bound: 50 MB. One request holds well under 1 MB (a 256 x 256 image, 4 masks, their RLE and JSON), so 200
    requests that each leaked their input or output would add about 50-100 MB, and a leaked image embedding
    (64 x 16 x 16 floats) or torch graph per request would add more. Allocator noise after warm-up (glibc arenas for
    the worker threads, torch's caching) stays within a few MB, far below the bound.
    """
    prompts = {"boxes": BOXES, "points": POINTS, "point_labels": LABELS}
    for i in range(20):  # warm-up: every worker thread, both mask formats, allocator pools
        assert _segment(client, nuclei_png, prompts, "rle" if i % 2 else "png").status_code == 200
    before = _rss_bytes()
    for i in range(200):
        assert _segment(client, nuclei_png, prompts, "rle" if i % 2 else "png").status_code == 200
    growth = _rss_bytes() - before
    print(f"RSS growth over 200 requests: {growth / 2**20:.1f} MiB")
    assert growth < 50 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 200 requests"


@pytest.mark.slow  # three bursts of 60 requests: about 15 s on 2 CPU cores
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc (Linux)")
def test_memory_after_bursts_is_a_high_water_mark_not_a_growing_cache(server, nuclei_png):
    """After a burst of 60 concurrent requests the process keeps the memory the allocator grew to (worker threads'
    arenas); nothing is cached per request, so two more bursts of the same requests add almost nothing.

    Bound: 20 MB for the two later bursts together, against about 60 MB kept after the first (measured with these
    256 x 256 images; 3 MB images keep about 350 MB). A per-request cache of images, embeddings or answers would grow
    with every burst."""
    boxes = [[10.0, 10.0, 60.0 + i, 60.0 + i] for i in range(60)]
    assert all(r.status_code == 200 for r in _burst(server.url, nuclei_png, boxes))
    before = _rss_bytes()
    for _ in range(2):
        assert all(r.status_code == 200 for r in _burst(server.url, nuclei_png, boxes))
    growth = _rss_bytes() - before
    assert growth < 20 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over two more bursts of 60 requests"


def test_segment_auto(client, nuclei_png, synthetic_png):
    for image, (width, height) in [(nuclei_png, (256, 256)), (synthetic_png, (200, 120))]:
        for mask_format in ("rle", "png"):
            response = client.post(
                "/segment/auto",
                params={
                    "points_per_side": 4,
                    "mask_format": mask_format,
                    "pred_iou_thresh": 0.0,  # a random model's IoU predictions are low; keep its masks
                    "stability_score_thresh": 0.0,
                },
                files={"image": ("image.png", image, "image/png")},
            )
            assert response.status_code == 200, response.text
            body = response.json()
            assert (body["width"], body["height"], body["points_per_side"]) == (width, height, 4)
            assert 1 <= len(body["masks"]) == len(body["scores"]) <= 3 * 4**2
            decode = decode_rle if mask_format == "rle" else decode_png_mask
            for mask in body["masks"]:
                assert decode(mask).shape == (height, width)
    over_cap = client.post(
        "/segment/auto", params={"points_per_side": 7}, files={"image": ("i.png", nuclei_png, "image/png")}
    )
    assert over_cap.status_code == 422 and "max_auto_points = 6" in over_cap.json()["detail"]
    not_an_image = client.post("/segment/auto", files={"image": ("i.png", b"GIF89a...", "image/gif")})
    assert not_an_image.status_code == 400 and "image" in not_an_image.json()["detail"]


def test_timeout_gives_504_and_the_server_recovers(tiny_model_dir, nuclei_png):
    # No request can decode an image and run a SAM model in a microsecond, so every model request times out.
    settings = ServeSettings(request_timeout_s=1e-6, max_image_pixels=SETTINGS.max_image_pixels)
    with ThreadedServer(create_app(tiny_model_dir, settings=settings)) as slow, httpx.Client(base_url=slow.url) as c:
        for _ in range(3):
            response = _segment(c, nuclei_png, {"boxes": BOXES[:1]}, timeout=30)
            assert response.status_code == 504
            assert "request_timeout_s" in response.json()["detail"]
        response = c.post(
            "/segment/auto", params={"points_per_side": 2}, files={"image": ("i.png", nuclei_png, "image/png")}
        )
        assert response.status_code == 504
        assert c.get("/health").json()["ready"] is True


@pytest.mark.parametrize("shape", [(4, 64), (64, 4), (1, 1), (2, 3)])
def test_tiny_images_are_segmented_at_their_own_size(client, shape):
    """An image 1 to 4 pixels high is not read channels-first: boxes are checked against its own W x H and the
    masks come back at its own size."""
    height, width = shape
    image = _png_bytes(Image.fromarray(np.random.default_rng(width).integers(0, 255, (height, width, 3), np.uint8)))
    response = _segment(client, image, {"boxes": [[0, 0, width, height]], "points": [[[0, 0]]]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"]) == (width, height)
    assert _decode_masks(body).shape == (1, 1, height, width)
    if height != width:
        response = _segment(client, image, {"boxes": [[0, 0, height, width]]})
        assert response.status_code == 422, response.text
        assert f"outside the {width}x{height} image" in response.json()["detail"]


def test_segment_refines_with_a_previous_mask(client, predictor, synthetic_png):
    first = _segment(client, synthetic_png, {"boxes": BOXES[:1]}, "rle").json()
    previous = first["masks"][0][0]
    prompts = {"boxes": BOXES[:1], "points": [POINTS[0][:1]], "point_labels": [[0]], "mask_input": previous}
    response = _segment(client, synthetic_png, prompts, "png")
    assert response.status_code == 200, response.text
    predictor.set_image(Image.open(io.BytesIO(synthetic_png)))
    expected = predictor.predict(
        boxes=BOXES[:1],
        points=[POINTS[0][:1]],
        point_labels=[[0]],
        mask_input=predictor.mask_input_from_mask(decode_rle(previous)),
    )
    np.testing.assert_array_equal(_decode_masks(response.json()), expected.masks)
    # The same mask as a base64 PNG gives the same answer.
    as_png = {**prompts, "mask_input": encode_png_mask(decode_rle(previous))}
    np.testing.assert_array_equal(_decode_masks(_segment(client, synthetic_png, as_png, "png").json()), expected.masks)
    two = _segment(client, synthetic_png, {"boxes": BOXES, "mask_input": previous})
    assert two.status_code == 422 and "one prompt" in two.json()["detail"]
    wrong = {"boxes": BOXES[:1], "mask_input": encode_rle(np.zeros((10, 20), bool))}
    response = _segment(client, synthetic_png, wrong)
    assert response.status_code == 422 and "20x10 but the image is 200x120" in response.json()["detail"]
    garbage = _segment(client, synthetic_png, {"boxes": BOXES[:1], "mask_input": "not base64!"})
    assert garbage.status_code == 422 and "mask_input" in garbage.json()["detail"]


# (name, `prompts` JSON text for the 200 x 120 synthetic image, text the 422 detail must hold). Before these checks the
# first two got a 500 (OverflowError) and the others a 200: strings, booleans and fractions were converted to numbers.
_BAD_NUMBERS = [
    (
        "mask_input size of 1e400",
        '{"boxes": [[10, 10, 50, 50]], "mask_input": {"size": [1e400, 5], "counts": [5]}}',
        "RLE 'size' must be [height, width] (non-negative integers)",
    ),
    (
        "mask_input count of 2**64",
        json.dumps({"boxes": [[10, 10, 50, 50]], "mask_input": {"size": [120, 200], "counts": [2**64]}}),
        f"RLE runs sum to {2**64} pixels but 'size' 120x200 (HxW) has 24000",
    ),
    (
        "mask_input fractional counts",
        json.dumps({"boxes": [[10, 10, 50, 50]], "mask_input": {"size": [120, 200], "counts": [12000.5, 12000.5]}}),
        "count 0 is 12000.5",
    ),
    (
        "mask_input counts as strings",
        json.dumps({"boxes": [[10, 10, 50, 50]], "mask_input": {"size": [120, 200], "counts": ["24000"]}}),
        'count 0 is "24000"',
    ),
    (
        "mask_input size as strings",
        json.dumps({"boxes": [[10, 10, 50, 50]], "mask_input": {"size": ["120", "200"], "counts": [24000]}}),
        "RLE 'size' must be [height, width]",
    ),
    (
        "box coordinates as strings",
        json.dumps({"boxes": [["10", "10", "50", "50"]]}),
        "`boxes` must hold only numbers",
    ),
    (
        "a point coordinate true",
        '{"points": [[[true, 5]]]}',
        "`points` must hold only numbers (nested lists of JSON numbers); it holds true.",
    ),
    (
        "a label as a string",
        '{"points": [[[10, 10]]], "point_labels": [["1"]]}',
        "`point_labels` must hold only numbers",
    ),
    ("a label true", '{"points": [[[10, 10]]], "point_labels": [[true]]}', "`point_labels` must hold only numbers"),
]


@pytest.mark.parametrize("name, prompts, text", _BAD_NUMBERS, ids=[case[0] for case in _BAD_NUMBERS])
def test_numbers_that_are_not_what_the_field_takes_get_422(client, synthetic_png, name, prompts, text):
    response = _segment(client, synthetic_png, prompts)
    assert response.status_code == 422, f"{name}: {response.status_code} {response.text}"
    detail = response.json()["detail"]
    assert text in detail, detail
    assert ("`mask_input`" if "mask_input" in name else "`") in detail
    assert client.get("/health").status_code == 200


def test_mask_input_may_be_compressed_rle(client, synthetic_png):
    """`mask_input` takes COCO RLE with compressed counts too (what pycocotools writes): the same answer."""
    first = _segment(client, synthetic_png, {"boxes": BOXES[:1]}).json()
    mask = decode_rle(first["masks"][0][0])
    answers = [
        _segment(client, synthetic_png, {"boxes": BOXES[:1], "mask_input": encode_rle(mask, compressed)}).json()
        for compressed in (False, True)
    ]
    assert answers[0]["masks"] == answers[1]["masks"] and answers[0]["scores"] == answers[1]["scores"]


@pytest.mark.slow
def test_a_mask_input_whose_runs_wrap_around_int64_gets_422_and_the_server_lives(tiny_model_dir, nuclei_png, tmp_path):
    """The 154-byte request: four runs whose int64 sum wraps around to exactly H x W once crashed the server process
    (numpy's `np.repeat` segfaulted). The app runs in a child process, so a crash fails this test, not the run."""
    height = width = 256
    prompts = {
        "boxes": [[10, 10, 50, 50]],
        "mask_input": {"size": [height, width], "counts": [2**62] * 3 + [2**62 + height * width]},
    }
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    (tmp_path / "image.png").write_bytes(nuclei_png)
    code = (
        "import json, sys\n"
        "from fastapi.testclient import TestClient\n"
        "from sam_hf.apps.serve.app import create_app\n"
        "from sam_hf.apps.serve.settings import ServeSettings\n"
        "model, image, prompts = sys.argv[1], open(sys.argv[2], 'rb').read(), open(sys.argv[3]).read()\n"
        "with TestClient(create_app(model, settings=ServeSettings(device='cpu'))) as client:\n"
        "    files = {'image': ('i.png', image, 'image/png')}\n"
        "    answer = client.post('/segment', files=files, data={'prompts': prompts})\n"
        "    health = client.get('/health')\n"
        "print(json.dumps([answer.status_code, answer.json(), health.status_code]))\n"
    )
    args = [str(tiny_model_dir), str(tmp_path / "image.png"), str(tmp_path / "prompts.json")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"the server process died (exit {proc.returncode}): {proc.stderr[-2000:]}"
    status, body, health = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (status, health) == (422, 200), body
    total = 4 * 2**62 + height * width  # the Python-int sum; in int64 it wraps around to height * width
    assert f"RLE runs sum to {total} pixels but 'size' 256x256 (HxW) has 65536" in body["detail"]
    assert "`mask_input`" in body["detail"]


@pytest.fixture(scope="module")
def crop_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model as if tuned with --object_crop_scale 3."""
    import shutil

    path = tmp_path_factory.mktemp("crop-model") / "m"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "object_crop_scale": 3}))
    return path


def test_a_model_tuned_on_object_crops_is_served_on_crops(crop_model_dir, synthetic_png):
    from transformers import pipeline

    from sam_hf.inference.windowed import ObjectCropPredictor, refine_on_object_crops

    library = SamPredictor.from_pretrained(str(crop_model_dir))
    image = Image.open(io.BytesIO(synthetic_png))
    boxes = [[10, 12, 40, 30], [100, 40, 180, 110]]
    with (
        ThreadedServer(create_app(crop_model_dir, settings=SETTINGS)) as running,
        httpx.Client(base_url=running.url, timeout=60) as c,
    ):
        body = _segment(c, synthetic_png, {"boxes": boxes}).json()
        expected = ObjectCropPredictor(library, 3)(image, boxes=boxes)
        assert body["object_crop_scale"] == 3
        np.testing.assert_array_equal(_decode_masks(body), expected.masks)
        np.testing.assert_allclose(body["scores"], expected.scores, rtol=1e-5)
        # A prompt without a box has no crop: the whole image, as the library decodes it.
        body = _segment(c, synthetic_png, {"points": POINTS[:1], "point_labels": LABELS[:1]}).json()
        assert body["object_crop_scale"] is None
        library.set_image(image)
        np.testing.assert_array_equal(
            _decode_masks(body), library.predict(points=POINTS[:1], point_labels=LABELS[:1]).masks
        )
        # Automatic masks: the pipeline's, each decoded again on its own crop.
        settings = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
        response = c.post(
            "/segment/auto",
            params={"points_per_side": 4, **settings},
            files={"image": ("image.png", synthetic_png, "image/png")},
        )
        body = response.json()
        proposals = pipeline("mask-generation", model=str(crop_model_dir), device="cpu")(
            image, points_per_crop=4, **settings
        )
        masks, scores = refine_on_object_crops(library, image, proposals["masks"], 3)
        assert body["object_crop_scale"] == 3 and len(body["masks"]) == len(masks) > 0
        np.testing.assert_array_equal(np.stack([decode_rle(m) for m in body["masks"]]), masks)
        np.testing.assert_allclose(body["scores"], scores, rtol=1e-5)
    # object_crop_scale=0 serves the same model on the whole image.
    off = ServeSettings(**{**SETTINGS.__dict__, "object_crop_scale": 0})
    with (
        ThreadedServer(create_app(crop_model_dir, settings=off)) as running,
        httpx.Client(base_url=running.url, timeout=60) as c,
    ):
        body = _segment(c, synthetic_png, {"boxes": boxes}).json()
        assert body["object_crop_scale"] is None
        library.set_image(image)
        np.testing.assert_array_equal(_decode_masks(body), library.predict(boxes=boxes).masks)
    with pytest.raises(ValueError, match=r"ServeSettings.object_crop_scale must be >= 1 \(or 0: off\)"):
        ServeSettings(object_crop_scale=0.5)
