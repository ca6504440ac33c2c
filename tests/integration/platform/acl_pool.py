"""A broker with the README's ACL for the gateway tests: the platform and nodes `honest` and `evil`,
each allowed only its own topics (tests/integration/pool/test_pool_acl.py's recipe)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from pool_brokers import Broker, default_kind
from pool_recorder import Names
from test_pool_acl import acl_recipe

PASSWORDS = {"platform": "pl4tform-pw", "honest": "h0nest-pw", "evil": "ev1l-pw"}


def login(user: str) -> dict[str, str]:
    return {"username": user, "password": PASSWORDS[user]}


@pytest.fixture
def acl_broker(broker_factory: Callable[..., Broker], names: Names) -> Broker:
    """mosquitto with the README's ACL: the platform, and nodes `honest` and `evil` as themselves."""
    if default_kind() != "mosquitto":
        pytest.skip("the ACL recipe is for mosquitto, which is not installed (or POOL_TEST_BROKER is set)")
    recipe = acl_recipe(dataclasses.replace(names, node="honest"), "evil")
    return broker_factory(users=PASSWORDS, acl=recipe)
