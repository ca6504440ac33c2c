"""Detection metrics in numpy: AUROC and the confusion counts at a decision threshold."""

import numpy as np


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula, ties counted half."""
    positive, negative = scores[labels == 1], scores[labels == 0]
    wins = (positive[:, None] > negative[None, :]).sum() + 0.5 * (
        positive[:, None] == negative[None, :]
    ).sum()
    return float(wins / (len(positive) * len(negative)))


def at_threshold(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, false-positive rate (ok parts rejected) and miss rate (defects passed) at `threshold`."""
    decided = scores >= threshold
    return {
        "accuracy": float((decided == (labels == 1)).mean()),
        "false_positive_rate": float(decided[labels == 0].mean()),
        "miss_rate": float((~decided[labels == 1]).mean()),
    }
