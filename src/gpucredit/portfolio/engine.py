"""The run (`simulate`, docs/spec.md, Data flow): pass 1, pass 2, the stresses and the metadata.

Pass 1 (portfolio/runner.py) streams scenario chunks through a backend
(portfolio/backends.py) and keeps per-loan sums and either every portfolio loss or, in
tails-only mode (the default beyond `settings.KEEP_LOSSES_MAX_SCENARIOS`), per batch its
largest losses, statistics and a histogram. Both give the same risk measures: VaR and ES from
the run's largest losses (`risk.LossTail`), standard errors from the same batches. The tail
scenarios of each α are then regenerated from their indices (pass 2): per-loan tail losses give
the Euler ES contributions and reverse-mode AD on the same scenarios gives the sensitivities.
Each pass is written once (runner.py, contributions.py, sensitivities.py) over a `Runner`
that only says where tasks execute (`runner.LocalRunner`, or `distributed.DaskRunner`), on a
`backends.Simulation` prepared once for the run and once per stress case.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gpucredit import __version__
from gpucredit.portfolio.assumptions import Assumptions
from gpucredit.portfolio.backends import Simulation, gradient_chunk_size
from gpucredit.portfolio.book import Book
from gpucredit.portfolio.calibration import (
    YEAR_ONE_MAX_SCENARIOS,
    calibration_table,
    paper_vs_path,
    year_one_assumptions,
)
from gpucredit.portfolio.config import RunConfig, RunMetadata
from gpucredit.portfolio.contributions import (
    Contributions,
    make_contributions,
    tail_contributions,
)
from gpucredit.portfolio.loans import loan_arrays
from gpucredit.portfolio.offtakers import offtaker_concentration
from gpucredit.portfolio.periods import loss_by_period
from gpucredit.portfolio.reverse_stress import DesignPoint, find_design_point
from gpucredit.portfolio.risk import (
    SUMMARY_FORMAT_VERSION,
    LossHistogram,
    LossTail,
    RiskMeasures,
    alpha_label,
    batch_count,
    largest_losses,
    risk_measures,
    risk_measures_from_tail,
    tail_sets,
    tail_size,
)
from gpucredit.portfolio.runner import (
    LocalRunner,
    Pass1,
    ProgressCallback,
    phase_progress,
    run_pass1,
    run_tails_pass1,
)
from gpucredit.portfolio.sensitivities import Sensitivities, tail_sensitivities
from gpucredit.portfolio.stress import StressCase, defaulted_offtakers


@dataclass(frozen=True)
class StressResult:
    """One stress scenario on the base run's random numbers, and its change from the base."""

    name: str
    description: str
    measures: RiskMeasures

    def deltas(self, base: RiskMeasures) -> dict[str, float]:
        """Stressed minus base, USD: ``el_usd``, ``var_99_usd``, ``es_99_9_usd``, ..."""
        out = {"el_usd": self.measures.el - base.el}
        for t in self.measures.tail:
            label = alpha_label(t.alpha)
            out[f"var_{label}_usd"] = t.var - base.var(t.alpha)
            out[f"es_{label}_usd"] = t.es - base.es(t.alpha)
        return out


TABLES = ("measures", "contributions", "sensitivities", "losses")
"""The tables a `RunResult` gives as Arrow or pandas (`RunResult.to_arrow`, `to_pandas`)."""


