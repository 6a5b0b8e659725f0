"""The server's OpenAPI description against its answers: every status it gives is documented with the body it has,
and a schemathesis run (in-process, over the ASGI app) finds no 5xx and no answer that the schema does not describe."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
schemathesis = pytest.importorskip("schemathesis")

from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from inference import test_text_prompts  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from sam_hf.apps.serve.app import create_app  # noqa: E402
from sam_hf.apps.serve.settings import ServeSettings  # noqa: E402

#: The text-prompt tests' tiny CLIPSeg, as a fixture of this module too.
tiny_clipseg_dir = test_text_prompts.tiny_clipseg_dir


@pytest.fixture(scope="module")
def app(tiny_model_dir, tiny_clipseg_dir):
    """The app on the tiny SAM, with a tiny CLIPSeg for `text` (offline, so no 503 for a model it cannot load), small
    limits that generated requests cross too, and the CPU."""
    settings = ServeSettings(
        device="cpu",
        max_upload_bytes=200_000,
        max_image_pixels=64 * 64,
        max_auto_points=2,
        text_model=str(tiny_clipseg_dir),
    )
    return create_app(tiny_model_dir, settings=settings)


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_openapi_documents_every_status_with_its_body(app):
    spec = app.openapi()
    error = {"$ref": "#/components/schemas/ErrorAnswer"}
    assert spec["components"]["schemas"]["ErrorAnswer"]["properties"]["detail"]["type"] == "string"
    for path in ("/segment", "/segment/auto"):
        responses = spec["paths"][path]["post"]["responses"]
        assert set(responses) == {"200", "400", "413", "415", "422", "503", "504"}, path
        for status in ("400", "413", "415", "422", "503", "504"):
            assert responses[status]["content"]["application/json"]["schema"] == error, (path, status)
        assert "Retry-After" in responses["503"]["headers"]
    assert set(spec["paths"]["/health"]["get"]["responses"]) == {"200", "503"}
    # No answer has FastAPI's list of validation errors: every 422 is {"detail": "..."} as documented.
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    with TestClient(app) as client:
        image = {"image": ("i.png", _png(32, 24), "image/png")}
        for response in (
            client.post("/segment/auto", params={"points_per_side": 0}, files=image),
            client.post("/segment", params={"mask_format": "jpeg"}, files=image, data={"prompts": "{}"}),
            client.post("/segment", files=image),
        ):
            assert response.status_code == 422 and isinstance(response.json()["detail"], str), response.text
        segment = client.post("/segment", files=image, data={"prompts": '{"boxes": [[1, 2, 20, 22]]}'})
        auto = client.post("/segment/auto", params={"points_per_side": 2, "pred_iou_thresh": 0}, files=image)
    assert segment.status_code == 200 and auto.status_code == 200
    schema = schemathesis.openapi.from_dict(spec)
    schema["/segment"]["POST"].validate_response(segment)  # raises on a mismatch, as for this one:
    schema["/segment/auto"]["POST"].validate_response(auto)
    # FastAPI's own 422 body, a list of validation errors, is not what the schema promises.
    plain = FastAPI()

    @plain.post("/segment")
    def _segment(points_per_side: int) -> None: ...

    with TestClient(plain) as other:
        listed = other.post("/segment", params={"points_per_side": "x"})
    assert listed.status_code == 422 and isinstance(listed.json()["detail"], list)
    with pytest.raises(Exception, match="not of type"):
        schema["/segment"]["POST"].validate_response(listed)


@pytest.mark.slow  # about 25 s for both modes on 2 CPU cores
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(app, mode):
    """A bounded schemathesis run of every operation, over the ASGI app in this process (no network).

    All checks run but `positive_data_acceptance`: a schema cannot say that `image` must hold a readable image or
    that a box must lie inside it, so the server rightly refuses some requests that the schema allows (with a
    documented 4xx, which the other checks verify)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} == {
        ("GET", "/health"),
        ("POST", "/segment"),
        ("POST", "/segment/auto"),
    }
    cases = st.one_of(*(op.as_strategy(generation_mode=mode) for op in operations))
    seen = set()

    @given(case=cases)
    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def run(case):
        response = case.call()
        seen.add((case.path, response.status_code))
        case.validate_response(response, excluded_checks=[positive_data_acceptance])

    run()
    assert not any(status >= 500 for _, status in seen), seen
