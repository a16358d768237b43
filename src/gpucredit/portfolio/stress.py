"""Stress scenarios: named overrides of the assumptions, run on the base run's random numbers.

Built-ins are functions of the base assumptions that return overrides in the assumptions
file's own layout (docs/spec.md §10), so a stress is exactly what a user could write as a
`[[stress]]` table. `gpucredit.io.assumptions.with_overrides` applies them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from gpucredit.portfolio.assumptions import Assumptions

MAX_JUMP = 0.95  # jumps must stay in [0, 1)


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


BUILTIN_STRESSES: dict[str, Callable[[Assumptions], dict]] = {
    "next-gen-glut": _next_gen_glut,
    "crypto-winter": _crypto_winter,
    "liquidity-freeze": _liquidity_freeze,
    "rate-shock": _rate_shock,
    "paper-metrics": _paper_metrics,
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
