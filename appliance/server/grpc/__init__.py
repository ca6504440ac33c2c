"""KServe v2 over gRPC (Triton's inference.GRPCInferenceService) on the data plane, with grpcio asyncio."""
