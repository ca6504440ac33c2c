"""The data plane: one request path and one error table for every transport (HTTP, MQTT jobs)."""
