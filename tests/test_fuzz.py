"""Fuzzing: schemathesis against the app's own OpenAPI, hypothesis against preprocessing.

Both are bounded so they fit in the suite; the totals are counted and checked at the end.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.python import asgi

from service.app import create_app
from service.preprocessing import (
    INPUT_SIZE,
    ImageLimits,
    PreprocessingError,
    preprocess_image,
)
from service.settings import REPO_MODELS_DIR, Settings
from tests.images import encode, gray_image, rgb_image

FUZZ_EXAMPLES = 100  # per operation
OUTCOMES: Counter[tuple[str, int]] = Counter()  # (operation, status) -> requests


# Building the app loads nothing (models load in its lifespan), so it can exist at import.
APP = create_app(Settings(models_dir=REPO_MODELS_DIR, onnx_threads=1))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module")
def asgi_client():
    with asgi.get_client(APP) as client:  # runs the lifespan once: models load one time
        yield client


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_api_conforms_to_its_own_schema(case, asgi_client):
    # Two checks cannot hold for image uploads. Random bytes sent as image/png match the
    # schema but are no image, so they rightly get a 400, not a 2xx. And a multipart part is
    # bytes whatever the schema says its type is, so a batch of non-images is a 200 whose
    # entries each carry their own error, by design. Every other check runs.
    from schemathesis.specs.openapi.checks import (
        negative_data_rejection,
        positive_data_acceptance,
    )

    excluded = [positive_data_acceptance]
    if case.path == "/predict":
        excluded.append(negative_data_rejection)
    response = case.call_and_validate(session=asgi_client, excluded_checks=excluded)
    OUTCOMES[f"{case.method} {case.path}", response.status_code] += 1
    assert response.status_code < 500


def test_fuzzing_covered_every_operation_without_a_5xx():
    """Runs after the schemathesis test in this file: totals for the record."""
    operations = {operation for operation, _ in OUTCOMES}
    assert {"POST /predict", "GET /classes", "GET /metrics", "GET /readyz",
            "GET /healthz", "GET /models"} <= operations
    assert max(status for _, status in OUTCOMES) < 500
    print(f"\nfuzzed requests: {sum(OUTCOMES.values())}")
    for (operation, status), count in sorted(OUTCOMES.items()):
        print(f"  {operation} -> {status}: {count}")


# --- preprocessing: any bytes give the contract or a typed error ----------------------------

def seed_images() -> list[bytes]:
    return [encode(gray_image(40, 30), "PNG"), encode(rgb_image(40, 30), "JPEG"),
            encode(gray_image(40, 30).convert("P"), "GIF"), encode(rgb_image(40, 30), "WEBP"),
            encode(gray_image(40, 30), "TIFF"), encode(rgb_image(40, 30), "BMP"),
            encode(rgb_image(40, 30).convert("RGBA"), "PNG"),
            encode(Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40)), "PNG")]


SEEDS = seed_images()
SMALL_LIMITS = ImageLimits(max_bytes=64 * 1024, max_pixels=4_000_000)


def assert_contract_or_typed_error(data: bytes) -> None:
    try:
        result = preprocess_image(data, SMALL_LIMITS)
    except PreprocessingError as exc:
        assert exc.code and str(exc)
        return
    assert result.shape == (INPUT_SIZE, INPUT_SIZE) and result.dtype == np.float32
    assert result.min() >= 0.0 and result.max() <= 1.0


@given(st.binary(max_size=2048))
@settings(max_examples=300, deadline=None)
def test_any_bytes_give_the_contract_or_a_typed_error(data):
    assert_contract_or_typed_error(data)


@st.composite
def mutated_images(draw) -> bytes:
    """A real encoded image with bytes flipped, cut, or spliced: deep inside the decoders."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    for _ in range(draw(st.integers(1, 8))):
        operation = draw(st.sampled_from(["flip", "cut", "splice", "overwrite"]))
        at = rng.randrange(len(data)) if data else 0
        if operation == "flip" and data:
            data[at] ^= 1 << rng.randrange(8)
        elif operation == "cut":
            del data[at:]
        elif operation == "splice":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif data:
            data[at:at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00",
                                          b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00"])
    return bytes(data)


@given(mutated_images())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_images_give_the_contract_or_a_typed_error(data):
    assert_contract_or_typed_error(data)


@pytest.fixture(scope="module", autouse=True)
def _quiet_pillow_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
