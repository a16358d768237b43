"""Risk measures over Monte Carlo scenarios (MODEL.md §7): EL, standard deviation, VaR and
Expected Shortfall with batch-means standard errors and 95% intervals, and the tail
coefficients that Euler contributions and Hong-Liu sensitivities are built from.

Conventions
-----------
* Scenario ``s`` carries the loss ``L_s`` and a weight ``w_s >= 0`` (``1/S`` by default, or a
  likelihood ratio under importance sampling). The weights need not sum to one: every measure
  here is taken under the *normalised* probability measure ``p_s = w_s / sum(w)``, i.e. the
  self-normalised importance-sampling estimator. Scaling all weights by a constant changes
  nothing.
* ``VaR_a = inf{x : P(L <= x) >= a}`` on that weighted empirical distribution. The cumulative
  weights are compared with ``a`` with a relative tolerance of ``1e-12`` (``_PTOL``), so that
  floating-point rounding of the cumulative sum cannot move VaR by one order statistic (with
  S = 10 equal weights, ``0.1 * 8`` sums to ``0.7999999999999999`` and ``VaR_0.8`` must still be
  the 8th smallest loss). Probability gaps smaller than this are treated as rounding.
* ``ES_a = (1/(1-a)) [sum_{L>VaR} p L + (1 - a - sum_{L>VaR} p) VaR_a]`` (Acerbi-Tasche 2002),
  which is the integral of the quantile function over ``(a, 1)`` divided by ``1 - a``: correct
  with ties and with unequal weights, and coherent.

Pure NumPy (plus ``scipy.stats.t`` for the interval), no dependence on the rest of gpucredit.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "MIN_BATCHES",
    "RiskMeasures",
    "TailMeasures",
    "alpha_key",
    "risk_measures",
    "tail_coefficients",
    "var_es",
]

MIN_BATCHES = 32
"""The fewest batches `risk_measures` accepts for batch-means standard errors (MODEL.md §7)."""

_PTOL = 1e-12
"""Relative tolerance on cumulative probabilities (see the module docstring)."""


# --------------------------------------------------------------------------- validation


def _check_alpha(alpha: float) -> float:
    a = float(alpha)
    if not (0.0 < a < 1.0):
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    return a


def _prepare(losses, weights) -> tuple[np.ndarray, np.ndarray | None]:
    """Validated float64 1-D losses, and the weights (None for equal weights)."""
    L = np.asarray(losses, dtype=np.float64)
    if L.ndim != 1:
        raise ValueError(f"losses must be one-dimensional, got shape {L.shape}")
    if L.size == 0:
        raise ValueError("losses is empty")
    if not np.all(np.isfinite(L)):
        raise ValueError("losses must be finite")
    if weights is None:
        return L, None
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != L.shape:
        raise ValueError(f"weights has shape {w.shape}, losses has shape {L.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("weights must be finite")
    if np.any(w < 0.0):
        raise ValueError("weights must be non-negative")
    if not w.sum() > 0.0:
        raise ValueError("weights must have a positive sum")
    return L, w


# --------------------------------------------------------------------------- core


class _Sorted:
    """The losses sorted once (stable), with their weights and cumulative weights."""

    __slots__ = ("cw", "loss", "order", "total", "w", "wsum")

    def __init__(self, L: np.ndarray, w: np.ndarray | None, likelihood_ratios: bool = False):
        self.order = np.argsort(L, kind="stable")
        self.loss = L[self.order]
        if w is None:
            self.w = np.ones_like(self.loss)
        else:
            self.w = w[self.order]
        self.cw = np.cumsum(self.w)
        self.wsum = float(self.cw[-1])
        # p = w / total: self-normalised (total = Σw), or likelihood ratios (total = S).
        self.total = float(L.size) if likelihood_ratios else self.wsum

    def tail(self, alpha: float) -> tuple[float, int, int, float, float]:
        """VaR and the sorted positions ``[i0, j)`` of the ties at VaR (``[j, S)`` lie above),
        the normalised mass and loss-weighted sum above VaR, and the remaining mass
        ``1 - alpha - P(L > VaR)`` that sits on VaR (clamped at 0, rounding snapped to 0)."""
        n = self.loss.size
        # VaR: the smallest loss with P(L > VaR) <= 1 − α, the mass above counted from the top
        # (= the cumulative weight reaching α Σw when the weights are self-normalised).
        target = self.wsum - (1.0 - alpha) * self.total
        k = int(np.searchsorted(self.cw, target * (1.0 - _PTOL), side="left"))
        k = min(k, n - 1)
        var = float(self.loss[k])
        i0 = int(np.searchsorted(self.loss, var, side="left"))
        j = int(np.searchsorted(self.loss, var, side="right"))
        wt = self.w[j:]
        mass_above = float(wt.sum()) / self.total
        sum_above = float(wt @ self.loss[j:]) / self.total
        rem = (1.0 - alpha) - mass_above
        if mass_above > 0.0 and abs(rem) <= _PTOL * alpha:
            rem = 0.0  # the cumulative weight hit alpha up to rounding
        rem = max(rem, 0.0)
        return var, i0, j, sum_above, rem

    def var_es(self, alpha: float) -> tuple[float, float]:
        var, _, _, sum_above, rem = self.tail(alpha)
        es = (sum_above + rem * var) / (1.0 - alpha)
        return var, es


def var_es(
    losses, weights=None, alpha: float = 0.99, likelihood_ratios: bool = False
) -> tuple[float, float]:
    """``(VaR_alpha, ES_alpha)`` of the weighted empirical loss distribution.

    ``losses``: [S] finite. ``weights``: [S] non-negative with a positive sum, or None for
    ``1/S``; normalised by their sum (module docstring). ``alpha`` in (0, 1).
    VaR is the lower alpha-quantile (one of the losses); ES is Acerbi-Tasche, so
    ``ES >= VaR`` always, with equality when no mass lies above VaR.
    """
    L, w = _prepare(losses, weights)
    a = _check_alpha(alpha)
    return _Sorted(L, w, likelihood_ratios).var_es(a)


def tail_coefficients(
    losses, weights=None, alpha: float = 0.99, likelihood_ratios: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The scenarios that carry ``ES_alpha`` and their coefficients.

    Returns ``(indices, coefficients)``: ``indices`` int64, ascending, into ``losses``;
    ``coefficients`` float64 ``>= 0`` with ``ES_alpha = sum_j c_j L[indices[j]]`` and
    ``sum_j c_j = 1`` (to rounding). With ``p = w / sum(w)``:
    ``c_j = p_j / (1 - alpha)`` for ``L_j > VaR_alpha``, and the remaining mass
    ``(1 - alpha - P(L > VaR)) / (1 - alpha)`` is split over the scenarios with
    ``L_j == VaR_alpha`` in proportion to their weights. Scenarios whose coefficient is zero
    (zero weight, or ties at VaR when no mass remains for them) are left out.

    Euler contributions are ``ES_i = sum_j c_j L_{i, indices[j]}`` (so ``sum_i ES_i = ES``) and
    Hong-Liu sensitivities ``dES/dtheta = sum_j c_j dL_{indices[j]}/dtheta``, the tail set
    fixed by this forward pass (MODEL.md §7).
    """
    L, w = _prepare(losses, weights)
    a = _check_alpha(alpha)
    srt = _Sorted(L, w, likelihood_ratios)
    _, i0, j, _, rem = srt.tail(a)
    scale = 1.0 / (srt.total * (1.0 - a))
    c_above = srt.w[j:] * scale
    w_ties = srt.w[i0:j]
    w_tie_sum = float(w_ties.sum())
    if rem > 0.0 and w_tie_sum > 0.0:
        c_ties = w_ties * (rem / ((1.0 - a) * w_tie_sum))
    else:
        c_ties = np.zeros_like(w_ties)
    idx = srt.order[i0:]
    coef = np.concatenate([c_ties, c_above])
    keep = coef > 0.0
    idx, coef = idx[keep], coef[keep]
    by_index = np.argsort(idx, kind="stable")
    return idx[by_index].astype(np.int64), coef[by_index]


