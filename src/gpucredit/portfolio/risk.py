"""Risk measures over Monte Carlo scenarios (docs/spec.md §7): EL, standard deviation, VaR and
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

Partial tails
-------------
With equal weights, VaR, ES and the tail coefficients depend only on the largest losses and the
number of scenarios S. A `LossTail` holds every loss at or above the k-th largest (ties kept)
with k = `tail_size(S, alphas)`; `var_es` and `tail_coefficients` evaluate it with
``n_scenarios=S``, the S − k others counting as one mass below all of it, and give exactly what
they give on all S losses. `risk_measures` itself works this way (its tail is the top k of the
losses it is given), and `risk_measures_from_tail` builds the same `RiskMeasures` from a tail
and per-batch `BatchStatistics` alone: that is pass 1's tails-only mode, where no process ever
holds every loss. There each batch keeps its expected share of the top k with a margin
(`batch_tail_size`), `short_tails` finds a batch that held more (to be taken again down to a
floor) and `merge_tails` joins the batches' tails into exactly the run's top k.

Pure NumPy (plus ``scipy.stats.t`` for the interval), no dependence on the rest of gpucredit.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "HISTOGRAM_BINS",
    "MAX_BATCH_SCENARIOS",
    "MIN_BATCHES",
    "SUMMARY_FORMAT_VERSION",
    "BatchStatistics",
    "LossHistogram",
    "LossTail",
    "RiskMeasures",
    "TailMeasures",
    "alpha_key",
    "alpha_label",
    "alpha_of_label",
    "batch_bounds",
    "batch_count",
    "batch_statistics",
    "batch_tail_size",
    "largest_losses",
    "merge_tails",
    "risk_measures",
    "risk_measures_from_tail",
    "short_tails",
    "tail_coefficients",
    "tail_sets",
    "tail_size",
    "var_es",
]

MIN_TAIL_SCENARIOS_PER_BATCH = 3.0
"""Fewest scenarios at or beyond VaR per batch for which a VaR/ES interval is reported. On a
one-factor (Vasicek) loss, 95% intervals from 32 batches covered the true value in 93-97% of
seeds from 2.5 tail scenarios a batch up, but in 84-90% at 1 and 30-78% at 0.06-0.25
(tests/portfolio/test_risk.py measures it)."""

MIN_BATCHES = 32
"""The fewest batches `risk_measures` accepts for batch-means standard errors (docs/spec.md §7)."""

MAX_BATCH_SCENARIOS = 2**22
"""The largest batch `batch_count` plans: a run beyond 32 × 2^22 (134 million) scenarios gets
more than 32 batches, so that one batch (one pass-1 task in tails-only mode) stays 32 MB of
losses and a bounded amount of work."""

HISTOGRAM_BINS = 4096
"""Bins of a `LossHistogram`."""

_PTOL = 1e-12
"""Relative tolerance on cumulative probabilities (see the module docstring)."""


# --------------------------------------------------------------------------- validation


def _check_alpha(alpha: float) -> float:
    a = float(alpha)
    if not (0.0 < a < 1.0):
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    return a


def _unique_alphas(alphas: Sequence[float]) -> tuple[float, ...]:
    """The confidence levels, checked, in the order given, duplicates (to 1e-12) dropped."""
    out: list[float] = []
    for alpha in alphas:
        a = _check_alpha(alpha)
        if not any(math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0) for b in out):
            out.append(a)
    return tuple(out)


def _check_n_scenarios(n_scenarios, L: np.ndarray, w) -> int | None:
    if n_scenarios is None:
        return None
    n = operator.index(n_scenarios)
    if w is not None:
        raise ValueError("n_scenarios (a partial tail) needs equal weights")
    if n < L.size:
        raise ValueError(f"n_scenarios = {n} is below the {L.size} losses given")
    return n


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
    """The losses sorted once (stable), with their weights and cumulative weights.

    `n_scenarios` (equal weights only): the losses are the largest of that many scenarios (a
    `LossTail`); the others count as one mass below all of them, which leaves the cumulative
    weight of every loss at or above the k-th largest exactly as in the whole sample.
    """

    __slots__ = ("below", "cw", "loss", "order", "total", "w", "wsum")

    def __init__(
        self,
        L: np.ndarray,
        w: np.ndarray | None,
        likelihood_ratios: bool = False,
        n_scenarios: int | None = None,
    ):
        self.order = np.argsort(L, kind="stable")
        self.loss = L[self.order]
        if w is None:
            self.w = np.ones_like(self.loss)
        else:
            self.w = w[self.order]
        self.below = 0.0 if n_scenarios is None else float(n_scenarios - L.size)
        self.cw = np.cumsum(self.w) + self.below
        self.wsum = float(self.cw[-1])
        # p = w / total: self-normalised (total = Σw), or likelihood ratios (total = S).
        self.total = float(L.size) + self.below if likelihood_ratios else self.wsum

    def tail(self, alpha: float) -> tuple[float, int, int, float, float]:
        """VaR and the sorted positions ``[i0, j)`` of the ties at VaR (``[j, S)`` lie above),
        the normalised mass and loss-weighted sum above VaR, and the remaining mass
        ``1 - alpha - P(L > VaR)`` that sits on VaR (clamped at 0, rounding snapped to 0)."""
        n = self.loss.size
        # VaR: the smallest loss with P(L > VaR) <= 1 − α, the mass above counted from the top
        # (= the cumulative weight reaching α Σw when the weights are self-normalised).
        target = (self.wsum - (1.0 - alpha) * self.total) * (1.0 - _PTOL)
        if self.below and target <= self.below:
            raise ValueError(
                f"a tail of {n} losses out of {self.below + n:.0f} scenarios is too short for "
                f"alpha = {alpha}: VaR lies below it"
            )
        k = int(np.searchsorted(self.cw, target, side="left"))
        k = min(k, n - 1)
        var = float(self.loss[k])
        i0 = int(np.searchsorted(self.loss, var, side="left"))
        j = int(np.searchsorted(self.loss, var, side="right"))
        wt = self.w[j:]
        # np.sum (pairwise, fixed order), not a BLAS dot whose order may depend on threads:
        # the same losses give the same ES in every process.
        mass_above = float(np.sum(wt)) / self.total
        sum_above = float(np.sum(wt * self.loss[j:])) / self.total
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
    losses,
    weights=None,
    alpha: float = 0.99,
    likelihood_ratios: bool = False,
    n_scenarios: int | None = None,
) -> tuple[float, float]:
    """``(VaR_alpha, ES_alpha)`` of the weighted empirical loss distribution.

    ``losses``: [S] finite. ``weights``: [S] non-negative with a positive sum, or None for
    ``1/S``; normalised by their sum (module docstring). ``alpha`` in (0, 1).
    VaR is the lower alpha-quantile (one of the losses); ES is Acerbi-Tasche, so
    ``ES >= VaR`` always, with equality when no mass lies above VaR.
    ``n_scenarios`` (equal weights): ``losses`` are only the largest of that many scenarios,
    every loss at or above VaR among them (a `LossTail`; module docstring).
    """
    L, w = _prepare(losses, weights)
    a = _check_alpha(alpha)
    n = _check_n_scenarios(n_scenarios, L, w)
    return _Sorted(L, w, likelihood_ratios, n).var_es(a)


def tail_coefficients(
    losses,
    weights=None,
    alpha: float = 0.99,
    likelihood_ratios: bool = False,
    n_scenarios: int | None = None,
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
    fixed by this forward pass (docs/spec.md §7). ``n_scenarios``: as in `var_es` (the indices
    are then positions in ``losses``).
    """
    L, w = _prepare(losses, weights)
    a = _check_alpha(alpha)
    srt = _Sorted(L, w, likelihood_ratios, _check_n_scenarios(n_scenarios, L, w))
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