@dataclass(frozen=True)
class RunResult:
    """Everything one run produced (what `write_results` and the report consume).

    `losses_usd` is None in tails-only mode (``metadata["keep_losses"]`` False): no process
    held every loss; `tail` and `histogram` describe the distribution in both modes.

    In a notebook::

        result = gpucredit.simulate(book, assumptions, scenarios=100_000)
        result                                # the headline measures, % of exposure
        result.el, result.el_se               # USD, with its batch-means standard error
        result.es(0.999), result.es_se(0.999)
        result.to_pandas("contributions")     # one row per loan
    """

    losses_usd: np.ndarray | None  # [S] per-scenario loss, or None (tails-only mode)
    weights: np.ndarray | None  # [S] or None (equal weights)
    measures: RiskMeasures
    contributions: Contributions | None
    sensitivities: Sensitivities | None
    stress: tuple[StressResult, ...]
    metadata: dict
    tail: LossTail  # the largest losses (top `tail_size(S, alphas)`, ties kept) by scenario
    histogram: LossHistogram  # of every loss (risk.LossHistogram: power-of-two bins from 0)
    calibration: dict | None = None  # portfolio.calibration.calibration_table (None: not run)
    config: RunConfig | None = None  # the settings it ran with
    exposure_usd: float = float("nan")  # Σ balance_usd of the book
    loss_by_period: dict | None = None  # portfolio.periods.loss_by_period (None: not run)
    # portfolio.offtakers.offtaker_concentration, one row per offtaker (None: the book names none)
    offtakers: list[dict] | None = None

    @property
    def el(self) -> float:
        """Expected loss over the horizon, USD."""
        return self.measures.el

    @property
    def el_se(self) -> float:
        """The expected loss's batch-means standard error, USD."""
        return self.measures.el_se

    def var(self, alpha: float) -> float:
        """Value at risk at confidence `alpha` (one of the run's alphas), USD."""
        return self.measures.var(alpha)

    def var_se(self, alpha: float) -> float:
        """VaR's batch-means standard error, USD; nan where too few tail scenarios per batch
        make it unreliable (`warnings` says how many scenarios would do)."""
        return self.measures.at(alpha).reported().var_se

    def es(self, alpha: float) -> float:
        """Expected shortfall at confidence `alpha` (one of the run's alphas), USD."""
        return self.measures.es(alpha)

    def es_se(self, alpha: float) -> float:
        """ES's batch-means standard error, USD; nan where unreliable, as `var_se`."""
        return self.measures.at(alpha).reported().es_se

    @property
    def warnings(self) -> list[str]:
        """What a reader of the numbers should know: intervals left out for too few tail
        scenarios per batch (with the scenario count to raise)."""
        return self.measures.interval_warnings()

    def table(self, name: str = "measures") -> dict[str, np.ndarray]:
        """Columns of one of `TABLES`: ``measures`` (one row per measure: value, standard
        error, 95% interval, share of exposure), ``contributions`` (one row per loan),
        ``sensitivities`` (one row per parameter), ``losses`` (one row per scenario kept:
        every scenario, or the largest in tails-only mode)."""
        if name == "measures":
            return self._measures_table()
        if name == "losses":
            if self.losses_usd is not None:
                indices, losses = np.arange(len(self.losses_usd)), self.losses_usd
            else:
                indices, losses = self.tail.indices, self.tail.losses_usd
            columns = {"scenario": indices.astype(np.int64), "loss_usd": losses}
            if self.weights is not None and self.losses_usd is not None:
                columns["likelihood_ratio"] = self.weights
            return columns
        if name in ("contributions", "sensitivities"):
            part = getattr(self, name)
            if part is None:
                raise ValueError(f"this run computed no {name} (it was switched off)")
            return dict(part.columns())
        raise ValueError(f"unknown table {name!r}; choose one of {', '.join(TABLES)}")

    def _measures_table(self) -> dict[str, np.ndarray]:
        m = self.measures
        rows = [("el", None, m.el, m.el_se, m.el_ci)]
        for t in (t.reported() for t in m.tail):
            rows.append(("var", t.alpha, t.var, t.var_se, t.var_ci))
            rows.append(("es", t.alpha, t.es, t.es_se, t.es_ci))
        values = np.array([r[2] for r in rows], dtype=np.float64)
        return {
            "measure": np.array([r[0] for r in rows]),
            "alpha": np.array([np.nan if r[1] is None else r[1] for r in rows]),
            "value_usd": values,
            "standard_error_usd": np.array([r[3] for r in rows], dtype=np.float64),
            "ci_low_usd": np.array([r[4][0] for r in rows], dtype=np.float64),
            "ci_high_usd": np.array([r[4][1] for r in rows], dtype=np.float64),
            "share_of_exposure": values / self.exposure_usd,
        }

    def to_arrow(self, name: str = "measures"):
        """One of `TABLES` as a pyarrow Table."""
        import pyarrow as pa

        return pa.table(self.table(name))

    def to_pandas(self, name: str = "measures"):
        """One of `TABLES` as a pandas DataFrame (pandas must be installed)."""
        try:
            import pandas  # noqa: F401
        except ImportError:
            raise ImportError("to_pandas needs pandas: pip install pandas") from None
        return self.to_arrow(name).to_pandas()

    def _headline(self) -> list[tuple[str, float, float]]:
        """(label, value USD, standard error USD) of EL and each VaR and ES."""
        out = [("EL", self.el, self.el_se)]
        for t in (t.reported() for t in self.measures.tail):
            level = f"{100 * t.alpha:g}%"
            out += [(f"VaR {level}", t.var, t.var_se), (f"ES {level}", t.es, t.es_se)]
        return out

    def __repr__(self) -> str:
        md = self.metadata
        lines = [
            f"RunResult: {md.get('loans', '?')} loans, {md.get('scenarios', 0):,} scenarios, "
            f"{md.get('mode')} mode, {md.get('backend')} {md.get('precision')}, "
            f"exposure ${self.exposure_usd / 1e6:,.1f}m"
        ]
        for label, value, se in self._headline():
            lines.append(
                f"  {label:<10} ${value / 1e6:>12,.2f}m  {_plus_minus(se)}  "
                f"({value / self.exposure_usd:.2%} of exposure)"
            )
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from html import escape

        md = self.metadata
        rows = "".join(
            f"<tr><td>{escape(label)}</td><td>${value / 1e6:,.2f}m</td>"
            f"<td>{escape(_plus_minus(se))}</td><td>{value / self.exposure_usd:.2%}</td></tr>"
            for label, value, se in self._headline()
        )
        notes = "".join(f"<p>warning: {escape(w)}</p>" for w in self.warnings)
        caption = escape(
            f"{md.get('loans', '?')} loans, {md.get('scenarios', 0):,} scenarios, "
            f"{md.get('mode')} mode, exposure ${self.exposure_usd / 1e6:,.1f}m"
        )
        return (
            f"<table><caption>gpucredit run: {caption}</caption>"
            "<tr><th>measure</th><th>value</th><th>standard error</th><th>of exposure</th></tr>"
            f"{rows}</table>{notes}"
        )

    def summary(self) -> dict:
        """JSON-ready: every measure with its standard error and interval, stress deltas and
        the run's metadata (summary.json less what `io.results.write_results` adds)."""
        return {
            "format_version": SUMMARY_FORMAT_VERSION,
            "metadata": self.metadata,
            "measures": self.measures.to_dict(),
            "stress": {
                s.name: {
                    "description": s.description,
                    "measures": s.measures.to_dict(),
                    "change": s.deltas(self.measures),
                }
                for s in self.stress
            },
            "calibration": self.calibration,
            "loss_by_period": self.loss_by_period,
            "offtakers": self.offtakers,
            "warnings": self.warnings,
        }


