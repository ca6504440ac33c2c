"""`scheduler.instances = 0`: K (worker threads sharing one session) is measured at start-up, logged, and
is the K every report means; a model.toml `instances` is taken as it is."""

from __future__ import annotations

import logging

import httpx
import modelzoo

from appliance.scheduler.instances import candidates


def test_instances_0_measures_every_layout_at_start_up_and_keeps_the_fastest(serve, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, "appliance")
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable())
    with serve(repo, scheduler={"instances": 0}) as running:
        hub = running.service.hub
        entry = hub.entry("batchable")
        scheduler = entry.scheduler
        assert scheduler is not None
        with httpx.Client(base_url=running.url, timeout=60.0) as client:
            stats = client.get("/v2/models/batchable/stats").json()["model_stats"][0]
            capacity = client.get("/capacity").json()["models"]["batchable"]
            config = client.get("/v2/models/batchable/config").json()["appliance"]
    layouts = candidates(hub.cores)
    trials = entry.trials
    assert [(t.instances, t.threads_per_call) for t in trials] == layouts  # every layout was measured
    assert all(t.rows_per_s > 0 for t in trials)
    best = trials[0]
    for trial in trials[1:]:  # the rule (instances.choose): the fastest, ties within 3% to more instances
        if trial.rows_per_s * 1.03 >= best.rows_per_s:
            best = trial
    assert scheduler.instances == best.instances == capacity["instances"] == config["instances"]
    assert scheduler.model.threads_per_call == best.threads_per_call
    assert [t["instances"] for t in stats["instances"]] == [k for k, _ in layouts]
    measured = ", ".join(
        f"{t.instances}x{t.threads_per_call} threads: {t.rows_per_s:.0f} rows/s" for t in trials
    )
    assert f"model batchable: {best.instances} instance(s) chosen; measured {measured}" in caplog.text


def test_a_model_toml_instances_is_taken_as_it_is(serve, tmp_path) -> None:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable(), manifest="instances = 1\n")
    with serve(repo, scheduler={"instances": 0}) as running:
        entry = running.service.hub.entry("batchable")
        assert entry.trials == []  # nothing measured
        assert entry.scheduler is not None and entry.scheduler.instances == 1
        assert entry.scheduler.model.threads_per_call == running.service.hub.cores


def test_a_reload_keeps_the_measured_layout_instead_of_taking_the_cores_to_measure_again(
    serve, tmp_path, caplog
) -> None:
    """Measuring runs batches back to back on every core for seconds; during a reload the version still
    serving the line needs them, so the new version takes the serving one's worker count."""
    caplog.set_level(logging.INFO, "appliance")
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable())
    with serve(repo, scheduler={"instances": 0}) as running:
        hub = running.service.hub
        first = hub.entry("batchable")
        assert first.trials and first.scheduler is not None
        modelzoo.write(repo, "batchable", modelzoo.batchable(), version=2)
        with httpx.Client(base_url=running.url, timeout=60.0) as client:
            assert client.post("/v2/repository/models/batchable/load").json()["version"] == "2"
            stats = client.get("/v2/models/batchable/stats").json()["model_stats"][0]
        second = hub.entry("batchable")
        assert second.scheduler is not None and second.scheduler is not first.scheduler
    assert caplog.text.count("instance(s) chosen; measured") == 1  # at start-up only
    assert second.scheduler.instances == first.scheduler.instances
    assert second.scheduler.model.threads_per_call == first.scheduler.model.threads_per_call
    assert second.trials == first.trials  # what the layout was chosen on, still reported
    assert [t["instances"] for t in stats["instances"]] == [t.instances for t in first.trials]
