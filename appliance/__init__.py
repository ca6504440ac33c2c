"""appliance: a reliable local inference service that sells its idle capacity to a pool."""

__version__ = "0.1.0"
