"""Stress scenarios: named overrides of the assumptions, run on the base run's random numbers.

Built-ins are functions of the base assumptions that return overrides in the assumptions
file's own layout (docs/spec.md §10), so a stress is exactly what a user could write as a
`[[stress]]` table. `stress_case` applies them (`assumptions.with_overrides`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gpucredit.kernels.params import HOURS_PER_YEAR
from gpucredit.portfolio.assumptions import Assumptions, with_overrides
from gpucredit.portfolio.book import Book
from gpucredit.portfolio.document import AssumptionsError

MAX_JUMP = 0.95  # jumps must stay in [0, 1)


@dataclass(frozen=True)
class StressCase:
    """A stress scenario ready to run: its name, what it does, and the stressed assumptions.
    Its time grid must be the base run's (the same random numbers)."""

    name: str
    description: str
    assumptions: Assumptions
    # Offtakers that default in period 1 of every scenario (docs/spec.md §4a): names, or
    # LARGEST_OFFTAKER, resolved against the book by `defaulted_offtakers`.
    offtakers_default: tuple[str, ...] = ()


LARGEST_OFFTAKER = "<largest offtaker>"
LARGEST_OFFTAKER_STRESS = "largest-offtaker-default"


def contracted_revenue_by_offtaker(book: Book) -> dict[str, float]:
    """USD a year each offtaker pays today: Σ n 8760 k R^c over its loans whose contracts still
    run (contract_years_remaining > 0), in order of first appearance."""
    running = np.asarray(book.contract_years_remaining, np.float64) > 1e-9
    revenue = (
        np.asarray(book.gpu_count, np.float64)
        * HOURS_PER_YEAR
        * np.asarray(book.contracted_share, np.float64)
        * np.asarray(book.contract_rate_usd_per_hour, np.float64)
        * running
    )
    _, names, _ = book.offtaker_index()
    return {name: float(revenue[book.offtaker == name].sum()) for name in names}


def defaulted_offtakers(case: StressCase, book: Book) -> tuple[str, ...]:
    """The book's offtakers `case` defaults, checked against the book: AssumptionsError for a
    name no row carries (or a largest-offtaker stress on a book naming none)."""
    if not case.offtakers_default:
        return ()
    revenue = contracted_revenue_by_offtaker(book)
    names = []
    for name in case.offtakers_default:
        if name == LARGEST_OFFTAKER:
            if not revenue:
                raise AssumptionsError(
                    [f"stress {case.name}: the book names no offtaker (column offtaker)"]
                )
            name = max(revenue, key=revenue.get)  # ties: the first in book order
        elif name not in revenue:
            known = ", ".join(repr(n) for n in revenue) or "none"
            raise AssumptionsError(
                [
                    f"stress {case.name}: offtakers_default: no loan of the book names "
                    f"offtaker {name!r} (the book's offtakers: {known})"
                ]
            )
        names.append(name)
    return tuple(dict.fromkeys(names))


def _next_gen_glut(a: Assumptions) -> dict:
    """Every launch comes at half its date with 1.6× its jumps; rents fall 10 points/yr faster."""
    launches = []
    for name, years in zip(a.launch_names, a.launch_years, strict=True):
        e = a.launch_names.index(name)
        launches.append(
            {
                "name": name,
                "years_from_now": years / 2,
                "price_jump": {
                    g: min(MAX_JUMP, 1.6 * float(a.params.launch_price_jump[e, k]))
                    for k, g in enumerate(a.generations)
                },
                "rent_jump": {
                    g: min(MAX_JUMP, 1.6 * float(a.params.launch_rent_jump[e, k]))
                    for k, g in enumerate(a.generations)
                },
            }
        )
    generations = {
        g: {"rent_drift": float(a.params.rent_drift[k]) - 0.10} for k, g in enumerate(a.generations)
    }
    return {"launches": launches, "generations": generations}


def _crypto_winter(a: Assumptions) -> dict:
    """Median BTC −70% and ETH −80% over the first year, crypto vols ×1.3.

    The model's drifts are constant over the horizon (docs/spec.md §2), so the first year's
    median decline sets the drift: μ − σ²/2 = ln(1 − drop). It keeps that rate after the
    first year: a deliberately severe reading.
    """
    btc_vol = 1.3 * a.params.btc_vol
    eth_vol = 1.3 * a.params.eth_vol
    return {
        "crypto": {
            "btc": {"drift": math.log(0.30) + 0.5 * btc_vol**2, "vol": btc_vol},
            "eth": {"drift": math.log(0.20) + 0.5 * eth_vol**2, "vol": eth_vol},
        }
    }