def _plus_minus(se_usd: float) -> str:
    """'± 1.23m', or 'interval n/a' where the standard error is not reported."""
    return f"± {se_usd / 1e6:,.2f}m" if np.isfinite(se_usd) else "interval n/a"


PILOT_SEED_OFFSET = 0x9E3779B9  # the pilot run's seed: independent of the main run's numbers
PILOT_MAX_SCENARIOS = 20_000  # scenarios of the pilot run that places the importance shift


def importance_shift(
    book: Book,
    assumptions: Assumptions,
    seed: int,
    alpha: float = 0.999,
    pilot_scenarios: int = PILOT_MAX_SCENARIOS,
    backend: str = "auto",
    precision: str = "float32",
) -> tuple[np.ndarray, DesignPoint]:
    """The mean shift μ = z* [T, K] for importance sampling: the design point
    (`reverse_stress.find_design_point`) of the conditional-mode loss at the VaR_α of a plain
    pilot run. The pilot uses its own seed, so the shift does not depend on the main run's
    random numbers (the estimator stays unbiased for the shift it is given)."""
    pilot = simulate(
        book,
        assumptions,
        scenarios=pilot_scenarios,
        seed=(seed + PILOT_SEED_OFFSET) % 2**32,
        mode="conditional",
        backend=backend,
        precision=precision,
        alphas=(alpha,),
        contributions=False,
        sensitivities=False,
        calibration=False,
    )
    point = find_design_point(book, assumptions, pilot.var(alpha))
    return point.z, point


