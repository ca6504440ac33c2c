"""The admin socket's status reply follows its JSON Schema, in every state the service can be in."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import pytest

from appliance.system.admin import admin_request


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    text = resources.files("appliance.system.schemas").joinpath("status.schema.json").read_text()
    schema = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_status_follows_its_schema_ready_and_draining(server, validator) -> None:
    """The standard repository has READY and UNAVAILABLE models; both shapes must validate."""
    path = server.service.settings.system.admin_socket_path
    ready = admin_request(path, "status")
    validator.validate(ready)
    states = {m["state"] for m in ready["models"].values()}
    assert ready["state"] == "ready" and states == {"READY", "UNAVAILABLE"}
    assert ready["models"]["batchable"]["instances"] == 2  # K, the setting (tests/services.py)
    admin_request(path, "drain", {"timeout_s": 5})
    try:
        draining = admin_request(path, "status")
        validator.validate(draining)
        assert draining["state"] == "draining"
    finally:
        admin_request(path, "resume")


def test_the_schema_refuses_what_the_service_must_not_say(server, validator) -> None:
    """It pins the contract: a field the readers do not know, or K counted as threads, is an error."""
    status = admin_request(server.service.settings.system.admin_socket_path, "status")
    for broken in (
        {**status, "surprise": 1},
        {**status, "models": {"batchable": {**status["models"]["batchable"], "instances": 0}}},
        {**status, "models": {"corrupt": {**status["models"]["corrupt"], "version": "1"}}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(broken)
