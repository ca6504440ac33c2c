"""Latency profile l(rows) of one model on one provider: robust least squares over a sliding window."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import numpy as np

_REFIT_EVERY = 4  # observations between refits; a fit over 256 points costs ~30 us
_OUTLIER_MADS = 3.5  # residuals beyond this many scaled MADs are dropped before the refit
_MAD_TO_SIGMA = 1.4826


class LatencyProfile:
    """Predicts how long a batch of `rows` rows takes: l(rows) = intercept + per_row * rows.

    Seeded from warm-up, refined from every batch. `expected_s` is the fitted mean;
    `bound_s` adds the high quantile of what the fit under-predicted, for deadlines and SLOs.
    """

    def __init__(self, window: int = 256, quantile: float = 0.99) -> None:
        self._rows: deque[int] = deque(maxlen=window)
        self._seconds: deque[float] = deque(maxlen=window)
        self._quantile = quantile
        self._pending = 0
        self.intercept_s = 0.0
        self.per_row_s = 0.0
        self.margin_ratio = 1.0  # bound_s = expected_s * margin_ratio
        self.observations = 0

    @property
    def is_seeded(self) -> bool:
        return self.observations > 0

    def seed(self, observations: Iterable[tuple[int, float]]) -> None:
        for rows, seconds in observations:
            self._add(rows, seconds)
        self.refit()

    def observe(self, rows: int, seconds: float) -> None:
        self._add(rows, seconds)
        self._pending += 1
        if self._pending >= _REFIT_EVERY:
            self.refit()

    def _add(self, rows: int, seconds: float) -> None:
        if rows > 0 and seconds > 0 and np.isfinite(seconds):
            self._rows.append(rows)
            self._seconds.append(seconds)
            self.observations += 1

    def expected_s(self, rows: int) -> float:
        return self.intercept_s + self.per_row_s * rows

    def bound_s(self, rows: int) -> float:
        return self.expected_s(rows) * self.margin_ratio

    def refit(self) -> None:
        self._pending = 0
        if not self._rows:
            return
        x = np.fromiter(self._rows, dtype=np.float64, count=len(self._rows))
        y = np.fromiter(self._seconds, dtype=np.float64, count=len(self._seconds))
        intercept, slope = _robust_line(x, y)
        self.intercept_s, self.per_row_s = intercept, slope
        predicted = intercept + slope * x
        ratios = y / np.maximum(predicted, 1e-9)
        self.margin_ratio = float(max(1.0, np.quantile(ratios, self._quantile)))

    def as_dict(self) -> dict[str, float | int]:
        return {
            "intercept_ms": round(self.intercept_s * 1e3, 4),
            "per_row_ms": round(self.per_row_s * 1e3, 4),
            "p99_margin": round(self.margin_ratio, 3),
            "observations": self.observations,
        }


def _robust_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares with one round of outlier rejection; never a negative slope or intercept."""
    if np.unique(x).size < 2:
        return 0.0, float(np.median(y / x))  # one batch size seen: assume cost grows with rows
    intercept, slope = _fit(x, y)
    residuals = y - (intercept + slope * x)
    scale = _MAD_TO_SIGMA * float(np.median(np.abs(residuals - np.median(residuals))))
    if scale > 0:
        keep = np.abs(residuals) <= _OUTLIER_MADS * scale
        if np.unique(x[keep]).size >= 2:
            intercept, slope = _fit(x[keep], y[keep])
    if slope < 0:
        return float(np.median(y)), 0.0
    if intercept < 0:
        return 0.0, float(np.median(y / x))
    return intercept, slope


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    design = np.column_stack([np.ones_like(x), x])
    (intercept, slope), *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(intercept), float(slope)