SUMMARY_FORMAT_VERSION = 2
"""The layout of summary.json (its "format_version"; src/gpucredit/data/summary.schema.json
describes it). 2: every money key ends in _usd and every share in _share, tail measures keyed
by `alpha_label` ("99", "99_9"), whole counts as integers. Here, not in the engine, so that
the report reads it without importing the engine."""


def alpha_key(alpha: float) -> str:
    """The string key of a confidence level in the run's in-memory dicts (contributions,
    sensitivities, tail sets): ``0.99 -> "0.99"`` (the shortest repr of the float)."""
    return repr(float(alpha))


def alpha_label(alpha: float) -> str:
    """The label of a confidence level in every output name and key: the level in percent
    with "_" for its decimal point, ``0.99 -> "99"``, ``0.999 -> "99_9"`` (so ``es_99_9_usd``
    is a column SQL and pandas attribute access take unquoted). `alpha_of_label` inverts it."""
    # Rounded to 10 decimals of a percent: 100 * 0.999 is 99.89999999999999 in floats.
    percent = f"{round(100.0 * float(alpha), 10):.10f}".rstrip("0").rstrip(".")
    return percent.replace(".", "_")


def alpha_of_label(label: str) -> float:
    """The confidence level of an `alpha_label`: ``"99_9" -> 0.999``; ValueError if it is not
    one."""
    if not label or not all(part.isdigit() for part in label.split("_", 1)):
        raise ValueError(f"not a confidence-level label: {label!r}")
    return round(float(label.replace("_", ".")) / 100.0, 12)


