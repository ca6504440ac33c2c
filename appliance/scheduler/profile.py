"""Latency profile l(rows) of one model on one provider: robust least squares over a sliding window."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import numpy as np

_REFIT_EVERY = 16  # observations between refits; a fit over 256 points costs ~100 us of the event loop
_OUTLIER_MADS = 3.5  # residuals beyond this many scaled MADs are dropped before the refit
_MAD_TO_SIGMA = 1.4826
_NEVER_OUTLIER = 0.01  # a residual within 1% of its prediction is timing noise, never an outlier
_MIN_CURVE_SHARE = 0.01  # a square term worth less than 1% of the widest batch's time is noise
_NEAR_BEST = 0.98  # smaller batches within 2% of the best rate win: lower latency, finer preemption
# The p99 margin weighs each observation by its age: half its weight every MARGIN_HALF_LIFE_S. After
# a burst of noise ends (another process took the cores for 30 s), the noisy batches stop counting
# within seconds, whether or not new batches arrive to push them out of the window; a count-only
# window kept a model pessimistic for minutes, since pessimism refuses the very batches that would
# replace the noise. With 3 s and ~25 batches/s, 256 noisy batches weigh under 1% after ~24 s.
MARGIN_HALF_LIFE_S = 3.0
MARGIN_PRIOR_WEIGHT = 8.0  # 8 fresh observations at ratio 1.0 that never age: with no recent batches
# the margin returns to the fit, instead of keeping the last burst's
_MARGIN_REFRESH_S = 0.5  # between time-only refreshes of the margin (a weighted quantile, ~30 us)


class LatencyProfile:
    """Predicts how long a batch of `rows` rows takes: l(r) = intercept + per_row * r + per_row2 * r^2.

    Seeded from warm-up, refined from every batch. The square term (never negative) is there
    because big batches often cost more per row once their tensors leave the caches: the
    224x224 reference CNN takes 2.3 ms a row at 4 rows and 2.8 ms at 32 (bench/README.md), so
    the fastest batch is not the biggest. `expected_s` is the fitted mean; `bound_s` adds the
    high quantile of what the fit under-predicted, for deadlines and SLOs.
    """

    def __init__(
        self, window: int = 256, quantile: float = 0.99, margin_half_life_s: float = MARGIN_HALF_LIFE_S
    ) -> None:
        self._rows: deque[int] = deque(maxlen=window)
        self._seconds: deque[float] = deque(maxlen=window)
        self._at_s: deque[float] = deque(maxlen=window)  # when each was observed (the caller's clock)
        self._ratios = np.empty(0)  # of each kept observation to the fit, as of the last refit
        self._ratio_ages = np.empty(0)
        self._margin_s = 0.0  # clock time the margin was computed for
        self._half_life_s = margin_half_life_s
        self._quantile = quantile
        self._pending = 0
        self.intercept_s = 0.0
        self.per_row_s = 0.0
        self.per_row2_s = 0.0
        self._best_rows: dict[int, int] = {}
        self.margin_ratio = 1.0  # bound_s = expected_s * margin_ratio
        self.observations = 0
        self.fits = 0  # rises with every refit or margin change: what is derived may be cached until then

    @property
    def is_seeded(self) -> bool:
        return self.observations > 0

    def seed(self, observations: Iterable[tuple[int, float]], now_s: float = 0.0) -> None:
        for rows, seconds in observations:
            self._add(rows, seconds, now_s)
        self.refit(now_s)

    def observe(self, rows: int, seconds: float, now_s: float = 0.0) -> None:
        """One batch of `rows` rows that took `seconds`, observed at `now_s` (the scheduler's clock)."""
        self._add(rows, seconds, now_s)
        self._pending += 1
        if self._pending >= _REFIT_EVERY:
            self.refit(now_s)

    def refresh(self, now_s: float) -> None:
        """Let time age the margin (cheap: recomputed at most every 0.5 s of `now_s`)."""
        if now_s - self._margin_s >= _MARGIN_REFRESH_S and self._ratios.size:
            self._update_margin(now_s)

    def _add(self, rows: int, seconds: float, now_s: float) -> None:
        if rows > 0 and seconds > 0 and np.isfinite(seconds):
            self._rows.append(rows)
            self._seconds.append(seconds)
            self._at_s.append(now_s)
            self.observations += 1

    def expected_s(self, rows: int) -> float:
        return self.intercept_s + (self.per_row_s + self.per_row2_s * rows) * rows

    def best_rows(self, limit: int) -> int:
        """The batch size up to `limit` with the most rows per second (the smallest within 2% of it)."""
        if limit not in self._best_rows:
            if self.per_row2_s <= 0 or not self.is_seeded:
                self._best_rows[limit] = limit
            else:
                sizes = np.arange(1, limit + 1)
                rates = sizes / np.maximum(
                    self.intercept_s + (self.per_row_s + self.per_row2_s * sizes) * sizes, 1e-12
                )
                self._best_rows[limit] = int(sizes[np.argmax(rates >= _NEAR_BEST * rates.max())])
        return self._best_rows[limit]

    def bound_s(self, rows: int) -> float:
        return self.expected_s(rows) * self.margin_ratio

    def refit(self, now_s: float | None = None) -> None:
        self._pending = 0
        if not self._rows:
            return
        x = np.fromiter(self._rows, dtype=np.float64, count=len(self._rows))
        y = np.fromiter(self._seconds, dtype=np.float64, count=len(self._seconds))
        intercept, slope, curve = _robust_fit(x, y)
        self.intercept_s, self.per_row_s, self.per_row2_s = intercept, slope, curve
        self._best_rows.clear()
        predicted = intercept + (slope + curve * x) * x
        self._ratios = y / np.maximum(predicted, 1e-9)
        self._ratio_ages = np.fromiter(self._at_s, dtype=np.float64, count=len(self._at_s))
        self._update_margin(self._ratio_ages.max() if now_s is None else now_s)
        self.fits += 1

    def _update_margin(self, now_s: float) -> None:
        """The weighted `quantile` of the ratios, each weighing 2^(-age / half life), plus a prior at 1."""
        self._margin_s = now_s
        ages = np.maximum(now_s - self._ratio_ages, 0.0)
        weights = np.exp2(-ages / self._half_life_s)
        ratios = np.append(self._ratios, 1.0)
        weights = np.append(weights, MARGIN_PRIOR_WEIGHT)
        order = np.argsort(ratios)
        cumulative = np.cumsum(weights[order])
        at = int(np.searchsorted(cumulative, self._quantile * cumulative[-1]))
        margin = float(max(1.0, ratios[order][min(at, ratios.size - 1)]))
        if abs(margin - self.margin_ratio) > 0.01 * self.margin_ratio:
            self.fits += 1  # capacity derived from the old margin is stale
        self.margin_ratio = margin

    def as_dict(self) -> dict[str, float | int]:
        return {
            "intercept_ms": round(self.intercept_s * 1e3, 4),
            "per_row_ms": round(self.per_row_s * 1e3, 4),
            "per_row2_ms": round(self.per_row2_s * 1e3, 6),
            "p99_margin": round(self.margin_ratio, 3),
            "observations": self.observations,
        }


def _robust_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least squares with one round of outlier rejection; no negative term, a line if no curve."""
    if np.unique(x).size < 2:
        return 0.0, float(np.median(y / x)), 0.0  # one batch size seen: assume cost grows with rows
    coefficients = _fit(x, y)
    residuals = y - _predict(coefficients, x)
    scale = _MAD_TO_SIGMA * float(np.median(np.abs(residuals - np.median(residuals))))
    if scale > 0:
        # Without the floor, near-exact timings would let rounding noise (which differs by BLAS and
        # CPU) decide which points are outliers, and drop a batch size the curve needs.
        floor = _NEVER_OUTLIER * np.abs(_predict(coefficients, x))
        keep = np.abs(residuals) <= np.maximum(_OUTLIER_MADS * scale, floor)
        if np.unique(x[keep]).size >= 2:
            x, y = x[keep], y[keep]
            coefficients = _fit(x, y)
    intercept, slope, curve = coefficients
    if slope < 0 and curve == 0:
        return float(np.median(y)), 0.0, 0.0
    if intercept < 0 or slope < 0:
        return 0.0, float(np.median(y / x)), 0.0
    return intercept, slope, curve


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """A parabola where three batch sizes were seen and it bends upwards, else a line."""
    if np.unique(x).size >= 3:
        design = np.column_stack([np.ones_like(x), x, x * x])
        (intercept, slope, curve), *_ = np.linalg.lstsq(design, y, rcond=None)
        widest = float(x.max())
        bends = curve * widest * widest > _MIN_CURVE_SHARE * (intercept + (slope + curve * widest) * widest)
        if bends and intercept >= 0 and slope >= 0:
            return float(intercept), float(slope), float(curve)
    design = np.column_stack([np.ones_like(x), x])
    (intercept, slope), *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(intercept), float(slope), 0.0


def _predict(coefficients: tuple[float, float, float], x: np.ndarray) -> np.ndarray:
    intercept, slope, curve = coefficients
    return intercept + (slope + curve * x) * x
