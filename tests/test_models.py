"""The shipped artifacts, and the export path that makes them."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from service.classes import CLASS_NAMES
from service.manifest import load_manifest, sha256_bytes
from service.models import SklearnClassifier
from service.preprocessing import INPUT_SIZE, PREPROCESSING_VERSION
from service.settings import REPO_MODELS_DIR
from training.evaluate import classification_metrics

pytestmark = pytest.mark.dataset


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(REPO_MODELS_DIR)


@pytest.fixture(scope="module")
def workspace(data_settings):
    from training.reproduce import Workspace

    return Workspace(data_settings, "full")


def test_manifest_describes_the_files(manifest):
    assert set(manifest.models) == {"cnn", "knn"}
    limits = {"cnn": 20e6, "knn": 25e6}
    for name, entry in manifest.models.items():
        data = (REPO_MODELS_DIR / entry.file).read_bytes()
        assert sha256_bytes(data) == entry.sha256 and len(data) == entry.bytes
        assert entry.bytes <= limits[name]
        assert entry.classes == list(CLASS_NAMES)
        assert entry.preprocessing_version == PREPROCESSING_VERSION
        assert entry.data.commit == "5fb9c13afac07c55eae8d25eb6b50af344ad60c9"
        assert {"val", "test"} <= set(entry.metrics["identity"])


def test_onnx_contract(manifest):
    path = REPO_MODELS_DIR / manifest.models["cnn"].file
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    session = ort.InferenceSession(str(path))
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("image", "tensor(float)", [1, 350, 350])
    assert isinstance(inp.shape[0], str)  # dynamic batch
    assert (out.name, out.shape[1]) == ("probabilities", 8)
    for n in (1, 5):
        probs = session.run(None, {"image": np.random.rand(n, 1, 350, 350).astype(np.float32)})[0]
        assert probs.shape == (n, 8) and np.allclose(probs.sum(1), 1, atol=1e-5)


@pytest.mark.slow
def test_shipped_onnx_reproduces_the_manifest_test_macro_f1(manifest, workspace):
    from training.export import onnx_probabilities

    test = workspace.subsets("identity")["test"]
    probs = onnx_probabilities(REPO_MODELS_DIR / manifest.models["cnn"].file, workspace,
                               test.names)
    measured = classification_metrics(test.labels, probs.argmax(1))["macro_f1"]
    assert measured == pytest.approx(manifest.models["cnn"].metrics["identity"]["test"].macro_f1,
                                     abs=0.005)


@pytest.mark.slow
def test_shipped_knn_reproduces_its_metrics_through_the_service_loader(manifest, workspace):
    entry = manifest.models["knn"]
    classifier = SklearnClassifier((REPO_MODELS_DIR / entry.file).read_bytes())
    assert list(classifier.pipeline.classes_) == list(range(8))
    test = workspace.subsets("identity")["test"]
    rows = workspace.decoded.rows_of(test.names)
    predicted = np.concatenate([
        classifier.predict_proba(workspace.decoded.inputs(rows[i:i + 256])).argmax(1)
        for i in range(0, len(rows), 256)])
    measured = classification_metrics(test.labels, predicted)["macro_f1"]
    assert measured == pytest.approx(entry.metrics["identity"]["test"].macro_f1, abs=0.005)


@pytest.mark.slow
def test_export_path_onnx_matches_pytorch_on_real_images(data_settings, tmp_path):
    """Train one smoke epoch, export, and compare ONNX Runtime with PyTorch."""
    from training.export import export_onnx, max_parity_error
    from training.reproduce import Workspace
    from training.ship import load_checkpoint, train_shipped

    train_shipped(data_settings, profile="smoke", seeds=(0,), out_dir=tmp_path)
    checkpoint = load_checkpoint(tmp_path / "identity-seed0.pt")
    path = tmp_path / "model.onnx"
    wrapped = export_onnx(checkpoint, path)
    ws = Workspace(data_settings, "smoke")
    names = ws.subsets("identity")["test"].names[:24]
    assert max_parity_error(wrapped, path, ws, names) <= 1e-4
    # The flip inside the exported model is the same as flipping the input.
    x = torch.rand(1, 1, INPUT_SIZE, INPUT_SIZE)
    with torch.no_grad():
        assert torch.allclose(wrapped(x), wrapped(torch.flip(x, dims=[3])), atol=1e-5)


def test_model_card_describes_the_shipped_face_detector(tmp_path):
    from service.faces import load_face_crop
    from training.model_card import face_detector_note

    spec = load_face_crop(REPO_MODELS_DIR)
    note = "\n".join(face_detector_note(REPO_MODELS_DIR))
    for network in spec.detector.networks.values():
        assert f"`{network.file}`" in note
    test = spec.evaluation["test"]
    assert f"| test | {test['none']['macro_f1']:.3f} | {test['auto']['macro_f1']:.3f} |" in note
    assert face_detector_note(tmp_path) == []  # no face_crop.json: no section
