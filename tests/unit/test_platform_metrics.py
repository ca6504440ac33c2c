"""The gateway's /metrics: model labels only for names it serves, at most max_models; the page is kept."""

from __future__ import annotations

from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.platform.catalogue import Catalogue, Entry
from appliance.platform.metrics import GatewayMetrics
from appliance.platform.view import NodeView, PoolView
from appliance.pool import signing

ROOT = "ecp/v1"
OTHER = "_other"  # metrics.OTHER: every name without a label of its own
KEY = signing.public_key_text(Ed25519PrivateKey.generate())


def offers(view: PoolView, node: str, names: list[str], seq: int = 0, *, is_trusted: bool = True) -> NodeView:
    """`node` born and reporting capacity for `names` (its earlier names dropped), its key pinned or not."""
    models = {name: {"sha256": "a" * 64} for name in names}
    birth = {"session": 1, "seq": seq, "public_key": KEY, "models": models}
    view.ingest(f"{ROOT}/s/{node}/birth", orjson.dumps(birth), 0.0)
    report = {"spare_ips_at_slo": 0.0, "accepts_pool_jobs": True, "max_ips_at_slo": 10.0}
    capacity = {"session": 1, "seq": seq, "valid_for_s": 60, "models": dict.fromkeys(names, report)}
    found = view.ingest(f"{ROOT}/s/{node}/capacity", orjson.dumps(capacity), 0.0)
    assert found is not None
    found.trusted_key = KEY if is_trusted else None
    return found


def series(page: bytes, family: str = "appliance_gateway_jobs_total") -> set[str]:
    """The model labels of a family's series on the page."""
    found = set()
    for line in page.decode().splitlines():
        if line.startswith(family + "{"):
            found.add(line.split('model="', 1)[1].split('"', 1)[0])
    return found


def metrics(view: PoolView, **options: Any) -> GatewayMetrics:
    return GatewayMetrics(view, dict, **options)


def test_only_names_a_node_in_good_standing_offers_get_a_label() -> None:
    view = PoolView(ROOT, needs_key=True)
    offers(view, "good", ["resnet"])
    offers(view, "unpinned", ["junk-a"], is_trusted=False)
    quarantined = offers(view, "bad", ["junk-b"])
    quarantined.quarantine = "canary failed"
    counted = metrics(view)
    for model in ("resnet", "junk-a", "junk-b", "never-offered"):
        counted.job(model, "answered")
        counted.answered(model, 0.01)
    page = counted.exposition()
    assert series(page) == {"resnet", OTHER}
    assert series(page, "appliance_gateway_job_seconds_count") == {"resnet", OTHER}
    assert counted.jobs[(OTHER, "answered")] == 3


def test_with_a_catalogue_only_its_names_get_a_label() -> None:
    view = PoolView(ROOT, needs_key=True)
    offers(view, "good", ["resnet", "offered-but-not-listed"])
    counted = metrics(view, catalogue=Catalogue({"resnet": Entry("resnet", frozenset({"a" * 64}))}))
    for model in ("resnet", "offered-but-not-listed", "listed-nowhere"):
        counted.job(model, "no_capacity")
    assert series(counted.exposition()) == {"resnet", OTHER}


def test_a_node_renaming_its_models_cannot_grow_the_page_without_bound() -> None:
    view = PoolView(ROOT, needs_key=True)
    now = [0.0]
    counted = metrics(view, max_models=20, clock=lambda: now[0])
    offers(view, "steady", ["resnet"])
    counted.job("resnet", "answered")
    for round_ in range(4):  # each round 100 new names, the previous ones dropped
        names = [f"r{round_}-{index:04d}" for index in range(100)]
        offers(view, "renamer", names, seq=round_ + 1)
        for name in names:
            counted.job(name, "no_capacity")
        now[0] += 3600.0  # past the kept page and any name remembered as not served
        labels = series(counted.exposition())
        assert len(labels) <= 20 + 1 and "resnet" in labels and OTHER in labels
    # The names of the earlier rounds gave their labels up, their counts now under OTHER.
    assert not any(label.startswith(("r0-", "r1-", "r2-")) for label in labels)
    assert sum(count for (_, outcome), count in counted.jobs.items() if outcome == "no_capacity") == 400


def test_the_page_is_kept_for_keep_factor_times_what_building_it_took() -> None:
    view = PoolView(ROOT, needs_key=True)
    offers(view, "good", ["resnet"])
    now, built = [100.0], [0]

    def gauges() -> dict[str, float]:
        built[0] += 1
        now[0] += 0.5  # building the page takes 0.5 s of the loop (on the test's clock)
        return {"jobs_in_flight": 0.0}

    counted = GatewayMetrics(view, gauges, clock=lambda: now[0])
    first = counted.exposition()
    counted.job("resnet", "answered")
    now[0] += 9.0  # within 20 times 0.5 s of the last build
    assert counted.exposition() is first and built[0] == 1
    now[0] += 2.0
    assert b'model="resnet"' in counted.exposition() and built[0] == 2