# --------------------------------------------------------------------------- reports


def alpha_key(alpha: float) -> str:
    """The string key of a confidence level in `RiskMeasures.to_dict`: ``0.99 -> "0.99"``
    (the shortest repr of the float)."""
    return repr(float(alpha))


def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


@dataclass(frozen=True)
class TailMeasures:
    """VaR and ES at one confidence level, each with its batch-means standard error and
    95% interval ``estimate +- t_{0.975, n_batches-1} * se``.

    ``tail_scenarios_per_batch = (S / n_batches) (1 - alpha)``: the expected number of
    scenarios beyond VaR in one batch. Below a few, the batch estimates are close to the batch
    maxima and the standard errors are unreliable (usually too small) though still reported.
    """

    alpha: float
    var: float
    var_se: float
    var_ci: tuple[float, float]
    es: float
    es_se: float
    es_ci: tuple[float, float]
    tail_scenarios_per_batch: float

    def to_dict(self) -> dict:
        return {
            "alpha": self.alpha,
            "var": _json_float(self.var),
            "var_se": _json_float(self.var_se),
            "var_ci": [_json_float(v) for v in self.var_ci],
            "es": _json_float(self.es),
            "es_se": _json_float(self.es_se),
            "es_ci": [_json_float(v) for v in self.es_ci],
            "tail_scenarios_per_batch": _json_float(self.tail_scenarios_per_batch),
        }