def simulate(
    book: Book,
    assumptions: Assumptions,
    config: RunConfig | None = None,
    *,
    stress: Sequence[StressCase] = (),
    progress: ProgressCallback | None = None,
    checkpoint=None,
    workers: int | None = None,
    scheduler: str | None = None,
    **settings,
) -> RunResult:
    """Run the book against the assumptions (docs/spec.md) and measure the loss distribution.

    The run's settings are a `RunConfig` (portfolio/config.py), given whole or as its keywords
    (`scenarios`, `seed`, `mode`, `backend`, `precision`, `chunk_size`, `alphas`,
    `contributions`, `sensitivities`, `el_sensitivity_scenarios`, `importance_sampling`,
    `normal_shift`, `keep_losses`, `calibration`), resolved against the assumptions and
    checked once::

        result = simulate(book, assumptions, scenarios=1_000_000, importance_sampling=True)

    Pass 1 keeps every per-scenario loss (`keep_losses` True) or, tails-only (False), per
    batch only its largest losses, statistics and histogram, with the same measures, tail sets,
    contributions and sensitivities and ``RunResult.losses_usd`` None; None (the default)
    keeps them up to `KEEP_LOSSES_MAX_SCENARIOS` scenarios (`resolve_keep_losses`). Pass 2
    revisits the tail scenarios of each α by index for Euler contributions and AD
    sensitivities. Stress scenarios rerun pass 1 with overridden assumptions on the same
    random numbers, measured against the base run's PD references. `progress`: a ``(done,
    total)`` callable sees pass 1; an object that also has ``phase(name, total)`` (the
    terminal and notebook display of io/progress.py) sees every phase: pass 1,
    contributions, the calibration's year-1 pass, sensitivities and each stress case
    (`runner.phase_progress`). `checkpoint` (optional) has
    `.done() -> dict[first, ChunkOutput | BatchOutput]` and `.save(first, output)` for resume
    (chunks when every loss is kept, batches in tails-only mode).
    `workers` (a local Dask cluster of that many processes) or `scheduler` (the address of an
    existing one) runs both passes on Dask (portfolio/distributed.py), with identical results.
    `importance_sampling` moves the mean of the systematic normals to `normal_shift` [T, K]
    (by default the design point of a pilot run at the largest α, `importance_shift`); every
    scenario then carries its likelihood ratio and all measures, contributions and
    sensitivities are weighted.
    `calibration` adds the calibration table (portfolio/calibration.py): a year-1 pass over
    the run's first `YEAR_ONE_MAX_SCENARIOS` scenarios gives each loan's year-1 default rate.
    `loss_by_period` adds the expected loss by default period (portfolio/periods.py, the
    NumPy reference on the run's first scenarios).
    """
    from gpucredit.kernels.jax_setup import configure_jax  # float64, XLA flags: before any JAX

    configure_jax()
    if config is None:
        config = RunConfig.resolve(assumptions, loans=len(book), **settings)
    elif settings:
        raise TypeError(f"simulate takes a RunConfig or its keywords, not both: {sorted(settings)}")
    if config.importance_sampling and config.normal_shift is None:
        shift, _ = importance_shift(
            book, assumptions, config.seed, max(config.alphas),
            min(config.scenarios, PILOT_MAX_SCENARIOS), config.backend, config.precision,
        )  # fmt: skip
        config = dataclasses.replace(config, normal_shift=shift)
    started = time.perf_counter()
    c = config
    scenarios, seed, mode, alphas, chunk = c.scenarios, c.seed, c.mode, c.alphas, c.chunk_size
    n_loans = len(book)
    # One prepared simulation for the run and one per stress case, every schedule computed
    # before any scenario runs (an undefined stress fails now); the runner builds each once.
    run = Simulation(
        c.backend, c.precision, assumptions.params, assumptions.grid(mode),
        loan_arrays(book, assumptions), seed, c.normal_shift,
    )  # fmt: skip
    stressed = [
        dataclasses.replace(
            run,
            params=case.assumptions.params,
            grid=case.assumptions.grid(mode),
            loans=loan_arrays(
                book,
                case.assumptions,
                base=assumptions,
                offtakers_default=defaulted_offtakers(case, book),
            ),  # fmt: skip
        )
        for case in stress
    ]
    if workers is not None or scheduler is not None:
        from gpucredit.portfolio.distributed import DaskRunner

        runner = DaskRunner(workers=workers, scheduler=scheduler)
    else:
        runner = LocalRunner()

    def pass1_of(simulation: Simulation, phase: str, checkpoint=None) -> Pass1:
        progress_ = phase_progress(progress, phase, scenarios)
        done = checkpoint.done() if checkpoint is not None else None
        save = checkpoint.save if checkpoint is not None else None
        if c.keep_losses:
            return run_pass1(simulation, scenarios, chunk, n_loans, progress_, done, save, runner)
        return run_tails_pass1(simulation, scenarios, chunk, alphas, progress_, done, save, runner)

    try:
        backend = runner.backend(run)  # what ran: name, device, precision for the metadata
        pass1 = pass1_of(run, "pass 1", checkpoint)
        weights = pass1.weights
        measures, tail = _measures_and_tail(pass1, alphas)
        tails = tail_sets(tail, alphas)  # {α key: (scenario indices, coefficients)}

        contrib = None
        if c.contributions:
            es_i = tail_contributions(
                run, tails, n_loans, runner=runner, owners=pass1.owners,
                progress=phase_progress(progress, "contributions", 0),
            )  # fmt: skip
            contrib = make_contributions(
                book,
                pass1.loan_expected_loss_usd,
                es_i,
                pass1.loan_horizon_pd,
                pass1.loan_mean_lgd,
            )

        calibration_table_ = None
        if c.calibration:
            calibration_table_ = _calibration(
                book, assumptions, run, pass1, contrib, runner, c, progress
            )

        sens = None
        sensitivities_seconds = 0.0
        # Sensitivities are derivatives of the conditional-mode loss (docs/spec.md §7); a sampled
        # run's tail set is driven by the default draws, so they are not computed there.
        if c.sensitivities and mode == "conditional":
            t0 = time.perf_counter()
            # The backend's precision, not the asked one: a NumPy run gets float64 gradients.
            gradient = dataclasses.replace(run, precision=backend.precision, gradient=True)
            sens = tail_sensitivities(
                gradient,
                assumptions,
                tails,
                scenarios,
                c.el_sensitivity_scenarios,
                chunk_size=gradient_chunk_size(),
                weights=weights,
                runner=runner,
                owners=pass1.owners,
                progress=phase_progress(progress, "sensitivities", 0),
            )
            sensitivities_seconds = time.perf_counter() - t0

        stress_results = []
        for case, simulation in zip(stress, stressed, strict=True):
            stress_measures, _ = _measures_and_tail(
                pass1_of(simulation, f"stress {case.name}"), alphas
            )
            stress_results.append(StressResult(case.name, case.description, stress_measures))
        cluster = runner.describe()
    finally:
        runner.close()
    by_period = None
    if c.loss_by_period:
        by_period = loss_by_period(
            book, assumptions, seed, scenarios, mode,
            progress=phase_progress(progress, "loss by period", 0),
        )  # fmt: skip

    concentration = offtaker_concentration(
        book, run.params, run.grid, run.loans, seed, pass1.losses_usd, weights, c.normal_shift,
        None if contrib is None else contrib.expected_loss_usd,
        None if contrib is None else contrib.expected_shortfall_usd,
    )  # fmt: skip

    if pass1.losses_usd is None:
        largest, histogram = pass1.tail, pass1.histogram
    else:  # with equal weights `tail` is the top k already; with weights, the whole run
        k = tail_size(scenarios, alphas)
        largest = tail if weights is None else largest_losses(pass1.losses_usd, k)
        histogram = LossHistogram.of(pass1.losses_usd)
    elapsed = time.perf_counter() - started
    metadata = RunMetadata(
        version=__version__,
        seed=seed,
        scenarios=scenarios,
        mode=mode,
        backend=backend.name,
        device=backend.device,
        precision=backend.precision,
        chunk_size=chunk,
        keep_losses=c.keep_losses,
        alphas=list(alphas),
        copula=assumptions.copula,
        t_dof=assumptions.t_dof if assumptions.copula == "t" else None,
        correlation_repaired=assumptions.correlation_repair is not None,
        importance_shift=None if c.normal_shift is None else c.normal_shift.tolist(),
        horizon_years=assumptions.horizon_years,
        steps_per_year=assumptions.steps_per_year,
        discount=assumptions.discount,
        loans=n_loans,
        book=book.source,
        pass1_seconds=pass1.elapsed_seconds,
        sensitivities_seconds=sensitivities_seconds,
        el_sensitivity_scenarios=sens.el_scenarios if sens is not None else None,
        elapsed_seconds=elapsed,
        scenarios_per_second=scenarios / pass1.elapsed_seconds,
        loan_periods_per_second=scenarios * n_loans * run.grid.periods / pass1.elapsed_seconds,
        estimator="plain Monte Carlo"
        if c.normal_shift is None
        else "importance sampling: systematic normals shifted to the design point",
        effective_sample_size=measures.effective_sample_size,
        sensitivities_of="the conditional-mode loss (docs/spec.md §7), on this run's tail set"
        if mode == "conditional"
        else "not computed in sampled mode: run --mode conditional for sensitivities",
        dask=cluster,
    )
    return RunResult(
        losses_usd=pass1.losses_usd,
        weights=weights,
        measures=measures,
        contributions=contrib,
        sensitivities=sens,
        stress=tuple(stress_results),
        metadata=metadata.to_dict(),
        tail=largest,
        histogram=histogram,
        calibration=calibration_table_,
        config=config,
        exposure_usd=float(np.sum(book.balance_usd)),
        loss_by_period=by_period,
        offtakers=concentration,
    )


