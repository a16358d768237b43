"""Reverse stress testing: the most likely systematic scenario in which the book loses X.

The design point z* is the shock path (all periods × factors of one scenario, in
standard-normal units) that minimises |z|²/2 subject to the conditional-mode loss
L̄(z) >= X (the FORM "most probable failure point"). L̄ is smooth, so z* is found with its
gradient by reverse-mode AD through the JAX kernels, with the improved Hasofer-Lind-Rackwitz-
Fiessler iteration (HL-RF with an Armijo step on a merit function). Under the t copula the
mixing variable is held at W = 1 (the χ² slots at 1); the shocks are still the t copula's
ε = Φ⁻¹(F_ν(x)) of the correlated normals x.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from gpucredit.kernels import jax_engine
from gpucredit.portfolio.assumptions import Assumptions
from gpucredit.portfolio.book import Book
from gpucredit.portfolio.loans import loan_arrays


class ReverseStressError(ValueError):
    """No design point: the target loss is out of reach or the search did not converge."""


# A design point farther than this from the central scenario is refused: |z*| = 12 has a
# likelihood ratio exp(-72) ~ 5e-32 (a probability below 1e-30 by FORM, Φ(-12) ~ 2e-33), far
# beyond any loss a book could be sized for, and importance sampling shifted there weights
# every scenario by about exp(-72), so every loss underflows.
MAX_DISTANCE = 12.0
# The search has diverged once an iterate is this far out (it may wander to |z| ~ 100 on a
# strongly curved limit state and still converge, so only far beyond that).
DIVERGED_DISTANCE = 1e3


@dataclass(frozen=True)
class DesignPoint:
    """The most likely scenario with loss >= target (docs/spec.md §2 factors, one scenario)."""

    target_loss_usd: float
    loss_usd: float  # L̄(z*)
    central_loss_usd: float  # L̄(0): every shock at its median
    z: np.ndarray  # [T, K] z*, standard-normal units (factor order of docs/spec.md §2)
    factor_names: tuple[str, ...]  # [K]
    iterations: int
    converged: bool
    loss_by_generation: dict[str, float]
    loss_by_borrower_type: dict[str, float]
    paths: dict[str, np.ndarray]  # factor -> [T+1] natural units at z* (index 0 = today)
    central_paths: dict[str, np.ndarray]  # the same at z = 0

    @property
    def distance(self) -> float:
        """|z*|: the reliability index β of FORM."""
        return float(np.linalg.norm(self.z))

    @property
    def log_likelihood_ratio(self) -> float:
        """ln φ(z*)/φ(0) = −|z*|²/2: how much less likely than the central scenario."""
        return -0.5 * self.distance**2

    def to_dict(self) -> dict:
        return {
            "target_loss_usd": self.target_loss_usd,
            "loss_usd": self.loss_usd,
            "central_loss_usd": self.central_loss_usd,
            "distance": self.distance,
            "log_likelihood_ratio": self.log_likelihood_ratio,
            "likelihood_ratio": float(np.exp(self.log_likelihood_ratio)),
            "iterations": self.iterations,
            "converged": self.converged,
            "factor_names": list(self.factor_names),
            "z": self.z.tolist(),
            "loss_by_generation": self.loss_by_generation,
            "loss_by_borrower_type": self.loss_by_borrower_type,
            "paths": {k: v.tolist() for k, v in self.paths.items()},
            "central_paths": {k: v.tolist() for k, v in self.central_paths.items()},
        }


def _normals(z: jnp.ndarray, chi2_slots: int) -> jnp.ndarray:
    """[1, T, K + ν] stream-0 normals from z [T, K]; the χ² slots are 1 so that W = ν/ν = 1."""
    ones = jnp.ones((z.shape[0], chi2_slots), z.dtype)
    return jnp.concatenate([z, ones], axis=1)[None]


def _named_paths(paths, generations: tuple[str, ...]) -> dict[str, np.ndarray]:
    out = {}
    for k, g in enumerate(generations):
        out[f"rent:{g} (USD/GPU-hour)"] = np.asarray(paths.rent_usd_per_hour[0, :, k])
        out[f"price:{g} (USD/GPU)"] = np.asarray(paths.price_usd[0, :, k])
    out["btc (USD)"] = np.asarray(paths.btc_usd[0])
    out["eth (USD)"] = np.asarray(paths.eth_usd[0])
    out["power (USD/kWh)"] = np.asarray(paths.power_usd_per_kwh[0])
    out["rate (decimal)"] = np.asarray(paths.base_rate[0])
    out["credit (std. normal, + benign)"] = np.asarray(paths.credit[0])
    return out


def _hlrf(value, value_and_grad, z, max_iterations: int, tolerance: float):
    """Improved HL-RF iteration (Zhang & Der Kiureghian 1995) on G(z) <= 0; `value` is G alone
    (the Armijo trials need no gradient)."""

    def merit(z, g, c):
        return 0.5 * float(jnp.sum(z * z)) + c * abs(g)

    iterations = 0
    for iteration in range(1, max_iterations + 1):
        iterations = iteration
        g, grad = value_and_grad(z)
        g = float(g)
        norm2 = float(jnp.sum(grad * grad))
        if not (np.isfinite(g) and np.isfinite(norm2)) or np.linalg.norm(z) > DIVERGED_DISTANCE:
            raise ReverseStressError(
                "the search for the design point diverged (the loss or its gradient is not "
                "finite, or the shocks grew beyond any plausible scenario): the target loss "
                "may be out of reach of the book"
            )
        if norm2 == 0.0:
            raise ReverseStressError(
                "the loss does not respond to the systematic shocks at this point: the "
                "target loss may be out of reach of the book"
            )
        # The closest point of the linearised limit state, then an Armijo step on the merit.
        step = (float(jnp.sum(grad * z)) - g) / norm2 * grad - z
        c = 2.0 * float(jnp.linalg.norm(z + step)) / np.sqrt(norm2) + 10.0
        current = merit(z, g, c)
        scale = 1.0
        while scale > 1e-4:
            g_new = float(value(z + scale * step))
            if merit(z + scale * step, g_new, c) <= current - 1e-4 * scale * float(
                jnp.sum(step * step)
            ):
                break
            scale *= 0.5
        moved = scale * float(jnp.linalg.norm(step))
        z = z + scale * step
        if moved <= tolerance * max(1.0, float(jnp.linalg.norm(z))):
            break
    return z, iterations


def _onto_limit_state(limit_state, z, target: float, steps: int = 60):
    """Scale z radially onto G = 0 (bisection on s in G(s z)), so L̄(z*) = X exactly."""
    if limit_state(z) <= 0:
        low, high = 0.0, 1.0
    else:
        low, high = 1.0, 2.0
        while limit_state(high * z) > 0:
            low, high = high, 2.0 * high
            if high > 64:
                raise ReverseStressError(
                    f"no scenario loses {target:,.0f} USD: the loss may be out of reach of the book"
                )
    for _ in range(steps):
        middle = 0.5 * (low + high)
        if limit_state(middle * z) > 0:
            low = middle
        else:
            high = middle
    return high * z


def _refuse_implausible(target: float, z: np.ndarray, loss: float, converged: bool) -> None:
    """A design point is refused, before anything samples around it, when it is not one: the
    search did not converge, the loss there is not finite, or it lies beyond MAX_DISTANCE."""
    distance = float(np.linalg.norm(z))
    if not (np.isfinite(distance) and np.isfinite(loss)):
        raise ReverseStressError(
            f"no design point for a loss of {target:,.6g} USD: the loss at the end of the "
            "search is not finite; the target loss may be out of reach of the book"
        )
    if distance > MAX_DISTANCE:
        raise ReverseStressError(
            f"the design point for a loss of {target:,.6g} USD lies |z*| = {distance:,.1f} "
            f"standard deviations from the central scenario (more than {MAX_DISTANCE:g}: a "
            "probability below 1e-30); no plausible scenario loses that much"
        )
    if not converged:
        raise ReverseStressError(
            f"the search for the design point of a loss of {target:,.6g} USD did not converge "
            f"(|z| = {distance:.2f}); the loss may respond too little to the systematic shocks "
            "near the target"
        )


def find_design_point(
    book: Book,
    assumptions: Assumptions,
    target_loss_usd: float,
    max_iterations: int = 200,
    tolerance: float = 1e-5,
) -> DesignPoint:
    """z* = argmin |z|²/2 subject to L̄(z) >= target (float64 JAX, conditional mode)."""
    grid = assumptions.grid("conditional")
    params = assumptions.params
    loans = loan_arrays(book, assumptions)
    blocks = jax_engine.prepare_loans(loans, jnp.float64, 512)
    chi2 = grid.chi2_slots
    target = float(target_loss_usd)
    if not (target > 0 and np.isfinite(target)):
        raise ReverseStressError(f"the target loss must be a positive number, got {target}")

    def loss_at(z):
        return jax_engine.loss_given_normals(params, grid, blocks, _normals(z, chi2))[0]

    def limit_state(z):  # G(z) = 1 − L̄(z)/X: the target is reached where G <= 0
        return 1.0 - loss_at(z) / target

    def log_limit_state(z):  # ln X − ln L̄(z): the same zero set, far less curved in the tail
        return jnp.log(target) - jnp.log(loss_at(z))

    value = jax.jit(limit_state)
    value_and_grad = jax.jit(jax.value_and_grad(limit_state))

    def converged_at(z) -> bool:
        g, grad = value_and_grad(z)
        # KKT: at the design point z* is parallel to ∇L̄ = −∇G (the clipped ratios make L̄
        # only piecewise smooth, so HL-RF can stall a little short; the radial step closes
        # the gap).
        norms = jnp.linalg.norm(grad) * jnp.linalg.norm(z) + 1e-300
        alignment = float(-jnp.sum(grad * z) / norms)
        return abs(float(g)) < 1e-6 and alignment > 0.99

    def search(g, g_and_grad):
        z, iterations = _hlrf(g, g_and_grad, z0, max_iterations, tolerance)
        return _onto_limit_state(lambda x: float(value(x)), z, target), iterations

    z0 = jnp.zeros((grid.periods, grid.n_factors), jnp.float64)
    g0 = value(z0)
    central_loss = target * (1.0 - float(g0))
    z, iterations, converged = z0, 0, True
    if float(g0) > 0:  # else the central scenario already loses X: z* = 0
        plain_error = None
        try:
            z, iterations = search(value, value_and_grad)
            converged = converged_at(z)
        except ReverseStressError as error:
            plain_error, converged = error, False
        if not converged and central_loss > 0:
            # The plain limit state is strongly curved when X is many times the central loss:
            # its linearised steps overshoot, and can land where no loan loses (a zero
            # gradient). Searching again on ln L̄, which grows about linearly in the shocks,
            # finds the same point; searches that converge above keep their numbers.
            z, iterations = search(
                jax.jit(log_limit_state), jax.jit(jax.value_and_grad(log_limit_state))
            )
            converged = converged_at(z)
        elif plain_error is not None:
            raise plain_error

    z_star = np.asarray(z)
    normals = _normals(jnp.asarray(z_star), chi2)
    per_loan = np.asarray(
        jax_engine.loss_given_normals(params, grid, blocks, normals, per_loan=True)
    )[0]

    _refuse_implausible(target, z_star, float(per_loan.sum()), converged)

    def split(column: np.ndarray) -> dict[str, float]:
        return {str(k): float(per_loan[column == k].sum()) for k in sorted(set(column))}

    return DesignPoint(
        target_loss_usd=target,
        loss_usd=float(per_loan.sum()),
        central_loss_usd=central_loss,
        z=z_star,
        factor_names=assumptions.factor_names,
        iterations=iterations,
        converged=converged,
        loss_by_generation=split(book.gpu_generation),
        loss_by_borrower_type=split(book.borrower_type),
        paths=_named_paths(
            jax_engine.factor_paths_jax(params, grid, normals), assumptions.generations
        ),
        central_paths=_named_paths(
            jax_engine.factor_paths_jax(params, grid, _normals(jnp.zeros_like(z), chi2)),
            assumptions.generations,
        ),
    )