def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


@dataclass(frozen=True)
class TailMeasures:
    """VaR and ES at one confidence level, each with its batch-means standard error and
    95% interval ``estimate +- t_{0.975, n_batches-1} * se``.

    ``tail_scenarios_per_batch``: the scenarios at or beyond VaR in one batch, ``(S /
    n_batches) (1 - alpha)`` with equal weights (counted under importance sampling, which puts
    more there). Below `MIN_TAIL_SCENARIOS_PER_BATCH` the batch estimates are close to the
    batch maxima and the intervals cover far less than 95%: the fields keep the raw batch-means
    numbers, but `interval_available` is False and every report (`to_dict`, the run's
    summary, terminal and report) shows the interval as unavailable instead.
    """

    alpha: float
    var: float
    var_se: float
    var_ci: tuple[float, float]
    es: float
    es_se: float
    es_ci: tuple[float, float]
    tail_scenarios_per_batch: float

    @property
    def interval_available(self) -> bool:
        """Whether the standard errors and intervals are worth reporting (enough tail
        scenarios per batch; tests/portfolio/test_risk.py measures their coverage)."""
        return self.tail_scenarios_per_batch >= MIN_TAIL_SCENARIOS_PER_BATCH

    def reported(self) -> TailMeasures:
        """These measures as reports show them: standard errors and intervals nan when not
        `interval_available`."""
        if self.interval_available:
            return self
        nan = math.nan
        return dataclasses.replace(self, var_se=nan, var_ci=(nan, nan), es_se=nan, es_ci=(nan, nan))

    def to_dict(self) -> dict:
        """JSON-ready, as reported (`reported`: None where the interval is unavailable)."""
        shown = self.reported()
        return {
            "alpha": self.alpha,
            "var_usd": _json_float(self.var),
            "var_se_usd": _json_float(shown.var_se),
            "var_ci_usd": [_json_float(v) for v in shown.var_ci],
            "es_usd": _json_float(self.es),
            "es_se_usd": _json_float(shown.es_se),
            "es_ci_usd": [_json_float(v) for v in shown.es_ci],
            "tail_scenarios_per_batch": _json_float(self.tail_scenarios_per_batch),
            "interval_available": self.interval_available,
        }