def _calibration(book, assumptions, run: Simulation, pass1, contrib, runner, config, progress):
    """The calibration table of a run: the year-1 pass (the run's first scenarios, the same
    random numbers, on the first year of its grid), then `calibration_table`."""
    year_one = year_one_assumptions(assumptions)
    shift = run.normal_shift
    first_year_run = dataclasses.replace(
        run,
        params=year_one.params,
        grid=year_one.grid(run.grid.mode),
        loans=loan_arrays(book, year_one),
        normal_shift=None if shift is None else shift[: year_one.periods],
    )
    scenarios = min(YEAR_ONE_MAX_SCENARIOS, config.scenarios)
    first_year = run_pass1(
        first_year_run, scenarios, config.chunk_size, len(book), runner=runner,
        progress=phase_progress(progress, "calibration (year 1)", scenarios),
    )  # fmt: skip
    table = calibration_table(
        book,
        run.loans,
        assumptions,
        horizon_pd=pass1.loan_horizon_pd,
        year_one_pd=first_year.loan_horizon_pd,
        expected_loss_usd=pass1.loan_expected_loss_usd,
        mean_lgd=pass1.loan_mean_lgd,
        expected_shortfall_usd=None if contrib is None else contrib.expected_shortfall_usd,
    )
    table["year_one_scenarios"] = scenarios
    table["paper_vs_path"] = paper_vs_path(book, run.loans, assumptions)
    return table


def _measures_and_tail(pass1: Pass1, alphas: Sequence[float]) -> tuple[RiskMeasures, LossTail]:
    """The risk measures of a pass 1 and the `LossTail` its tail sets come from: the same
    `risk.risk_measures_from_tail` on the same largest losses and batches in both modes (with
    importance sampling: the weighted measures over every loss)."""
    if pass1.losses_usd is None:
        return risk_measures_from_tail(pass1.tail, pass1.batches, alphas), pass1.tail
    S = len(pass1.losses_usd)
    measures = risk_measures(
        pass1.losses_usd, pass1.weights, alphas, batch_count(S), likelihood_ratios=True
    )
    return measures, LossTail.of_run(pass1.losses_usd, pass1.weights, alphas)
