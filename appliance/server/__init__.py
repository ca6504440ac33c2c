"""The local HTTP API: KServe v2 / Open Inference Protocol routes, Triton extensions, metrics."""