@dataclass(frozen=True)
class RiskMeasures:
    """The risk measures of one run (docs/spec.md §7), made by `risk_measures`.

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

    def interval_warnings(self) -> list[str]:
        """One line per confidence level whose interval is unavailable (too few tail
        scenarios per batch), with the scenario count that would make it available."""
        out = []
        for t in self.tail:
            if t.interval_available:
                continue
            per_batch = t.tail_scenarios_per_batch
            needed = (
                math.ceil(self.n_scenarios * MIN_TAIL_SCENARIOS_PER_BATCH / per_batch / 1000) * 1000
                if per_batch > 0
                else None
            )
            out.append(
                f"VaR and ES at {100 * t.alpha:g}%: {per_batch:.2g} tail scenarios per batch "
                f"of the standard errors (fewer than {MIN_TAIL_SCENARIOS_PER_BATCH:g}), so no "
                "standard error or interval is reported"
                + (f"; run at least {needed:,} scenarios" if needed else "")
            )
        return out

    def to_dict(self) -> dict:
        """JSON-ready (``json.dumps(..., allow_nan=False)`` works): non-finite numbers become
        None, intervals become two-element lists, money is in keys ending ``_usd``, and the
        per-level measures sit under ``"tail"`` keyed by `alpha_label` (``"99"``, ``"99_9"``),
        each with its ``alpha``."""
        return {
            "n_scenarios": int(self.n_scenarios),
            "effective_sample_size": _json_float(self.effective_sample_size),
            "n_batches": int(self.n_batches),
            "el_usd": _json_float(self.el),
            "el_se_usd": _json_float(self.el_se),
            "el_se_iid_usd": _json_float(self.el_se_iid),
            "el_ci_usd": [_json_float(v) for v in self.el_ci],
            "std_usd": _json_float(self.std),
            "tail": {alpha_label(t.alpha): t.to_dict() for t in self.tail},
            "interval_warnings": self.interval_warnings(),
        }


def _batch_se(estimates: np.ndarray) -> float:
    if estimates.size < 2 or not np.all(np.isfinite(estimates)):
        return math.nan
    return float(np.std(estimates, ddof=1) / math.sqrt(estimates.size))


def batch_count(scenarios: int) -> int:
    """The batches of a run of `scenarios`: 32, or more once batches would exceed
    `MAX_BATCH_SCENARIOS`. It depends on S alone, so every mode and runner uses the same."""
    return max(MIN_BATCHES, math.ceil(scenarios / MAX_BATCH_SCENARIOS))


def batch_bounds(scenarios: int, n_batches: int) -> list[tuple[int, int]]:
    """``(first, count)`` of each batch: contiguous scenario ranges in index order, of
    near-equal size as ``numpy.array_split`` cuts them (the first ``S mod n`` one larger; some
    empty when ``S < n``)."""
    size, extra = divmod(scenarios, n_batches)
    bounds, first = [], 0
    for b in range(n_batches):
        count = size + (1 if b < extra else 0)
        bounds.append((first, count))
        first += count
    return bounds


@dataclass(frozen=True)
class BatchStatistics:
    """One batch of the batch-means standard errors (a contiguous range of scenarios, equal
    weights): all that `risk_measures_from_tail` needs of it. Made by `batch_statistics`."""

    count: int
    loss_sum_usd: float  # Σ L over the batch
    loss_m2_usd2: float  # Σ (L − batch mean)², which pools stably (Chan et al. 1979)
    alphas: tuple[float, ...]
    var_usd: tuple[float, ...]  # the batch's own VaR at each alpha (nan when empty)
    es_usd: tuple[float, ...]  # the batch's own ES at each alpha (nan when empty)


def batch_statistics(losses_usd, alphas: Sequence[float]) -> BatchStatistics:
    """The `BatchStatistics` of one batch's losses [count] (equal weights); ``alphas`` are
    de-duplicated as in `risk_measures`. An empty batch gives nan estimates."""
    L = np.asarray(losses_usd, dtype=np.float64)
    alist = _unique_alphas(alphas)
    if L.size == 0:
        nans = tuple(math.nan for _ in alist)
        return BatchStatistics(0, 0.0, 0.0, alist, nans, nans)
    L, _ = _prepare(L, None)
    total = float(np.sum(L))
    dev = L - total / L.size
    points = [_Sorted(L, None).var_es(a) for a in alist]
    return BatchStatistics(
        count=int(L.size),
        loss_sum_usd=total,
        loss_m2_usd2=float(np.sum(dev * dev)),
        alphas=alist,
        var_usd=tuple(v for v, _ in points),
        es_usd=tuple(e for _, e in points),
    )


def tail_size(scenarios: int, alphas: Sequence[float]) -> int:
    """k = ⌈(1 − min α) S⌉ + 2: enough order statistics for VaR and ES at every α (one more
    than needed, against the rounding tolerance of ``_PTOL``), at most S."""
    return min(scenarios, math.ceil((1.0 - min(alphas)) * scenarios) + 2)


@dataclass(frozen=True)
class LossTail:
    """The largest losses of S scenarios with their scenario indices: every loss at or above
    the k-th largest, ties included, in scenario order (`largest_losses`, `merge_tails`).

    With k = `tail_size(S, alphas)` it holds every scenario at or above VaR_α for each α
    asked, so `var_es`, `tail_coefficients` (``n_scenarios=S``) and `tail_sets` on it give
    exactly what they give on all S losses. `weights` (importance sampling's likelihood
    ratios) only ever come with the whole run (k = S): with weights the tail order is not the
    loss order alone.
    """

    indices: np.ndarray  # int64 [m], ascending scenario indices
    losses_usd: np.ndarray  # float64 [m]
    n_scenarios: int  # S
    weights: np.ndarray | None = None  # [S] likelihood ratios (then m = S), or None
    # `largest_losses`' floor: every loss at or above it is kept too. A batch taken again
    # down to a floor may hold no loss between it and its smallest kept loss, and is complete
    # down to the floor all the same (`short_tails` must not call it short again).
    floor_usd: float = math.inf

    def coefficients(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """`tail_coefficients` at ``alpha`` as (scenario indices ascending, coefficients)."""
        if self.weights is not None:
            positions, coefficients = tail_coefficients(
                self.losses_usd, self.weights, alpha, likelihood_ratios=True
            )
        else:
            positions, coefficients = tail_coefficients(
                self.losses_usd, None, alpha, n_scenarios=self.n_scenarios
            )
        return self.indices[positions], coefficients

    @classmethod
    def of_run(cls, losses_usd, weights, alphas: Sequence[float]) -> LossTail:
        """The tail of a run whose every loss [S] is at hand: the top k with equal weights,
        the whole run with likelihood ratios."""
        L = np.asarray(losses_usd, dtype=np.float64)
        if weights is None:
            return largest_losses(L, tail_size(L.size, alphas))
        return cls(np.arange(L.size, dtype=np.int64), L, L.size, np.asarray(weights, np.float64))


def largest_losses(losses_usd, k: int, first: int = 0, floor: float = math.inf) -> LossTail:
    """Every loss at or above the k-th largest of ``losses_usd`` [S] (ties kept), or at or
    above `floor` where that is lower (kept as `LossTail.floor_usd`), whose scenario indices
    are ``first, first + 1, ...``."""
    L = np.asarray(losses_usd, dtype=np.float64)
    if k >= L.size:
        keep = np.arange(L.size)
    else:
        kth = np.partition(L, L.size - k)[L.size - k]
        keep = np.flatnonzero(L >= min(kth, floor))
    return LossTail(keep.astype(np.int64) + first, L[keep], int(L.size), floor_usd=floor)


def batch_tail_size(scenarios: int, alphas: Sequence[float], count: int) -> int:
    """How many of its largest losses a batch of `count` of the run's `scenarios` keeps in
    tails-only mode: its expected share m of the run's top k = `tail_size` plus eight standard
    deviations of that share (binomial: at most √m) and 10, at most `count`: about k in all
    (1.04 k at 10^9 scenarios). A batch that holds more of the top k than that (odds below
    10^-14 with i.i.d. scenarios) is found by `short_tails` and run again."""
    share = tail_size(scenarios, alphas) * count / scenarios
    return min(count, math.ceil(share + 8.0 * math.sqrt(share) + 10.0))


def short_tails(parts: Sequence[LossTail], k: int) -> tuple[float, list[int]]:
    """``(v, positions)``: v, the k-th largest loss of the union of the parts (−inf if they
    hold fewer than k), and the positions of the parts cut above v.

    A part cut at c (it kept every loss of its scenarios at or above c, the lower of its
    smallest kept loss and its `floor_usd`, and dropped some below) may have dropped losses of
    the run's top k only if c > v: the run's k-th largest is at least v. With no part cut
    above v, the union holds the run's top k and `merge_tails` is exact; a part cut above v
    must be taken again at a cut at most v (its floor: then never cut above the union's new
    k-th largest, which is at least v).
    """
    union = sum(t.losses_usd.size for t in parts)
    if union < k:
        v = -math.inf
    else:
        losses = np.concatenate([t.losses_usd for t in parts])
        v = float(np.partition(losses, union - k)[union - k])
    short = [
        i
        for i, t in enumerate(parts)
        if t.losses_usd.size < t.n_scenarios and min(float(t.losses_usd.min()), t.floor_usd) > v
    ]
    return v, short


def merge_tails(parts: Sequence[LossTail], k: int) -> LossTail:
    """The `largest_losses` (top k) of the union of disjoint scenario sets, each given by its
    own largest losses (parts in scenario order): the same LossTail as from all the losses at
    once. ValueError when a part was cut too high to be sure of that (`short_tails`).
    """
    if not parts:
        raise ValueError("no tails to merge")
    _, short = short_tails(parts, k)
    if short:
        raise ValueError(f"parts {short} were cut above the union's k-th largest loss")
    indices = np.concatenate([t.indices for t in parts])
    losses = np.concatenate([t.losses_usd for t in parts])
    top = largest_losses(losses, k)
    return LossTail(indices[top.indices], top.losses_usd, sum(t.n_scenarios for t in parts))


def tail_sets(tail: LossTail, alphas: Sequence[float]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{α key: (scenario indices, coefficients)}``: the tail set of each α that Euler
    contributions and Hong-Liu sensitivities sum over (`tail_coefficients`)."""
    return {alpha_key(a): tail.coefficients(a) for a in _unique_alphas(alphas)}