@dataclass(frozen=True)
class RiskMeasures:
    """The risk measures of one run (MODEL.md §7), made by `risk_measures`.

    ``el``: expected loss; ``el_se``: its batch-means standard error; ``el_se_iid``: the plain
    (delta-method) standard error of the self-normalised weighted mean,
    ``sqrt(S/(S-1) sum_s p_s^2 (L_s - EL)^2)``, which the batch-means one should agree with;
    ``el_ci``: ``el +- t * el_se``. ``std``: the standard deviation of the loss under the
    weighted empirical measure (no small-sample correction). ``tail``: one `TailMeasures` per
    confidence level, in the order asked. ``effective_sample_size``: Kish's
    ``(sum w)^2 / sum w^2`` (``S`` for equal weights). Standard errors are nan when some batch
    is empty (``S < n_batches``) or has zero total weight.
    """

    el: float
    el_se: float
    el_se_iid: float
    el_ci: tuple[float, float]
    std: float
    tail: tuple[TailMeasures, ...]
    n_scenarios: int
    effective_sample_size: float
    n_batches: int

    @property
    def alphas(self) -> tuple[float, ...]:
        return tuple(t.alpha for t in self.tail)

    def at(self, alpha: float) -> TailMeasures:
        """The `TailMeasures` at ``alpha`` (matched to a relative 1e-12); KeyError if absent."""
        a = float(alpha)
        for t in self.tail:
            if math.isclose(t.alpha, a, rel_tol=1e-12, abs_tol=0.0):
                return t
        raise KeyError(f"alpha {alpha!r} not computed; have {self.alphas}")

    def var(self, alpha: float) -> float:
        return self.at(alpha).var

    def es(self, alpha: float) -> float:
        return self.at(alpha).es

    def to_dict(self) -> dict:
        """JSON-ready (``json.dumps(..., allow_nan=False)`` works): non-finite numbers become
        None, intervals become two-element lists, and the per-level measures sit under
        ``"tail"`` keyed by `alpha_key` (``"0.99"``)."""
        return {
            "n_scenarios": int(self.n_scenarios),
            "effective_sample_size": _json_float(self.effective_sample_size),
            "n_batches": int(self.n_batches),
            "el": _json_float(self.el),
            "el_se": _json_float(self.el_se),
            "el_se_iid": _json_float(self.el_se_iid),
            "el_ci": [_json_float(v) for v in self.el_ci],
            "std": _json_float(self.std),
            "tail": {alpha_key(t.alpha): t.to_dict() for t in self.tail},
        }


def _batch_se(estimates: np.ndarray) -> float:
    if estimates.size < 2 or not np.all(np.isfinite(estimates)):
        return math.nan
    return float(np.std(estimates, ddof=1) / math.sqrt(estimates.size))


