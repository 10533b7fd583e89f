"""``python -m service.warmup``: do once what a worker and the command line do, so that the
image's build writes the bytecode of the modules they import.

At run time the image's site-packages are read-only and owned by root, so without this every
worker, and every ``emotion-detect``, compiled its imports from source at each start;
compiling all of site-packages instead would put the serve install over its size budget.
"""

from __future__ import annotations

import io
import sys
from typing import get_args

from PIL import Image


def main() -> int:
    import uvicorn
    from starlette.testclient import TestClient

    import service.cli  # noqa: F401
    from service.__main__ import SERVER_OPTIONS  # the launcher
    from service.app import create_app
    from service.settings import ModelName, load_settings

    config = uvicorn.Config("service.main:app", **SERVER_OPTIONS)
    config.load()  # its protocol and lifespan modules
    # the event loop's modules (uvloop), which load() leaves to the server; before 0.36,
    # setup_event_loop imported them
    (getattr(config, "get_loop_factory", None) or config.setup_event_loop)()
    buffer = io.BytesIO()
    Image.new("RGB", (400, 300), (128, 128, 128)).save(buffer, "JPEG")
    with TestClient(create_app(load_settings())) as client:
        for model in get_args(ModelName):
            for faces in ("none", "auto"):
                response = client.post("/predict", params={"model": model, "faces": faces},
                                       files={"file": ("warm.jpg", buffer.getvalue())})
                if response.status_code != 200:
                    print(f"warm-up: /predict {model} {faces}: {response.status_code} "
                          f"{response.text[:200]}", file=sys.stderr)
                    return 1
        client.get("/metrics", headers={"accept": "text/plain"})
        for path in ("/", "/static/app.js", "/docs"):  # files are read through anyio
            client.get(path)
    # Every format's plugin, which Pillow loads all at once for the first upload that is
    # not JPEG, PNG, GIF or BMP (about 150 ms per worker at each start, compiled from source),
    # and the modules the launcher's and the command line's worker processes start with.
    Image.init()
    import multiprocessing.forkserver  # noqa: F401
    import multiprocessing.popen_fork  # noqa: F401
    import multiprocessing.popen_forkserver  # noqa: F401
    import multiprocessing.popen_spawn_posix  # noqa: F401
    return 0


if __name__ == "__main__":
    sys.exit(main())
