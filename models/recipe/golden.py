"""Golden samples: run a model file with ONNX Runtime on CPU and write <version>/samples.npz.

Needs numpy and onnxruntime only (no torch), so recipes that only rewrite a shipped graph can use it.
"""

from pathlib import Path

import numpy as np
import onnxruntime as ort

INPUT = "image"
OUTPUTS = ("defect_prob", "defect_map")


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(path: Path, images: np.ndarray, batch_size: int = 16) -> dict[str, np.ndarray]:
    """All outputs for all images, by ONNX Runtime on CPU."""
    served = session(path, threads=2)
    parts = [
        served.run(list(OUTPUTS), {INPUT: images[i : i + batch_size]})
        for i in range(0, len(images), batch_size)
    ]
    return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(OUTPUTS)}


def write_samples(model_path: Path, images: np.ndarray) -> Path:
    """<version>/samples.npz: input__image and output__<name>, computed on the file as shipped."""
    outputs = run(model_path, images)
    samples = model_path.parent / "samples.npz"
    np.savez_compressed(
        samples, **{f"input__{INPUT}": images}, **{f"output__{k}": v for k, v in outputs.items()}
    )
    return samples
