# The service only: the `serve` extra (FastAPI, ONNX Runtime, scikit-learn), no torch.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY service ./service
# No test suites, no pip and no setuptools (the venv's own, unused at run time and flagged
# by scanners) in the image; the room goes to the bytecode a worker needs.
RUN /opt/venv/bin/pip install --no-compile ".[serve]" \
    && find /opt/venv -depth -type d \( -name tests -o -name test \) -exec rm -rf {} + \
    && /opt/venv/bin/python -m pip uninstall --yes --quiet setuptools pip

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 app
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY models/emotion_cnn.onnx models/emotion_knn.joblib models/manifest.json \
     models/face_crop.json models/face_pnet.onnx models/face_rnet.onnx models/face_onet.onnx \
     ./models/
COPY examples/*.jpg ./examples/
# Site-packages and the standard library are read-only at run time: compile what a worker
# imports, by doing once what it does (all of site-packages compiled would pass the install's
# size budget). In this stage, since the base image ships the standard library without its
# bytecode: compiled in the build stage, it stayed there. -P: the installed service only.
RUN EMOTION_MODELS_DIR=/app/models /opt/venv/bin/python -P -m service.warmup
# XDG_CACHE_HOME: ONNX Runtime keeps an id there, and under a read-only root filesystem (as
# deploy/ runs it) only /tmp is writable; in the home it warned at every worker's start.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    EMOTION_MODELS_DIR=/app/models \
    EMOTION_EXAMPLES_DIR=/app/examples \
    EMOTION_HOST=0.0.0.0 \
    EMOTION_PORT=8000 \
    XDG_CACHE_HOME=/tmp/.cache
USER 10001
EXPOSE 8000
# Probes the port the launcher listens on: set it with EMOTION_PORT, not --port; and on
# 127.0.0.1, which an EMOTION_HOST other than 0.0.0.0 must include.
HEALTHCHECK --interval=30s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as u; sys.exit(u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/healthz' % os.environ.get('EMOTION_PORT', '8000'), timeout=2).status != 200)"]
# The launcher is the entrypoint, so a Kubernetes `args:` replaces only the options.
ENTRYPOINT ["python", "-m", "service"]
CMD []