@dataclass(frozen=True)
class LossHistogram:
    """Counts of losses in `HISTOGRAM_BINS` bins ``[j w, (j + 1) w)`` from 0, with a bin
    width w that is a power of two (USD, at least 1) just wide enough for the largest loss.

    Histograms merge exactly: the finer one is coarsened by adding groups of 2^m bins (every
    edge of the coarser bins is an edge of the finer ones, and L / w is exact), so the merged
    per-batch histograms are exactly the histogram of all the losses. Negative losses (none in
    the model) count in bin 0.
    """

    bin_width_usd: float
    counts: np.ndarray  # int64 [HISTOGRAM_BINS]
    zero_count: int  # losses <= 0 (counted in bin 0 too)

    @classmethod
    def of(cls, losses_usd) -> LossHistogram:
        L = np.maximum(np.asarray(losses_usd, dtype=np.float64), 0.0)
        top = float(L.max()) if L.size else 0.0
        # top / BINS = m 2^e with m in [0.5, 1) (exact: BINS is a power of two), so
        # top < BINS 2^e: the smallest power-of-two width that fits.
        width = 2.0 ** max(0, math.frexp(top / HISTOGRAM_BINS)[1])
        counts = np.bincount((L / width).astype(np.int64), minlength=HISTOGRAM_BINS)
        return cls(width, counts.astype(np.int64), int(np.count_nonzero(L <= 0.0)))

    def coarsened(self, bin_width_usd: float) -> LossHistogram:
        """The same counts in bins of a wider power-of-two width."""
        factor = int(bin_width_usd / self.bin_width_usd)
        if factor < 1 or factor * self.bin_width_usd != bin_width_usd:
            raise ValueError(f"cannot coarsen bins of {self.bin_width_usd} to {bin_width_usd}")
        # A factor of HISTOGRAM_BINS or more puts every bin in bin 0 (and may not fit int64).
        target = np.arange(HISTOGRAM_BINS) // min(factor, HISTOGRAM_BINS)
        counts = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
        np.add.at(counts, target, self.counts)
        return LossHistogram(bin_width_usd, counts, self.zero_count)

    @staticmethod
    def merge(parts: Sequence[LossHistogram]) -> LossHistogram:
        width = max(h.bin_width_usd for h in parts)
        counts = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
        for h in parts:
            counts += h.coarsened(width).counts
        return LossHistogram(width, counts, sum(h.zero_count for h in parts))

    def to_dict(self) -> dict:
        """JSON-ready; the counts stop at the last non-empty bin."""
        used = int(np.flatnonzero(self.counts)[-1]) + 1 if self.counts.any() else 0
        return {
            "bin_width_usd": self.bin_width_usd,
            "zero_count": self.zero_count,
            "counts": [int(c) for c in self.counts[:used]],
        }

    @classmethod
    def from_dict(cls, document: dict) -> LossHistogram:
        counts = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
        given = np.asarray(document["counts"], dtype=np.int64)
        counts[: given.size] = given
        return cls(float(document["bin_width_usd"]), counts, int(document["zero_count"]))


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
    size (`batch_bounds`, as ``numpy.array_split``), each estimator is recomputed on each batch
    (its weights normalised within the batch), and
    ``se = std(batch estimates, ddof=1) / sqrt(n_batches)``.
    Intervals are ``estimate +- t_{0.975, n_batches-1} * se``. ``n_batches`` below 32 raises
    ValueError. Small samples never raise: the standard errors are nan when ``S < n_batches``
    (or a batch has zero weight), and unreliable when ``tail_scenarios_per_batch`` is below a
    few. Duplicate ``alphas`` are computed once.

    Equal weights: this is `risk_measures_from_tail` on the losses' top `tail_size` and their
    `batch_statistics`, so a tails-only run gets exactly these numbers.

    ``likelihood_ratios=True``: the weights are importance sampling's likelihood ratios
    (E[w] = 1 under the sampling measure) and ``p = w / S`` instead of ``w / Σw``: EL and the
    tail mass P(L > x) = Σ_{L>x} w / S are then unbiased, and the tail measures do not take
    on the noise of Σw, which the body's rare, heavy weights dominate (Glasserman,
    Heidelberger & Shahabuddin 2000).
    """
    L, w = _prepare(losses, weights)
    nb = _check_batches(n_batches)
    alist = _unique_alphas(alphas)
    S = L.size
    bounds = batch_bounds(S, nb)
    if w is None:
        batches = [batch_statistics(L[f : f + c], alist) for f, c in bounds]
        return risk_measures_from_tail(largest_losses(L, tail_size(S, alist)), batches, alist)

    # Weighted: point estimates over the whole sample.
    p = w / (S if likelihood_ratios else w.sum())
    el = float(p @ L)
    if likelihood_ratios:
        # EL = mean of w L (E[w] = 1): its variance is var(w L)/S; the loss's own variance
        # under the original measure is E_w[L²] − EL².
        std = math.sqrt(max(float(p @ (L * L)) - el * el, 0.0))
        wl = w * L
        el_se_iid = float(np.std(wl, ddof=1) / math.sqrt(S)) if S > 1 else math.nan
    else:
        dev = L - el
        std = math.sqrt(max(float(p @ (dev * dev)), 0.0))
        el_se_iid = math.sqrt(S / (S - 1) * float((p * p) @ (dev * dev))) if S > 1 else math.nan
    ess = float(w.sum() ** 2 / (w @ w))
    srt = _Sorted(L, w, likelihood_ratios)
    points = [srt.var_es(a) for a in alist]

    # Batch means.
    el_b = np.full(nb, np.nan)
    var_b = np.full((len(alist), nb), np.nan)
    es_b = np.full((len(alist), nb), np.nan)
    if S >= nb:
        for b, (first, count) in enumerate(bounds):
            Lb, wb = L[first : first + count], w[first : first + count]
            if not wb.sum() > 0.0:
                continue
            mass = float(Lb.size if likelihood_ratios else wb.sum())
            el_b[b] = float(wb @ Lb) / mass
            sb = _Sorted(Lb, wb, likelihood_ratios)
            for i, a in enumerate(alist):
                var_b[i, b], es_b[i, b] = sb.var_es(a)
    # Under importance sampling the tail holds more scenarios than S (1 - α): count them.
    tail_counts = [float(np.count_nonzero(L >= var)) for var, _ in points]
    return _assemble(el, el_se_iid, std, points, el_b, var_b, es_b, S, ess, alist, tail_counts)


def risk_measures_from_tail(
    tail: LossTail, batches: Sequence[BatchStatistics], alphas: Sequence[float]
) -> RiskMeasures:
    """The `RiskMeasures` of an equal-weight run from its largest losses and its batches
    alone (no per-scenario loss): what `risk_measures` gives on all the losses.

    ``tail``: a `LossTail` of k >= `tail_size(S, alphas)` (S = ``tail.n_scenarios``);
    ``batches``: the `BatchStatistics` of every batch of `batch_bounds(S, len(batches))`, in
    order, computed at these ``alphas``. VaR and ES come from the tail (`var_es` with
    ``n_scenarios``); EL, the standard deviation and the i.i.d. EL standard error from the
    batches' sums and pooled squared deviations; the batch-means standard errors from the
    batches' own estimates.
    """
    nb = _check_batches(len(batches))
    alist = _unique_alphas(alphas)
    S = int(tail.n_scenarios)
    if tail.weights is not None:
        raise ValueError("risk_measures_from_tail takes equal weights only")
    if sum(b.count for b in batches) != S:
        raise ValueError(f"the batches hold {sum(b.count for b in batches)} scenarios, not {S}")
    if any(b.alphas != alist for b in batches):
        raise ValueError(f"the batches were computed at other alphas than {alist}")
    total = 0.0
    for b in batches:
        total += b.loss_sum_usd
    el = total / S
    m2 = 0.0  # Σ (L − EL)², pooled from the batches (Chan, Golub & LeVeque 1979)
    for b in batches:
        if b.count:
            m2 += b.loss_m2_usd2 + b.count * (b.loss_sum_usd / b.count - el) ** 2
    std = math.sqrt(m2 / S)
    el_se_iid = math.sqrt(m2 / (S * (S - 1.0))) if S > 1 else math.nan
    srt = _Sorted(tail.losses_usd, None, n_scenarios=S)
    points = [srt.var_es(a) for a in alist]
    el_b = np.full(nb, np.nan)
    var_b = np.full((len(alist), nb), np.nan)
    es_b = np.full((len(alist), nb), np.nan)
    if all(b.count for b in batches):  # S >= n_batches
        el_b = np.array([b.loss_sum_usd / b.count for b in batches])
        var_b = np.array([b.var_usd for b in batches]).T
        es_b = np.array([b.es_usd for b in batches]).T
    return _assemble(el, el_se_iid, std, points, el_b, var_b, es_b, S, float(S), alist)


def _check_batches(n_batches) -> int:
    nb = operator.index(n_batches)
    if nb < MIN_BATCHES:
        raise ValueError(f"n_batches must be at least {MIN_BATCHES}, got {nb}")
    return nb


def _assemble(
    el: float,
    el_se_iid: float,
    std: float,
    points: list[tuple[float, float]],
    el_b: np.ndarray,
    var_b: np.ndarray,
    es_b: np.ndarray,
    S: int,
    ess: float,
    alist: Sequence[float],
    tail_counts: Sequence[float] | None = None,
) -> RiskMeasures:
    """RiskMeasures from the point estimates and the batch estimates ([n_batches], and
    [alphas, n_batches] for VaR and ES); `tail_counts`: the scenarios at or beyond each VaR
    (weighted runs), else S (1 − α)."""
    nb = el_b.size
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
                tail_scenarios_per_batch=(S * (1.0 - a) if tail_counts is None else tail_counts[i])
                / nb,
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