def risk_measures(
    losses,
    weights=None,
    alphas: Sequence[float] = (0.99, 0.999),
    n_batches: int = MIN_BATCHES,
    likelihood_ratios: bool = False,
) -> RiskMeasures:
    """EL, standard deviation, and VaR/ES at each ``alphas`` with Monte Carlo standard errors.

    Point estimates use the whole sample (`var_es`). Standard errors are batch means: the
    scenarios are split in index order into ``n_batches`` contiguous batches of near-equal
    size (``numpy.array_split``), each estimator is recomputed on each batch (its weights
    normalised within the batch), and ``se = std(batch estimates, ddof=1) / sqrt(n_batches)``.
    Intervals are ``estimate +- t_{0.975, n_batches-1} * se``. ``n_batches`` below 32 raises
    ValueError. Small samples never raise: the standard errors are nan when ``S < n_batches``
    (or a batch has zero weight), and unreliable when ``tail_scenarios_per_batch`` is below a
    few. Duplicate ``alphas`` are computed once.

    ``likelihood_ratios=True``: the weights are importance sampling's likelihood ratios
    (E[w] = 1 under the sampling measure) and ``p = w / S`` instead of ``w / Σw``: EL and the
    tail mass P(L > x) = Σ_{L>x} w / S are then unbiased, and the tail measures do not take
    on the noise of Σw, which the body's rare, heavy weights dominate (Glasserman,
    Heidelberger & Shahabuddin 2000).
    """
    L, w = _prepare(losses, weights)
    nb = operator.index(n_batches)
    if nb < MIN_BATCHES:
        raise ValueError(f"n_batches must be at least {MIN_BATCHES}, got {nb}")
    alist: list[float] = []
    for alpha in alphas:
        a = _check_alpha(alpha)
        if not any(math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0) for b in alist):
            alist.append(a)
    S = L.size

    # Full-sample point estimates.
    p = np.full(S, 1.0 / S) if w is None else w / (S if likelihood_ratios else w.sum())
    el = float(p @ L)
    if likelihood_ratios and w is not None:
        # EL = mean of w L (E[w] = 1): its variance is var(w L)/S; the loss's own variance
        # under the original measure is E_w[L²] − EL².
        std = math.sqrt(max(float(p @ (L * L)) - el * el, 0.0))
        wl = w * L
        el_se_iid = float(np.std(wl, ddof=1) / math.sqrt(S)) if S > 1 else math.nan
    else:
        dev = L - el
        std = math.sqrt(max(float(p @ (dev * dev)), 0.0))
        el_se_iid = math.sqrt(S / (S - 1) * float((p * p) @ (dev * dev))) if S > 1 else math.nan
    ess = float(S) if w is None else float(w.sum() ** 2 / (w @ w))
    srt = _Sorted(L, w, likelihood_ratios)
    points = [srt.var_es(a) for a in alist]

    # Batch means.
    el_b = np.full(nb, np.nan)
    var_b = np.full((len(alist), nb), np.nan)
    es_b = np.full((len(alist), nb), np.nan)
    if S >= nb:
        for b, idx in enumerate(np.array_split(np.arange(S), nb)):
            Lb = L[idx]
            wb = None if w is None else w[idx]
            if wb is not None and not wb.sum() > 0.0:
                continue
            mass = float(Lb.size if likelihood_ratios else wb.sum()) if wb is not None else 1
            el_b[b] = Lb.mean() if wb is None else float(wb @ Lb) / mass
            sb = _Sorted(Lb, wb, likelihood_ratios)
            for i, a in enumerate(alist):
                var_b[i, b], es_b[i, b] = sb.var_es(a)

    tq = float(stats.t.ppf(0.975, nb - 1))

    def ci(x: float, se: float) -> tuple[float, float]:
        return (x - tq * se, x + tq * se)

    el_se = _batch_se(el_b)
    tail = []
    for i, a in enumerate(alist):
        var, es = points[i]
        var_se = _batch_se(var_b[i])
        es_se = _batch_se(es_b[i])
        tail.append(
            TailMeasures(
                alpha=a,
                var=var,
                var_se=var_se,
                var_ci=ci(var, var_se),
                es=es,
                es_se=es_se,
                es_ci=ci(es, es_se),
                tail_scenarios_per_batch=S / nb * (1.0 - a),
            )
        )
    return RiskMeasures(
        el=el,
        el_se=el_se,
        el_se_iid=el_se_iid,
        el_ci=ci(el, el_se),
        std=std,
        tail=tuple(tail),
        n_scenarios=S,
        effective_sample_size=ess,
        n_batches=nb,
    )
