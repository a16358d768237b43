"""The period step of the JAX kernels (docs/spec.md §4-6): one block of loans over T periods.

`_revalue_block` runs the hazard recursion of one block of b loans for a chunk of S
scenarios (`lax.scan` over the T periods, carry (cash, survival, default period, loss,
defaulted exposure) of shape [S, b]): pass 1 returns the block's liquidation volumes, pass 2
applies the haircut and returns the loss. In sampled mode pass 1 draws the block's own
default uniforms, one per (scenario, loan) from the counters (seed, scenario, borrower) of
`DefaultDraws` (no [S, all borrowers] array exists), and returns each loan's default period;
pass 2 reads those periods instead of recomputing the hazards. Its pieces: `_ln_coverage`
(the clipped log coverage ratios), `_take` (a factor at each loan's generation, fused),
`_erfc` (the hazard Φ(z) = ½ erfc(−z/√2), float32-exact and cheap), and between the passes
`_liquidation_supply` and `_haircut` (the fire-sale haircut H_g(t) of the GPUs the book and
the rest of the fleet dump).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gpucredit.kernels.jax_factors import _Paths
from gpucredit.kernels.jax_loans import _LoanTerms
from gpucredit.kernels.params import LOG_BIG, THRESHOLD_LIMIT, ModelGrid, ModelParams
from gpucredit.kernels.rng import default_uniforms_of

NEVER = np.int32(2**30)  # τ_j of an offtaker that does not default within the horizon


class DefaultDraws(NamedTuple):
    """What a block needs to draw its sampled-mode default uniforms (docs/spec.md §8, stream 1)."""

    seed: jax.Array  # uint32 scalar
    scenarios: jax.Array  # [S] uint32 scenario indices of the chunk


def _ln_coverage(numerator, denominator, floor, cap):
    """ln x⁺ with x⁺ = min(max(num/den, floor), cap) and a denominator <= 0 giving the cap."""
    positive = denominator > 0
    ratio = jnp.clip(numerator / jnp.where(positive, denominator, 1), floor, cap)
    return jnp.log(jnp.where(positive, ratio, cap))


def _take(x, generation):
    """x [S, G] at each loan's generation [b] -> [S, b], as a chain of G − 1 selects.

    Exact, and fused by XLA into the period loop's elementwise kernel: no [S, b] temporary
    in memory, no gather and no K = G matmul (on CPU a gather of per-generation factors was
    70% of the time, a one-hot matmul ~3x faster than that and the selects faster still).
    """
    out = x[:, :1]
    for g in range(1, x.shape[1]):
        out = jnp.where(generation == g, x[:, g : g + 1], out)
    return jnp.broadcast_to(out, (x.shape[0], generation.shape[-1]))


# erfc(x) = t exp(−x² + P(t)), t = 1/(1 + |x|/2), x >= 0 (Numerical Recipes' erfcc,
# Chebyshev fit): relative error < 1.2e-7 for every x >= 0, so float32-exact for the hazard.
_ERFC_COEFFICIENTS = (
    -1.26551223,
    1.00002368,
    0.37409196,
    0.09678418,
    -0.18628806,
    0.27886807,
    -1.13520398,
    1.48851587,
    -0.82215223,
    0.17087277,
)


@jax.custom_jvp
def _erfc(x):
    """erfc(x): lax.erfc in float64; in float32 one exp, one divide and 9 FMAs.

    Its derivative is the exact −2/√π exp(−x²) (custom_jvp): one exp in the backward pass
    instead of the derivative of the approximation's polynomial.

    XLA's float32 erfc evaluates both an erf and an erfc branch and selects, and on CPU
    its pieces land in separate fusions that each recompute the argument; this form is one
    expression that fuses into the period loop. erfc(−x) = 2 − erfc(x).
    """
    if x.dtype != jnp.float32:
        return lax.erfc(x)
    a = jnp.abs(x)
    t = 1 / (1 + 0.5 * a)
    poly = jnp.asarray(_ERFC_COEFFICIENTS[-1], x.dtype)
    for c in _ERFC_COEFFICIENTS[-2::-1]:
        poly = c + t * poly
    y = t * jnp.exp(poly - a * a)
    return jnp.where(x < 0, 2 - y, y)


@_erfc.defjvp
def _erfc_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return _erfc(x), jnp.asarray(-2 / np.sqrt(np.pi), x.dtype) * jnp.exp(-x * x) * dx


def _liquidation_supply(p: ModelParams, volume, expected_volume, book_gpus) -> jax.Array:
    """Q_g(t) + max(F_g − N_g, 0) q̄_g(t) [T, S, G] (docs/spec.md §5): the book's own dumped
    GPUs Q [T, S, G], and the rest of the financed fleet liquidating at the book's expected
    rate q̄ = expected_volume / N_g (expected_volume = Σ n a S(t−1) h(t); in conditional mode
    it is Q itself). N_g = book_gpus [G]; N_g = 0 gives Q = q̄ = 0."""
    owned = book_gpus > 0
    rest = jnp.where(owned, jnp.maximum(p.financed_fleet_gpus - book_gpus, 0), 0)
    return volume + rest * (expected_volume / jnp.where(owned, book_gpus, 1))


def _haircut(p: ModelParams, grid: ModelGrid, supply: jax.Array) -> jax.Array:
    """H_g(t) = min(H_max, H0_g + H1 (supply_g(t)/D_g)^γ) for the liquidation supply [T, S, G]
    of `_liquidation_supply`; NaN-free at 0."""
    ratio = supply / (p.market_depth_gpus_per_year * grid.dt_years)
    positive = ratio > 0
    safe = jnp.where(positive, ratio, jnp.ones_like(ratio))
    zero_power = jnp.where(p.haircut_power == 0, 1.0, 0.0).astype(ratio.dtype)  # 0**γ
    powered = jnp.where(positive, safe**p.haircut_power, zero_power)
    return jnp.minimum(p.haircut_max, p.haircut_base + p.haircut_slope * powered)


def _offtaker_default_periods(p: ModelParams, grid: ModelGrid, pd_annual, credit, uniforms):
    """τ_j(ω) [S, J] int32 of docs/spec.md §4a (NEVER: none within the horizon): the first t
    with 1 − Π_{u≤t}(1 − h^o_j(u)) >= U_j. pd_annual [J] float64, credit Z(t) [T, S], uniforms
    [S, J], p in the computation's dtype. Held fixed under differentiation (an indicator's
    pathwise derivative is 0): no gradient flows through Z or p here."""
    dtype = credit.dtype
    credit = lax.stop_gradient(credit)
    rho = lax.stop_gradient(p.offtaker_correlation)
    pd_period = 1.0 - (1.0 - pd_annual.astype(jnp.float64)) ** grid.dt_years
    threshold = jnp.clip(
        jax.scipy.special.ndtri(pd_period), -THRESHOLD_LIMIT, THRESHOLD_LIMIT
    ).astype(dtype)  # [J]; a PD of 1 (a stress) gives h^o = 1, of 0 gives h^o = 0
    scale = np.sqrt(0.5).astype(dtype) / jnp.sqrt(1 - rho)
    survival = jnp.ones(uniforms.shape, dtype)
    tau = jnp.full(uniforms.shape, NEVER, jnp.int32)
    for t in range(1, grid.periods + 1):  # T is small: unrolled, as the reference's loop
        hazard = 0.5 * _erfc((jnp.sqrt(rho) * credit[t - 1][:, None] - threshold) * scale)
        survival = survival * (1 - hazard)
        tau = jnp.where((tau == NEVER) & (1 - survival >= uniforms), t, tau)
    return tau


def _revalue_block(
    p: ModelParams,
    grid: ModelGrid,
    terms: _LoanTerms,
    paths: _Paths,
    defaults: DefaultDraws | jax.Array | None,
    haircut,
    discount,
    extras: tuple[str, ...] = (),
    remat_steps: bool = True,
    offtaker_periods=None,
):
    """One block of loans over the T periods.

    terms: one block ([b] and [T, b] leaves). paths: time-major [T, S, ...]. defaults: None in
    conditional mode; in sampled mode, in pass 1 the `DefaultDraws` (seed and the chunk's
    scenario indices) the block draws its uniforms from, in pass 2 pass 1's default periods
    [S, b]. haircut [T, S, G] or None: None is pass 1 and returns `_Volumes`: the liquidation
    volumes (Q, expected) [T, S, G] each, the GPUs the block dumps, Σ n a d(t), and the
    expected ones, Σ n a S(t−1) h(t) (the same array in conditional mode), and in sampled mode
    each loan's default period [S, b] (0: none); otherwise pass 2, returning a `_BlockOutcome`
    of [S, b] arrays (what is not used is removed by XLA's dead-code elimination), or with
    `extras` (pass 2 only) the pair (outcome, {name: [T, S, G]}) for each name in extras:
      "volume": this block's Q, as pass 1 gives it (the hazards are the same);
      "recovery_weights": R_g(t) = Σ_i DF d_i 1[EAD_i > Rec_i] n_i a_i (1 − c_i) over the
        block's loans of generation g, so that ∂(Σ_i DF d_i LGD_i)/∂H_g(t) = P_g(t) R_g(t).
    remat_steps: recompute each period's intermediates in the backward pass from the carry
    (jax.checkpoint) instead of storing them as [T, S, b] stacks.
    offtaker_periods: [S, J] int32 τ_j (`_offtaker_default_periods`), or None for a book
    naming no offtaker: a loan's contract stops paying after its offtaker's τ (§4a).
    """
    dtype = terms.threshold.dtype
    gen = terms.generation
    n_scen = paths.credit.shape[1]
    block = gen.shape[0]
    floor, cap = p.coverage_floor, p.coverage_cap
    ln_floor, ln_cap = jnp.log(floor), jnp.log(cap)
    positive_ltv = p.refi_ltv > 0
    ln_ltv = jnp.where(positive_ltv, jnp.log(jnp.where(positive_ltv, p.refi_ltv, 1)), -LOG_BIG)

    sampled = grid.mode == "sampled"
    # Sampled pass 2 reads pass 1's default periods: the hazards are the same in both passes
    # (they do not depend on the haircut), so the events are too, and pass 2 only prices them.
    known = sampled and haircut is not None
    u = None
    if sampled and not known:
        # U_b of each loan's borrower [S, b], drawn here: one Threefry per (scenario, loan),
        # not a [S, padded B] array drawn for the chunk and gathered by every block.
        u = default_uniforms_of(defaults.seed, defaults.scenarios, terms.borrower, dtype)
    period_dtype = _period_dtype(grid.periods)
    # Per-loan-period constants of the hazard, hoisted out of the scenario loop [T, b]: with
    # x = (β_L ln LC + β_C ln CC + refi + √ρ Z − base) · scale, h = Φ(z) = ½ erfc(x), where
    # base(t) = Φ⁻¹(p^Δ) + β_L ln LC^ref(t) + β_C ln CC^ref(t) (the PD anchor's references,
    # constants of the run) and scale = 1/(√2 √(1 − ρ)).
    hazard_base = (
        terms.threshold
        + p.beta_liquidity * terms.ln_liquidity_reference
        + p.beta_collateral * terms.ln_collateral_reference
    )  # [T, b]
    scale = terms.inv_sqrt_one_minus_rho * np.sqrt(0.5).astype(dtype)
    contract_until = None  # [S, b] the last period each loan's contract pays
    if offtaker_periods is not None:
        has = terms.offtaker >= 0
        tau = jnp.take(offtaker_periods, jnp.maximum(terms.offtaker, 0), axis=1)
        contract_until = jnp.where(has, tau, NEVER)
    if "recovery_weights" in extras:
        n_gen = terms.volume_weights.shape[-1]
        recovery_weights = jax.nn.one_hot(gen, n_gen, dtype=dtype) * terms.recovery_gpus[:, None]

    def crypto_usd(f):
        """The pledged BTC and ETH's value [S, b] at period f's prices."""
        return terms.btc_units * f.btc[:, None] + terms.eth_units * f.eth[:, None]

    def price_defaults(carry, f, period, default, crypto, ys):
        """Pass 2: add this period's loss of the defaults d [S, b] to the carry."""
        cash, survival, first, loss, defaulted_exposure = carry
        recovery = terms.recovery_gpus * _take(f.salvage_price, gen) + (
            terms.crypto_pledged * crypto
        )
        exposure = period.exposure_fixed_usd + period.debt_service_per_rate_usd * f.rate[:, None]
        lgd = jnp.maximum(exposure - recovery, 0)
        weight = default if discount is None else f.discount[:, None] * default
        if "recovery_weights" in extras:
            ys["recovery_weights"] = jnp.matmul(
                jnp.where(exposure > recovery, weight, 0),
                recovery_weights,
                precision=lax.Precision.HIGHEST,
            )  # [S, G]
        return (
            cash,
            survival,
            first,
            loss + weight * lgd,
            defaulted_exposure + weight * exposure,
        ), ys

    def coverage(cash, f, period, base, t):
        """Period t's hazard argument x_t and cash C_t [S, b] from C_{t−1} and period t's
        factors and terms (the cash recursion does not depend on the defaults)."""
        rent_g = _take(f.rent, gen)
        ln_price_g = _take(f.ln_price, gen)
        noi = (
            period.fixed_income_usd
            + period.rent_hours * rent_g
            - terms.power_kwh_per_period * f.power[:, None]
            + terms.btc_income_usd * f.btc_income_index[:, None]
        )
        if contract_until is not None:  # after the offtaker's default: spot rent instead
            lost = t > contract_until
            switch = period.contract_rent_hours * rent_g - period.contract_income_usd
            noi = noi + jnp.where(lost, switch, 0)
        debt_service = (
            period.debt_service_fixed_usd + period.debt_service_per_rate_usd * f.rate[:, None]
        )
        crypto = crypto_usd(f)
        ln_lc = _ln_coverage(cash + crypto + noi, debt_service, floor, cap)
        ln_cc = jnp.clip(ln_price_g + period.ln_gpus_per_balance, ln_floor, ln_cap)
        ln_rf = jnp.clip(
            jnp.minimum(ln_ltv + ln_price_g + terms.ln_gpus_per_balloon, 0), ln_floor, ln_cap
        )
        refinancing = jnp.where(
            period.at_refinancing, p.beta_refinancing * (ln_rf - terms.ln_refinancing_reference), 0
        )
        x = (
            p.beta_liquidity * ln_lc
            + p.beta_collateral * ln_cc
            + refinancing
            + terms.sqrt_rho * f.credit[:, None]
            - base
        ) * scale
        return x, jnp.maximum(cash + noi - debt_service, 0)

    def events(carry, x, f, period, t):
        """Period t's defaults from its hazard argument x [S, b], then pass 1's volumes or
        pass 2's losses."""
        cash, survival, first, loss, defaulted_exposure = carry
        # Φ(z) = ½ erfc(−z/√2): one erfc per loan-period (jax.scipy's ndtr evaluates both
        # erf and erfc and selects); erfc keeps the small hazards' relative accuracy.
        hazard = jnp.where(period.active, 0.5 * _erfc(x), 0)
        new_survival = survival * (1 - hazard)
        if sampled:
            crossed = (1 - new_survival) >= u  # 1 − S_i(t) >= U_b
            new_default = crossed & (first == 0)
            default = new_default.astype(dtype)
            first = jnp.where(new_default, t, first)  # the default period, 0 until then
        else:
            default = survival * hazard
        ys = {}
        if haircut is None or "volume" in extras:
            ys["volume"] = jnp.matmul(
                default, terms.volume_weights, precision=lax.Precision.HIGHEST
            )  # [S, G]
        if haircut is None:
            expected = ys["volume"]
            if sampled:  # the expected volume Σ n a S(t−1) h(t) sets the market's rate
                expected = jnp.matmul(
                    survival * hazard, terms.volume_weights, precision=lax.Precision.HIGHEST
                )
            return (cash, new_survival, first, loss, defaulted_exposure), (
                ys["volume"],
                expected,
            )
        carry = (cash, new_survival, first, loss, defaulted_exposure)
        return price_defaults(carry, f, period, default, crypto_usd(f), ys)

    def price_known(carry, xs):
        """Sampled pass 2: price pass 1's default events, no hazard to recompute."""
        f, period, _, t = xs
        default = (defaults == t).astype(dtype)
        return price_defaults(carry, f, period, default, crypto_usd(f), {})

    def step(carry_x, xs):
        """Period t's events from x_t (carried: computed once, in the step before), then
        period t + 1's x and cash. xs: period t's factors and terms, and period t + 1's."""
        carry, x = carry_x
        (f, period, _, t), period_next = xs
        carry, ys = events(carry, x, f, period, t)
        x_next, cash_next = coverage(carry[0], *period_next)
        return ((cash_next, *carry[1:]), x_next), ys

    # Carry (cash, survival, first, loss, defaulted exposure), [S, b] each; `first` is each
    # loan's default period in sampled pass 1 (0: none yet). What a pass does not update is an
    # empty placeholder. The hazard argument x_t is carried from the step before, so it is
    # computed once per loan-period: XLA's CPU fusion recomputes everything cheap in every
    # fusion that reads it, and computed in the step that uses it, x and the NOI behind it
    # were evaluated in 4-5 fusions of each period (bench/hlo_profile.py: 1,376 → 883 HLO
    # ops per loan-period over both passes).
    shape, empty = (n_scen, block), (0, 0)
    carry = (
        jnp.zeros(empty, dtype) if known else jnp.broadcast_to(terms.cash_usd, shape),
        jnp.ones(empty if known else shape, dtype),
        jnp.zeros(shape if sampled and not known else empty, period_dtype),
        jnp.zeros(shape, dtype),
        jnp.zeros(shape, dtype),
    )
    factors = _StepFactors(
        rent=paths.rent,
        ln_price=paths.ln_price,
        btc=paths.btc,
        eth=paths.eth,
        power=paths.power,
        rate=paths.rate,
        credit=paths.credit,
        btc_income_index=paths.btc_income_index,
        salvage_price=(
            paths.price * (1 - haircut)
            if haircut is not None
            else jnp.zeros((grid.periods, 0, 0), dtype)
        ),
        discount=discount if discount is not None else jnp.zeros((grid.periods, 0), dtype),
    )
    period_terms = _PeriodTerms(*(getattr(terms, name) for name in _PeriodTerms._fields))
    periods = jnp.arange(1, grid.periods + 1, dtype=period_dtype)  # t = 1..T
    xs = (factors, period_terms, hazard_base, periods)
    checkpoint = jax.checkpoint if remat_steps else (lambda fn: fn)
    if known:
        (_, survival, first, loss, defaulted_exposure), ys = lax.scan(
            checkpoint(price_known), carry, xs
        )
    else:
        first_period = jax.tree.map(lambda a: a[0], xs)
        x, cash = coverage(carry[0], *first_period)
        if grid.periods == 1:  # no loop: nothing to carry, no x_2 to discard
            carry, ys = events((cash, *carry[1:]), x, *first_period[:2], first_period[3])
            ys = jax.tree.map(lambda a: a[None], ys)
        else:
            # The last step's x_{T+1} (from period T's inputs again) is discarded. Peeling
            # period T's events out of the loop saves that 1/T of the coverage work but leaves
            # them to the enclosing program's fusion, and float32 losses then differ in the
            # last bit between program shapes (a sharded chunk against one device's).
            later = jax.tree.map(lambda a: jnp.concatenate([a[1:], a[-1:]]), xs)  # 2..T, T
            (carry, x), ys = lax.scan(checkpoint(step), ((cash, *carry[1:]), x), (xs, later))
        (_, survival, first, loss, defaulted_exposure) = carry
    if haircut is None:
        volume, expected = ys  # [T, S, G] each
        return _Volumes(volume, expected, first if sampled else None)
    default_probability = (defaults > 0).astype(dtype) if sampled else 1 - survival
    outcome = _BlockOutcome(loss, default_probability, defaulted_exposure)
    return (outcome, ys) if extras else outcome


def _period_dtype(periods: int):
    """The integer type of a period number t = 0..T (0: no default)."""
    return jnp.uint8 if periods < 256 else jnp.int32


class _Volumes(NamedTuple):
    """Pass 1 of one block."""

    volume: jax.Array  # [T, S, G] Q: the GPUs the block dumps, Σ n a d(t)
    expected_volume: jax.Array  # [T, S, G] Σ n a S(t−1) h(t) (conditional mode: Q itself)
    default_period: jax.Array | None  # [S, b] sampled mode: t_i, 0 without a default


class _BlockOutcome(NamedTuple):
    """Pass 2 of one block, [S, b] each (docs/spec.md §6 and the contributions table)."""

    loss: jax.Array  # Σ_t DF d ℓ
    default_probability: jax.Array  # 1 − S_i(T), or 1 if the loan defaulted (sampled)
    defaulted_exposure: jax.Array  # Σ_t DF d EAD


class _StepFactors(NamedTuple):
    rent: jax.Array  # [T, S, G]
    ln_price: jax.Array
    btc: jax.Array  # [T, S]
    eth: jax.Array
    power: jax.Array
    rate: jax.Array
    credit: jax.Array
    btc_income_index: jax.Array  # [T, S]
    salvage_price: jax.Array  # [T, S, G] P_g(t) (1 − H_g(t)) (pass 2) or [T, 0, 0]
    discount: jax.Array  # [T, S] or [T, 0]


class _PeriodTerms(NamedTuple):
    """The [T, b] leaves of `_LoanTerms` the period loop scans over (same names)."""

    fixed_income_usd: jax.Array  # [T, b]
    rent_hours: jax.Array
    debt_service_fixed_usd: jax.Array
    debt_service_per_rate_usd: jax.Array
    exposure_fixed_usd: jax.Array
    ln_gpus_per_balance: jax.Array
    active: jax.Array
    at_refinancing: jax.Array
    contract_income_usd: jax.Array  # [T, b], or [T, 0] for a book naming no offtaker
    contract_rent_hours: jax.Array
