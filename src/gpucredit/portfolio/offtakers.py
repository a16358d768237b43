"""Offtaker concentration (docs/spec.md §4a): what each offtaker stands behind, how often it
defaulted in the run, and what its default did to the book's loss.

The kernels return losses, not the offtakers' default events, so the events are regenerated
here from the run's own random numbers (stream 0 for the credit cycle Z(t), stream 2 for the
uniforms; the reference's `offtaker_default_periods`), scenario by scenario, and paired with
the run's per-scenario losses: E[L | offtaker j defaults within the horizon] against
E[L | it does not], each with its standard error.
"""

from __future__ import annotations

import numpy as np

from gpucredit.kernels.params import LoanArrays, ModelGrid, ModelParams
from gpucredit.kernels.reference import (
    correlated_shocks,
    factor_paths,
    offtaker_default_periods,
    shift_normals,
)
from gpucredit.kernels.rng import offtaker_uniforms_np, shock_normals_np
from gpucredit.portfolio.book import Book
from gpucredit.portfolio.risk import alpha_label
from gpucredit.portfolio.stress import contracted_revenue_by_offtaker

OFFTAKER_CHUNK = 4096  # scenarios per NumPy call (bounds the [S, T + 1, G] factor paths)
# The run's first scenarios the events are regenerated for (NumPy: ~10 s on two cores).
OFFTAKER_MAX_SCENARIOS = 131_072


def offtaker_events_of_run(
    params: ModelParams,
    grid: ModelGrid,
    loans: LoanArrays,
    seed: int,
    scenarios: int,
    normal_shift: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(τ [S, J], Z [S, T + 1]) of scenarios ω = 0..S-1 of the run: each offtaker's default
    period (reference.NEVER: none within the horizon) and the credit cycle it defaulted on,
    from the run's random numbers (and importance shift, when it had one)."""
    tau = np.zeros((scenarios, len(loans.offtaker_pd_annual)), dtype=np.int64)
    credit = np.zeros((scenarios, grid.periods + 1))
    for first in range(0, scenarios, OFFTAKER_CHUNK):
        index = np.arange(first, min(first + OFFTAKER_CHUNK, scenarios), dtype=np.uint32)
        normals = shock_normals_np(seed, index, grid.periods, grid.slots_per_period)
        normals, _ = shift_normals(normals, normal_shift, grid.n_factors)
        credit[index] = factor_paths(params, grid, correlated_shocks(params, grid, normals)).credit
        uniforms = offtaker_uniforms_np(seed, index, len(loans.offtaker_pd_annual))
        tau[index] = offtaker_default_periods(params, grid, loans, credit[index], uniforms)
    return tau, credit


def _weighted_mean_and_se(values: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """Σ w x / Σ w and its standard error with the effective sample size (Σw)²/Σw²; NaN when
    the group is empty, se NaN with fewer than two scenarios."""
    total = weights.sum()
    if total <= 0:
        return float("nan"), float("nan")
    mean = float(np.sum(weights * values) / total)
    n_eff = total**2 / np.sum(weights**2)
    if len(values) < 2:
        return mean, float("nan")
    variance = np.sum(weights * (values - mean) ** 2) / total
    return mean, float(np.sqrt(variance / n_eff))


def offtaker_concentration(
    book: Book,
    params: ModelParams,
    grid: ModelGrid,
    loans: LoanArrays,
    seed: int,
    losses_usd: np.ndarray | None,
    weights: np.ndarray | None,
    normal_shift: np.ndarray | None = None,
    loan_el_usd: np.ndarray | None = None,
    loan_es_usd: dict[str, np.ndarray] | None = None,
) -> list[dict] | None:
    """JSON-ready rows, one per offtaker in order of first appearance (None for a book naming
    none): its PD, the contracted revenue (USD a year, running contracts) and the exposure
    (Σ balance_usd) of its loans, its default frequency in the run within the horizon and in
    period 1 (weighted, with standard errors; period 1 against p^Δ, which its Vasicek hazard
    gives exactly, while over the horizon a persistent credit cycle makes defaults cluster
    below 1 − (1 − p)^H), the EL and ES_α of its loans (Euler
    contributions, when the run computed them), and the book's expected loss given that it
    defaults within the horizon against given it does not (from the run's own scenarios,
    `losses_usd` [S]; absent in a tails-only run). What cannot be estimated (no scenario in
    a group, a standard error from one scenario) is None. The events are regenerated for
    the run's first min(S, `OFFTAKER_MAX_SCENARIOS`) scenarios (`scenarios` in each row)."""
    if loans.offtaker is None:
        return None
    index, names, pds = book.offtaker_index()
    revenue = contracted_revenue_by_offtaker(book)
    tau = None
    if losses_usd is not None:
        n = min(len(losses_usd), OFFTAKER_MAX_SCENARIOS)
        losses_usd = np.asarray(losses_usd[:n], dtype=np.float64)
        w = np.ones(n) if weights is None else np.asarray(weights[:n], np.float64)
        tau, _ = offtaker_events_of_run(params, grid, loans, seed, len(losses_usd), normal_shift)
    rows = []
    for j, name in enumerate(names):
        mine = index == j
        row = {
            "offtaker": name,
            "pd_annual": float(pds[j]),
            "period_one_pd": float(1.0 - (1.0 - pds[j]) ** grid.dt_years),
            "loans": int(mine.sum()),
            "contracted_revenue_usd_per_year": revenue[name],
            "exposure_usd": float(np.sum(book.balance_usd[mine])),
        }
        if loan_el_usd is not None:
            row["loans_el_usd"] = float(np.sum(np.asarray(loan_el_usd)[mine]))
        for key, es in (loan_es_usd or {}).items():
            row[f"loans_es_{alpha_label(float(key))}_usd"] = float(np.sum(np.asarray(es)[mine]))
        if tau is not None:
            hit = tau[:, j] <= grid.periods
            frequency, frequency_se = _weighted_mean_and_se(hit.astype(np.float64), w)
            first = (tau[:, j] == 1).astype(np.float64)
            first_frequency, first_se = _weighted_mean_and_se(first, w)
            given, given_se = _weighted_mean_and_se(losses_usd[hit], w[hit])
            not_given, not_given_se = _weighted_mean_and_se(losses_usd[~hit], w[~hit])
            row |= {
                "scenarios": len(losses_usd),
                "default_frequency": frequency,
                "default_frequency_se": frequency_se,
                "period_one_default_frequency": first_frequency,
                "period_one_default_frequency_se": first_se,
                "el_given_default_usd": given,
                "el_given_default_se_usd": given_se,
                "el_given_no_default_usd": not_given,
                "el_given_no_default_se_usd": not_given_se,
            }
        # JSON null for what the run cannot estimate (an empty group, one scenario)
        rows.append({k: None if isinstance(v, float) and not np.isfinite(v) else v
                     for k, v in row.items()})  # fmt: skip
    return rows
