"""Pathwise sensitivities of EL and ES_α to every assumption (docs/spec.md §7).

∂EL/∂θ = E[∂L/∂θ] and ∂ES_α/∂θ = E[∂L/∂θ | L >= VaR_α] (Hong & Liu 2009): reverse-mode AD of
the conditional-mode loss on common random numbers, the tail set and its coefficients fixed by
the forward pass. One backward pass per chunk gives the gradient for every parameter at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gpucredit.kernels.params import ModelParams
from gpucredit.portfolio.assumptions import Assumptions, parameter_paths, parameter_value
from gpucredit.portfolio.risk import LossTail, alpha_key, alpha_label, tail_sets
from gpucredit.portfolio.runner import LocalRunner, ProgressCallback, Runner, owner_of


@dataclass(frozen=True)
class Sensitivities:
    """One row per parameter (dotted path of docs/spec.md §10), in `parameter_paths` order."""

    parameter: tuple[str, ...]
    value: np.ndarray  # [P] the parameter's value in the run
    d_expected_loss: np.ndarray  # [P] ∂EL/∂θ, USD per unit of θ
    d_expected_shortfall: dict[str, np.ndarray]  # α key -> [P] ∂ES_α/∂θ
    el_scenarios: int  # scenarios the ∂EL estimate averages over

    def columns(self) -> dict[str, object]:
        cols: dict[str, object] = {
            "parameter": list(self.parameter),
            "value": self.value,
            "d_el_usd": self.d_expected_loss,
        }
        # Named by `alpha_label`: d_es_99_usd, d_es_99_9_usd.
        for key, values in self.d_expected_shortfall.items():
            cols[f"d_es_{alpha_label(float(key))}_usd"] = values
        return cols

    def move_sizes(self) -> np.ndarray:
        """[P] the move each parameter is ranked by (`parameter_moves`)."""
        return parameter_moves(self.parameter, self.value)[0]

    def largest(self, alpha: float, count: int = 10) -> list[tuple[str, float, float, float]]:
        """The `count` parameters with the largest |∂ES_α/∂θ × move|, as (parameter,
        ∂ES/∂θ, value, move)."""
        d_es = self.d_expected_shortfall[alpha_key(alpha)]
        moves = self.move_sizes()
        order = np.argsort(-np.abs(d_es * moves))[:count]
        return [
            (self.parameter[i], float(d_es[i]), float(self.value[i]), float(moves[i]))
            for i in order
        ]


SMALL_MOVE = 0.1
"""The absolute move of correlation entries and zero-valued parameters."""


def parameter_moves(parameter, value) -> tuple[np.ndarray, np.ndarray]:
    """(move [P], is_small [P]): the move each sensitivity is shown for, ΔES ≈ ∂ES/∂θ × move.
    100% of the parameter's value (θ to 2θ, so negative for a negative θ), or `SMALL_MOVE`
    for correlation entries and zero-valued parameters (is_small). The CLI's table and the
    report's tornado chart both use it."""
    value = np.asarray(value, dtype=np.float64)
    small = np.array([str(p).startswith("correlation.") for p in parameter], dtype=bool)
    small = small.reshape(value.shape) | (value == 0)
    return np.where(small, SMALL_MOVE, value), small


def gradient_by_path(
    assumptions: Assumptions, grads: ModelParams
) -> tuple[tuple[str, ...], np.ndarray]:
    """Flatten a ModelParams of gradients into the dotted parameter paths.

    The kernel symmetrises Σ before its Cholesky factor, so moving Σ_jk and Σ_kj together
    has gradient g_jk + g_kj.
    """
    names, values = [], []
    for path, field, index in parameter_paths(assumptions):
        leaf = np.asarray(getattr(grads, field), dtype=np.float64)
        if field == "correlation":
            j, k = index
            values.append(leaf[j, k] + leaf[k, j])
        else:
            values.append(leaf[index])
        names.append(path)
    return tuple(names), np.asarray(values)


