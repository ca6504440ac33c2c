"""The KServe v2 / Open Inference Protocol: pure codecs and documents, no web framework."""
