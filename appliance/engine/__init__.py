"""Models on disk and in ONNX Runtime: repository, manifests, integrity, loaded sessions."""
