"""The one way the project opens an ONNX file, and the opset every network is exported at."""

from __future__ import annotations

ONNX_OPSET = 17  # the CNN and the face detector's networks


def onnx_session(data: bytes, threads: int):
    """An ONNX Runtime session on the CPU with ``threads`` intra-op threads (the worker's
    share of the container's CPUs; 0: ONNX Runtime's default), one operator at a time."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
