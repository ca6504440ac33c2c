"""Choosing K (worker threads sharing a session) at start-up: alternating slices, each layout's best."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from appliance.scheduler import instances


def _scripted(monkeypatch: pytest.MonkeyPatch, slices: dict[int, list[float]]) -> list[int]:
    """`measure` answers each layout (by K) with its next scripted rate; returns the order asked."""
    rates: dict[int, Iterator[float]] = {k: iter(v) for k, v in slices.items()}
    asked: list[int] = []

    def measure(model: object, count: int, budget_s: float = 1.0) -> float:
        asked.append(count)
        return next(rates[count])

    monkeypatch.setattr(instances, "measure", measure)
    return asked


def _load(threads: int) -> SimpleNamespace:
    return SimpleNamespace(name="m", threads=threads)


def test_a_busy_slice_at_start_up_does_not_pick_the_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two workers with a core each are faster (400 against 340 rows/s), but the box was busy during
    # their first slice: measured once each, one after the other, one worker with both cores won.
    asked = _scripted(monkeypatch, {1: [300.0, 340.0, 320.0, 330.0], 2: [250.0, 400.0, 380.0, 390.0]})
    model, count, trials = instances.choose(_load, cores=2)
    assert asked == [1, 2] * 4  # alternating, so that noise hits both alike; close, so twice as many
    assert count == 2 and model.threads == 1
    assert [(t.instances, t.threads_per_call, t.rows_per_s) for t in trials] == [(1, 2, 340.0), (2, 1, 400.0)]


def test_a_busy_spell_over_both_first_slices_is_looked_at_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # Both of the faster layout's first slices fell in a busy spell (310 against 340): close enough
    # to look again, and its later slices show it (400).
    asked = _scripted(monkeypatch, {1: [300.0, 340.0, 330.0, 335.0], 2: [250.0, 310.0, 400.0, 390.0]})
    _, count, trials = instances.choose(_load, cores=2)
    assert asked == [1, 2, 1, 2, 1, 2, 1, 2]
    assert count == 2 and [t.rows_per_s for t in trials] == [340.0, 400.0]


def test_layouts_far_apart_are_not_measured_again(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _scripted(monkeypatch, {1: [200.0, 210.0], 2: [390.0, 400.0]})
    _, count, _ = instances.choose(_load, cores=2)
    assert asked == [1, 2, 1, 2] and count == 2


def test_within_3_percent_more_instances_win(monkeypatch: pytest.MonkeyPatch) -> None:
    # Beside a busy neighbour the layouts measure close; on a quiet box two workers were 14-27% faster.
    _scripted(monkeypatch, {1: [400.0, 412.0, 380.0, 395.0], 2: [405.0, 401.0, 402.0, 399.0]})
    model, count, _ = instances.choose(_load, cores=2)
    assert count == 2 and model.threads == 1


def test_fewer_instances_win_by_more_than_3_percent(monkeypatch: pytest.MonkeyPatch) -> None:
    _scripted(monkeypatch, {1: [400.0, 420.0, 380.0, 395.0], 2: [405.0, 401.0, 402.0, 399.0]})
    model, count, _ = instances.choose(_load, cores=2)
    assert count == 1 and model.threads == 2


def test_four_cores_compare_each_layout_with_the_best_so_far(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _scripted(
        monkeypatch,
        {1: [300.0, 310.0], 2: [500.0, 480.0, 470.0, 490.0, 460.0, 480.0], 4: [450.0, 520.0, 500.0, 510.0]},
    )
    _, count, trials = instances.choose(_load, cores=4)
    assert asked == [1, 2, 1, 2] + [2, 4] * 4  # 1 vs 2 far apart; 2 vs 4 close: looked at again
    assert count == 4
    assert [t.rows_per_s for t in trials] == [310.0, 500.0, 520.0]


def test_one_core_measures_its_only_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    _scripted(monkeypatch, {1: [123.0]})
    _, count, trials = instances.choose(_load, cores=1)
    assert count == 1 and [t.rows_per_s for t in trials] == [123.0]
