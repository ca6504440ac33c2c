"""Fixtures of the gateway tests: the pool tests' real mosquitto per test and unique topic names."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

POOL_TESTS = Path(__file__).resolve().parent.parent / "pool"
sys.path.insert(0, str(POOL_TESTS))

_spec = importlib.util.spec_from_file_location("pool_fixtures", POOL_TESTS / "conftest.py")
assert _spec is not None and _spec.loader is not None
_pool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_pool)

broker_factory = _pool.broker_factory
broker = _pool.broker
names = _pool.names
pool_repository = _pool.pool_repository
recorder_factory = _pool.recorder_factory

_acl = importlib.import_module("acl_pool")  # after the pool tests' folder is on sys.path
acl_broker = _acl.acl_broker