def _liquidity_freeze(a: Assumptions) -> dict:
    """Market depth ÷ 10 and base haircuts +10 points (at most H_max)."""
    return {
        "generations": {
            g: {
                "market_depth_gpus_per_year": float(a.params.market_depth_gpus_per_year[k]) / 10,
                "haircut_base": min(float(a.params.haircut_base[k]) + 0.10, a.params.haircut_max),
            }
            for k, g in enumerate(a.generations)
        }
    }


def _rate_shock(a: Assumptions) -> dict:
    """Base rate +300 bp today and in its long-run mean."""
    return {"rate": {"level": a.params.rate_level + 0.03, "mean": a.params.rate_mean + 0.03}}


def _paper_metrics(a: Assumptions) -> dict:
    """The infrastructure view: the input PDs assume today's metrics persist (PD anchor today).

    Same book, same random numbers; only the references move (docs/spec.md §4): the expected
    fall in rents and prices now counts as deterioration on top of PDs that already price it,
    which shows how much of a book's risk an "infrastructure" reading of its PDs adds.
    """
    return {"model": {"pd_anchor": "today"}}


def _largest_offtaker_default(a: Assumptions) -> dict:
    """The offtaker behind the most contracted revenue in the book defaults in period 1.

    No assumption moves: the stress is a book event (docs/spec.md §4a), its contracts pay
    period 1 and nothing after, on the base run's random numbers (`defaulted_offtakers`
    picks the offtaker by `contracted_revenue_by_offtaker`).
    """
    return {}


BUILTIN_STRESSES: dict[str, Callable[[Assumptions], dict]] = {
    "next-gen-glut": _next_gen_glut,
    "crypto-winter": _crypto_winter,
    "liquidity-freeze": _liquidity_freeze,
    "rate-shock": _rate_shock,
    "paper-metrics": _paper_metrics,
    LARGEST_OFFTAKER_STRESS: _largest_offtaker_default,
}


def stress_names(assumptions: Assumptions) -> tuple[str, ...]:
    """Built-ins first, then the `[[stress]]` tables of the assumptions file."""
    return tuple(BUILTIN_STRESSES) + tuple(s.name for s in assumptions.stresses)


def stress_overrides(assumptions: Assumptions, name: str) -> tuple[dict, str]:
    """(overrides, description) of a named stress; a user `[[stress]]` wins over a built-in."""
    for stress in assumptions.stresses:
        if stress.name == name:
            return stress.overrides, stress.description
    if name in BUILTIN_STRESSES:
        builder = BUILTIN_STRESSES[name]
        return builder(assumptions), (builder.__doc__ or "").strip().splitlines()[0]
    raise KeyError(f"unknown stress {name!r}; known: {', '.join(stress_names(assumptions))}")


def stress_case(
    assumptions: Assumptions, name: str, repair_correlation: bool = False
) -> StressCase:
    """A named stress (built-in or `[[stress]]`) as a `StressCase` ready for `simulate`.

    Raises AssumptionsError for an unknown name, invalid overrides, or a stress that changes
    the time grid (it must run on the base run's random numbers)."""
    source = f"stress {name}"
    try:
        overrides, description = stress_overrides(assumptions, name)
    except KeyError as error:
        raise AssumptionsError([f"{source}: {error.args[0]}"]) from None
    stressed = with_overrides(assumptions, overrides, repair_correlation)
    # The same random numbers need the same grid, factors (K slots per period) and seed.
    fixed = ("horizon_years", "steps_per_year", "copula", "t_dof", "generations", "seed")
    changed = [k for k in fixed if getattr(stressed, k) != getattr(assumptions, k)]
    if changed:
        raise AssumptionsError(
            [
                f"{source}: must not change {', '.join(changed)}: a stress runs on the base "
                "run's random numbers"
            ]
        )
    offtakers: tuple[str, ...] = ()
    for stress in assumptions.stresses:
        if stress.name == name:
            offtakers = stress.offtakers_default
            break
    else:
        if name == LARGEST_OFFTAKER_STRESS:
            offtakers = (LARGEST_OFFTAKER,)
    return StressCase(name, description, stressed, offtakers)
