"""Accelerator providers: an explicit registry of ONNX Runtime execution providers and plugins."""