def gradient_tasks(
    tails: dict[str, tuple[np.ndarray, np.ndarray]],
    n_scenarios: int,
    weights: np.ndarray | None,
    el_scenarios: int,
    chunk_size: int,
) -> tuple[list[str], list[tuple[np.ndarray, np.ndarray]], int]:
    """The pass-2 gradient tasks: (owner key of each task, (indices, coefficients) of each
    task, scenarios of the ∂EL estimate). `tails`: {α key: (scenario indices, coefficients)}
    (`risk.tail_sets`); the ∂EL task averages over the first `el_scenarios` of the run's
    `n_scenarios` (weighted by `weights` [S], likelihood ratios, when given). Every task has
    exactly `chunk_size` indices (padded with scenario 0 and coefficient 0): one compiled
    shape for all."""
    n_el = min(int(el_scenarios), int(n_scenarios))
    if n_el < 1:
        raise ValueError(f"the EL sensitivity needs at least one scenario, got {el_scenarios}")
    # Weights are importance sampling's likelihood ratios: p = w / S (risk.risk_measures).
    el_weights = np.ones(n_el) if weights is None else np.asarray(weights[:n_el], np.float64)
    jobs = {"el": (np.arange(n_el), el_weights / n_el), **tails}
    owners, items = [], []
    for key, (indices, coefficients) in jobs.items():
        pad = -len(indices) % chunk_size
        indices = np.concatenate([indices, np.zeros(pad, dtype=np.int64)]).astype(np.uint32)
        coefficients = np.concatenate([coefficients, np.zeros(pad)])
        for start in range(0, len(indices), chunk_size):
            owners.append(key)
            items.append(
                (indices[start : start + chunk_size], coefficients[start : start + chunk_size])
            )
    return owners, items, n_el


def gradient_of_chunk(backend, indices: np.ndarray, coefficients: np.ndarray) -> ModelParams:
    """Pass-2 task: Σ_j c_j ∂L(ω_j)/∂θ for every leaf θ of ModelParams over one chunk of tail
    scenarios (`weighted_gradient` of a gradient backend), as float64 NumPy arrays."""
    grads = backend.weighted_gradient(indices, coefficients)
    return ModelParams(*(np.asarray(leaf, dtype=np.float64) for leaf in grads))


def tail_sensitivities(
    simulation,
    assumptions: Assumptions,
    tails: dict[str, tuple[np.ndarray, np.ndarray]],
    n_scenarios: int,
    el_scenarios: int,
    chunk_size: int = 256,
    weights: np.ndarray | None = None,
    runner: Runner | None = None,
    owners: Sequence[tuple[int, int, str]] = (),
    progress: ProgressCallback | None = None,
) -> Sensitivities:
    """Sensitivities on `simulation` (a gradient `backends.Simulation`, or a built backend
    with `weighted_gradient(indices, coefficients) -> ModelParams`, Σ c_j ∂L_j).

    ∂EL averages over the first `el_scenarios` scenarios (all of them when that is at least
    the run's `n_scenarios`); ∂ES_α uses exactly the run's tail set of α (`tails`,
    `risk.tail_sets`). `weights` [S] are importance sampling's likelihood ratios
    (coefficients w/S, as in the run's measures). The `gradient_tasks` are mapped over
    `runner` (this process by default; each sent to the worker that ran pass 1 on its first
    index, `owners`) and added in task order, so every runner gives the same numbers.
    `progress(done, total)` counts scenarios differentiated (padding included).
    """
    runner = runner or LocalRunner()
    keys, items, n_el = gradient_tasks(tails, n_scenarios, weights, el_scenarios, chunk_size)
    affinity = [owner_of(owners, int(indices[0])) for indices, _ in items]
    results: list = [None] * len(items)
    total = len(items) * chunk_size
    for done, (position, grads, _) in enumerate(
        runner.map(simulation, gradient_of_chunk, items, affinity), start=1
    ):
        results[position] = grads
        if progress is not None:
            progress(done * chunk_size, total)
    totals: dict[str, np.ndarray] = {}
    for key, grads in zip(keys, results, strict=True):
        _, flat = gradient_by_path(assumptions, grads)
        totals[key] = flat if key not in totals else totals[key] + flat
    paths = parameter_paths(assumptions)
    return Sensitivities(
        parameter=tuple(p for p, _, _ in paths),
        value=np.array([parameter_value(assumptions.params, f, i) for _, f, i in paths]),
        d_expected_loss=totals.pop("el"),
        d_expected_shortfall=totals,
        el_scenarios=n_el,
    )


def compute_sensitivities(
    simulation,
    assumptions: Assumptions,
    losses_usd: np.ndarray,
    alphas: Sequence[float],
    el_scenarios: int,
    chunk_size: int = 256,
    weights: np.ndarray | None = None,
) -> Sensitivities:
    """`tail_sensitivities` over the tail sets of a run's every loss `losses_usd` [S], in
    this process."""
    tails = tail_sets(LossTail.of_run(losses_usd, weights, alphas), alphas)
    return tail_sensitivities(
        simulation, assumptions, tails, len(losses_usd), el_scenarios, chunk_size, weights
    )
