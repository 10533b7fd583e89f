"""The service stays light: it never imports torch, torchvision or the training package."""

import json
import subprocess
import sys
from pathlib import Path

import service

SERVICE_DIR = Path(service.__file__).parent
# pandas is not listed: scikit-learn imports it when it happens to be installed, and the
# serve-only environment (tests/test_deploy.py) proves the service runs without it.
FORBIDDEN = ("torch", "torchvision", "training", "onnx", "matplotlib")
# The video extra's plot: matplotlib is imported there, inside the one function that draws.
OPTIONAL = {"video.py": ("matplotlib",)}


def test_importing_every_service_module_loads_nothing_heavy():
    modules = sorted(f"service.{p.stem}" for p in SERVICE_DIR.glob("*.py") if p.stem != "__init__")
    modules += sorted(f"service.{p.parent.name}.{p.stem}" for p in SERVICE_DIR.glob("*/*.py")
                      if p.stem != "__init__")
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    loaded = json.loads(subprocess.check_output([sys.executable, "-c", code]))
    heavy = sorted({m.split(".")[0] for m in loaded} & set(FORBIDDEN))
    assert heavy == [], f"service pulled in {heavy}"
    assert "service.preprocessing" in loaded


def test_service_source_names_no_training_import():
    for path in SERVICE_DIR.rglob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")):
                root = stripped.split()[1].split(".")[0]
                allowed = OPTIONAL.get(path.name, ()) if line != stripped else ()
                assert root not in FORBIDDEN or root in allowed, f"{path}: {stripped}"


def test_the_class_list_is_spelled_out_only_in_service_classes():
    root = SERVICE_DIR.parent
    offenders = []
    for folder in ("service", "training", "benchmarks"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            if path.name != "classes.py" and "SURPRISE" in text and "CONTEMPT" in text \
                    and "DISGUST" in text and "SADNESS" in text:
                offenders.append(str(path.relative_to(root)))
    assert offenders == [], offenders
