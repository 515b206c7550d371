"""Scores of predicted probabilities, and temperature scaling (Guo et al., 2017).

A model's val_acc on a few hundred images has few levels and saturates; these say how much its
probabilities can be trusted: NLL (mean cross-entropy), the expected calibration error over 15
equal-width confidence bins, and the one-parameter temperature that makes val NLL lowest."""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, logsumexp

# The temperature is searched in this range: a val split with few errors would otherwise drive it
# towards 0 (infinitely confident), which no unseen image justifies.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.5, 20.0
# Val errors a temperature below 1 (sharper than trained) needs: fitted on one or two, it is noise
# that unseen images pay for with confident mistakes; softening needs no such evidence.
MIN_ERRORS_TO_SHARPEN = 3
ECE_BINS = 15


def log_probs(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def nll(log_p: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes, from log-probabilities."""
    return float(-log_p[np.arange(len(labels)), labels].mean())


def accuracy(log_p: np.ndarray, labels: np.ndarray) -> float:
    return float((log_p.argmax(1) == labels).mean())


def ece(log_p: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: |accuracy - confidence| per equal-width confidence bin,
    weighted by the bin's share of the images."""
    probs = np.exp(log_p)
    confidence, predicted = probs.max(1), probs.argmax(1)
    correct = predicted == labels
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T (logits / T) with the lowest NLL on these labelled logits. With fewer than
    `MIN_ERRORS_TO_SHARPEN` errors to measure by, T is never below 1 (a split all right would ask for
    ever more confidence): calibration then only softens."""
    result = minimize_scalar(
        lambda log_t: nll(log_probs(logits, float(np.exp(log_t))), labels),
        bounds=(np.log(MIN_TEMPERATURE), np.log(MAX_TEMPERATURE)), method="bounded", options={"xatol": 1e-4},
    )
    t = float(np.exp(result.x))
    errors = int((np.asarray(logits).argmax(1) != labels).sum())
    return t if errors >= MIN_ERRORS_TO_SHARPEN else max(t, 1.0)


def sharpest_nll(log_p: np.ndarray, labels: np.ndarray) -> float:
    """The lowest NLL that any temperature in [0.01, 100] gives these log-probabilities. On a split
    the model gets wholly right it is ~0: there, more confidence is all a lower NLL could show."""
    result = minimize_scalar(lambda log_t: nll(log_softmax(log_p / np.exp(log_t), axis=1), labels),
                             bounds=(np.log(0.01), np.log(100.0)), method="bounded", options={"xatol": 1e-3})
    return float(min(result.fun, nll(log_p, labels)))


def mixture(log_ps: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """log of the weighted mean of the members' probabilities (an ensemble's prediction)."""
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    return logsumexp(np.stack(log_ps) + np.log(w)[:, None, None], axis=0)


def scores(log_p: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"acc": accuracy(log_p, labels), "nll": nll(log_p, labels), "ece": ece(log_p, labels)}
