"""The `gpucredit` command. Bad input ends with a clear message and exit status 2, never a
traceback; everything else is a thin layer over the Python API.

Each command imports what it needs when it runs: importing this module (for `--help` or
`--version`) loads neither JAX nor pyarrow nor the engine (tests/test_layers.py checks it)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path

import click

from gpucredit import __version__
from gpucredit.portfolio.settings import BACKENDS, KEEP_LOSSES_MAX_SCENARIOS, MODES, PRECISIONS
from gpucredit.portfolio.stress import BUILTIN_STRESSES

EXIT_BAD_INPUT = 2

# The errors a user can fix (exit status 2) and those of a run that failed (1), by defining
# module and name. `friendly_errors` looks them up among the modules already imported (an
# error raised is an instance of a loaded class), so the CLI imports none of them to start.
BAD_INPUT_ERRORS = (
    ("gpucredit.io.book", "BookError"),
    ("gpucredit.io.book", "BookFormatError"),
    ("gpucredit.io.tapes", "TapeError"),
    ("gpucredit.portfolio.document", "AssumptionsError"),
    ("gpucredit.portfolio.settings", "EngineError"),
    ("gpucredit.portfolio.loans", "ScheduleError"),
)
RUN_FAILURE_ERRORS = (
    ("gpucredit.io.results", "ResultsError"),
    ("gpucredit.io.report", "ReportError"),
)


class FiniteFloatRange(click.FloatRange):
    """`click.FloatRange` that also refuses NaN (it compares false with every bound, so the
    range alone lets it through) and infinities."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number.", param, ctx)
        return number


class Count(click.ParamType):
    """A whole number of things (scenarios, loans, workers) written as `1000000`, `1_000_000`
    or `1e6`; fractions (`1.5`, `2.5e0`), negatives and values below `min` are refused.

    >>> Count(min=1).convert("1e6", None, None), Count().convert("1_000", None, None)
    (1000000, 1000)
    """

    name = "count"

    def __init__(self, min: int = 0):
        self.min = min

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            text, number = str(value), value
        else:
            text = str(value).strip()
            try:
                exact = Decimal(text)  # exact: 1e6 and 1_000_000 alike, no float rounding
            except InvalidOperation:
                exact = None
            if exact is None or not exact.is_finite() or exact != exact.to_integral_value():
                self.fail(
                    f"{value!r} is not a whole number (write e.g. 1000000, 1_000_000 or 1e6).",
                    param,
                    ctx,
                )
            number = int(exact)
        if number < 0:
            self.fail(f"{text} is negative: a count is a whole number >= {self.min}.", param, ctx)
        if number < self.min:
            self.fail(f"{text} is below the minimum, {self.min}.", param, ctx)
        return number


ALPHA = FiniteFloatRange(0, 1, min_open=True, max_open=True)  # a confidence level
SEED = click.IntRange(0, 2**32 - 1)
COUNT = Count(min=1)  # scenarios, chunk sizes, workers, loans: at least one
ASSUMPTIONS_HELP = (
    "Assumptions TOML file whose keys override the defaults (default: none, the defaults; "
    "see gpucredit assumptions)."
)
REPAIR_HELP = "Use the nearest correlation matrix when the assumptions' is not positive definite."


class RunFailure(Exception):
    """An error the user can act on (unwritable output, interrupted run, ...): exit status 1."""


def _loaded(errors: tuple[tuple[str, str], ...]) -> tuple[type[BaseException], ...]:
    """The classes of `errors` whose module is imported."""
    return tuple(
        getattr(sys.modules[module], name) for module, name in errors if module in sys.modules
    )


def friendly_errors(command):
    """Turn the errors a user can fix into a message on stderr and a non-zero status."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("interrupted: completed chunks are kept; rerun with --resume", err=True)
            sys.exit(130)
        except Exception as error:
            if isinstance(error, _loaded(BAD_INPUT_ERRORS)):
                _error(error)
                sys.exit(EXIT_BAD_INPUT)
            if isinstance(error, (RunFailure, *_loaded(RUN_FAILURE_ERRORS))):
                _error(error)
                sys.exit(1)
            # Not a bug of ours but of the environment or the input: a file that cannot be
            # read or written, a request larger than memory, input nested too deep.
            if isinstance(error, OSError):
                where = f"{error.filename}: " if error.filename else ""
                _error(f"{where}{error.strerror or error}")
                sys.exit(EXIT_BAD_INPUT)
            if isinstance(error, MemoryError):
                _error("not enough memory: lower --scenarios or --chunk-size")
                sys.exit(EXIT_BAD_INPUT)
            if isinstance(error, RecursionError):
                _error("the input is nested too deeply to read")
                sys.exit(EXIT_BAD_INPUT)
            raise

    return wrapper


def _error(error) -> None:
    """`error: ...` on stderr, every name in it shown as written (control characters escaped)."""
    from gpucredit.io.names import terminal

    click.echo(f"error: {terminal(error, keep_newlines=True)}", err=True)


def _shown(path) -> str:
    """A path for the terminal (control characters in it escaped)."""
    from gpucredit.io.names import terminal

    return terminal(path)


def _out_option(ctx, param, value):
    """--out: an empty path would write into the current directory; refuse it."""
    if value is not None and not str(value).strip():
        raise click.BadParameter("must not be empty: give a directory, e.g. --out results")
    return value


def _json_safe(value):
    """`value` with every infinity and NaN as None: JSON has neither (null instead)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if hasattr(value, "item") and callable(value.item):  # a NumPy scalar
        return _json_safe(value.item())
    return value


def _book_and_assumptions(book_path, assumptions_path, repair_correlation):
    from gpucredit.io.assumptions import load_assumptions
    from gpucredit.io.book import example_book_path, read_book

    assumptions = load_assumptions(assumptions_path, repair_correlation=repair_correlation)
    path = Path(book_path) if book_path else example_book_path()
    return read_book(path, assumptions), assumptions


# show_default: every command's --help shows each option's default (subcommands inherit it).
@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="gpucredit")
def main():
    """Monte Carlo credit risk for loan books secured by GPU fleets."""
    from gpucredit.kernels.jax_setup import configure_jax  # float64, XLA flags: before any JAX

    configure_jax()


# ----------------------------------------------------------------------------- run


@main.command()
@click.argument("book", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--assumptions", "assumptions_path", type=click.Path(dir_okay=False), help=ASSUMPTIONS_HELP
)
@click.option("--repair-correlation", is_flag=True, help=REPAIR_HELP)
@click.option(
    "--scenarios",
    type=COUNT,
    help="Scenarios to simulate, e.g. 100000, 100_000 or 1e5 (default: the assumptions').",
)
@click.option("--seed", type=SEED, help="Random seed below 2^32 (default: the assumptions').")
@click.option(
    "--mode",
    type=click.Choice(MODES),
    help="conditional: expected losses given each scenario's factors (smooth, differentiable); "
    "sampled: defaults drawn per borrower (default: the assumptions').",
)
@click.option(
    "--alpha",
    "alphas",
    type=ALPHA,
    multiple=True,
    help="Confidence level of VaR and ES, repeatable (default: the assumptions').",
)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="auto",
    help="Where the kernels run: auto picks one for this machine.",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="float32",
    help="Floating-point precision of the simulation.",
)
@click.option(
    "--chunk-size", type=COUNT, help="Scenarios per chunk (default: the backend's, for memory)."
)
@click.option("--no-sensitivities", is_flag=True, help="Skip the AD sensitivities of EL and ES.")
@click.option("--no-contributions", is_flag=True, help="Skip each loan's Euler contribution to ES.")
@click.option(
    "--stress",
    "stresses",
    multiple=True,
    help="Stress scenario name (repeatable): a built-in "
    f"({', '.join(BUILTIN_STRESSES)}) or a [[stress]] table of --assumptions. "
    'paper-metrics reruns the book with the PD anchor "today" (the infrastructure view).',
)
@click.option(
    "--no-calibration",
    is_flag=True,
    help="Skip the calibration table (model vs input PDs by borrower type and generation, "
    "and the paper-vs-path loans) and its year-1 pass.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="results",
    callback=_out_option,
    help="Directory for the results (its result files are replaced only when the run completes).",
)
@click.option(
    "--importance-sampling",
    is_flag=True,
    help="Shift the systematic shocks to the most likely scenario of the largest --alpha's VaR "
    "(found on a pilot run) and weight each scenario by its likelihood ratio.",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option(
    "--workers",
    type=COUNT,
    help="Run on a local Dask cluster of N processes (default: in this process).",
)
@click.option(
    "--scheduler",
    help="Run on the Dask cluster at this address, e.g. tcp://host:8786 (default: none).",
)
@click.option(
    "--tls-ca-file",
    type=click.Path(dir_okay=False, exists=True),
    help="With a tls:// --scheduler: the CA certificate that signed the cluster's "
    "(default: Dask's config, distributed.comm.tls.ca-file).",
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False, exists=True),
    help="With a tls:// --scheduler: this client's certificate "
    "(default: Dask's config, distributed.comm.tls.client.cert).",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False, exists=True),
    help="With a tls:// --scheduler: this client's private key "
    "(default: Dask's config, distributed.comm.tls.client.key).",
)
@click.option(
    "--keep-losses/--tails-only",
    "keep_losses",
    default=None,
    help="Keep every per-scenario loss (and write losses.parquet), or only each batch's largest "
    "losses and statistics (tails-only: same measures, contributions and sensitivities, "
    f"tail_losses.parquet instead). Default: keep them up to {KEEP_LOSSES_MAX_SCENARIOS:,} "
    "scenarios.",
)
@click.option("--quiet", is_flag=True, help="No progress or notes on stderr; the summary only.")
@friendly_errors
def run(
    book,
    assumptions_path,
    repair_correlation,
    scenarios,
    seed,
    mode,
    alphas,
    backend,
    precision,
    chunk_size,
    no_sensitivities,
    no_contributions,
    stresses,
    no_calibration,
    out,
    importance_sampling,
    resume,
    workers,
    scheduler,
    tls_ca_file,
    tls_cert,
    tls_key,
    keep_losses,
    quiet,
):
    """Simulate BOOK (default: the embedded example) and report EL, VaR and ES."""
    if workers is not None and scheduler is not None:
        raise click.UsageError("--workers and --scheduler are mutually exclusive")
    tls = {
        "distributed.comm.tls.ca-file": tls_ca_file,
        "distributed.comm.tls.client.cert": tls_cert,
        "distributed.comm.tls.client.key": tls_key,
    }
    tls = {key: value for key, value in tls.items() if value is not None}
    if tls and scheduler is None:
        raise click.UsageError("--tls-ca-file, --tls-cert and --tls-key go with --scheduler")
    from gpucredit.io.progress import RunProgress
    from gpucredit.io.results import (
        RESULT_FILES,
        Checkpoint,
        OutputLock,
        prepare_output_dir,
        refuse_overwriting_inputs,
        write_results,
    )
    from gpucredit.io.summary_text import print_run_summary
    from gpucredit.portfolio.config import RunConfig
    from gpucredit.portfolio.engine import simulate
    from gpucredit.portfolio.loans import check_schedules
    from gpucredit.portfolio.stress import stress_case

    loans, assumptions = _book_and_assumptions(book, assumptions_path, repair_correlation)
    cases = [stress_case(assumptions, name, repair_correlation) for name in stresses]
    config = RunConfig.resolve(  # every setting resolved and checked once, here
        assumptions,
        scenarios=scenarios,
        seed=seed,
        mode=mode,
        backend=backend,
        precision=precision,
        chunk_size=chunk_size,
        alphas=alphas or None,
        contributions=not no_contributions,
        sensitivities=not no_sensitivities,
        keep_losses=keep_losses,
        calibration=not no_calibration,
        importance_sampling=importance_sampling,
        loans=len(loans),
    )
    for a in (assumptions, *(case.assumptions for case in cases)):
        check_schedules(loans, a)  # before the output directory exists
    out_dir = Path(out)
    inputs = {"book": book, "assumptions file": assumptions_path}
    refuse_overwriting_inputs(out_dir, inputs, RESULT_FILES)
    out_dir = prepare_output_dir(out_dir)
    # The directory is this run's until it ends: a second run into it is refused.
    with OutputLock(out_dir):
        Checkpoint.preflight(out_dir, resume)  # before the importance-sampling pilot
        if config.importance_sampling:
            config = _importance_shift(loans, assumptions, config, quiet)
        checkpoint = Checkpoint(
            out_dir,
            loans,
            assumptions,
            config.scenarios,
            config.seed,
            config.mode,
            config.backend,
            config.precision,
            resume,
            chunk_size=config.chunk_size,
            importance_sampling=config.importance_sampling,
            normal_shift=config.normal_shift,
            alphas=config.alphas,
        )
        with RunProgress(quiet) as progress:
            progress.note(
                f"gpucredit {__version__}: {len(loans):,} loans, {config.scenarios:,} scenarios, "
                f"{config.mode} mode, seed {config.seed}"
                + (", importance sampling" if config.importance_sampling else "")
                + ("" if config.keep_losses else ", tails-only pass 1")
            )
            with _dask_config(tls):
                result = simulate(
                    loans,
                    assumptions,
                    config,
                    stress=cases,
                    progress=progress,
                    checkpoint=checkpoint,
                    workers=workers,
                    scheduler=scheduler,
                )
        if result.sensitivities is None and not no_sensitivities and not quiet:
            click.echo(f"sensitivities: {result.metadata['sensitivities_of']}", err=True)
        written = write_results(result, out_dir, loans, assumptions)
        checkpoint.clear()
    print_run_summary(result)
    if not quiet:
        click.echo(f"results: {', '.join(_shown(p) for p in written)}", err=True)


def _importance_shift(loans, assumptions, config, quiet):
    """`config` with the importance-sampling shift: the design point of the largest α's VaR,
    found on a pilot run with its own seed."""
    from gpucredit.portfolio.engine import PILOT_MAX_SCENARIOS, importance_shift
    from gpucredit.portfolio.reverse_stress import ReverseStressError

    level = max(config.alphas)
    if not quiet:
        click.echo(f"importance sampling: design point of VaR {level:g} (pilot run)", err=True)
    try:
        normal_shift, point = importance_shift(
            loans, assumptions, config.seed, level,
            min(config.scenarios, PILOT_MAX_SCENARIOS), config.backend, config.precision,
        )  # fmt: skip
    except ReverseStressError as error:
        raise RunFailure(f"importance sampling: {error}") from None
    if not quiet:
        click.echo(f"importance sampling: shift |z*| = {point.distance:.3f}", err=True)
    return dataclasses.replace(config, normal_shift=normal_shift)


def _dask_config(settings: dict):
    """Dask's configuration with `settings` (the TLS files) for the run; nothing to do (and
    Dask not imported) without them."""
    if not settings:
        return contextlib.nullcontext()
    import dask

    return dask.config.set(settings)


# ----------------------------------------------------------------------------- others


@main.command()
@click.argument("book", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--assumptions", "assumptions_path", type=click.Path(dir_okay=False), help=ASSUMPTIONS_HELP
)
@click.option("--repair-correlation", is_flag=True, help=REPAIR_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@friendly_errors
def validate(book, assumptions_path, repair_correlation, as_json):
    """Validate BOOK (default: the embedded example) and print today's summary (exposure, LTV,
    coverage) and the loans whose central path cannot pay their debt service or refinance their
    balloon (paper vs path)."""
    from gpucredit.io.summary_text import print_book_summary, print_paper_vs_path
    from gpucredit.portfolio.calibration import paper_vs_path
    from gpucredit.portfolio.loans import loan_arrays
    from gpucredit.portfolio.summary import book_summary

    loans, assumptions = _book_and_assumptions(book, assumptions_path, repair_correlation)
    summary = book_summary(loans, assumptions)
    flagged = paper_vs_path(loans, loan_arrays(loans, assumptions), assumptions)
    if as_json:
        document = _json_safe(summary | {"paper_vs_path": flagged})  # null, never Infinity
        click.echo(json.dumps(document, indent=2, allow_nan=False))
    else:
        print_book_summary(summary)
        print_paper_vs_path(flagged, total_loans=len(loans))


@main.command()
@click.option("--matrix", is_flag=True, help="Print the assembled correlation matrix.")
@click.option(
    "--assumptions",
    "assumptions_path",
    type=click.Path(dir_okay=False),
    help="With --matrix: assemble the matrix of this assumptions file (default: the defaults').",
)
@click.option("--repair-correlation", is_flag=True, help=REPAIR_HELP)
@friendly_errors
def assumptions(matrix, assumptions_path, repair_correlation):
    """Print the default assumptions file (or, with --matrix, the correlation matrix)."""
    from gpucredit.io.assumptions import (
        assembled_matrix_text,
        default_assumptions_text,
        load_assumptions,
    )

    if not matrix:
        click.echo(default_assumptions_text(), nl=False)
        return
    loaded = load_assumptions(assumptions_path, repair_correlation=repair_correlation)
    click.echo(assembled_matrix_text(loaded), nl=False)


@main.command("make-book")
@click.option("--loans", "n_loans", type=COUNT, required=True, help="Loans, e.g. 2000 or 1e6.")
@click.option("--seed", type=SEED, default=0, help="Random seed below 2^32.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    callback=_out_option,
    required=True,
    help="File to write; its extension names the format: .parquet, .arrow or .feather "
    "(Arrow IPC), .csv, or .xlsx (the extra excel).",
)
@friendly_errors
def make_book_command(n_loans, seed, out):
    """Write a reproducible synthetic book of realistic borrowers in the format --out's
    extension names."""
    from gpucredit.io.book import book_write_format, write_book
    from gpucredit.portfolio.makebook import make_book

    book_write_format(out)  # an unknown extension is refused before any work
    try:
        path = write_book(make_book(n_loans, seed), out)
    except OSError as error:
        raise RunFailure(f"cannot write {out}: {error.strerror or error}") from None
    click.echo(f"wrote {n_loans:,} loans to {_shown(path)}")


@main.command()
@click.option("--markdown", is_flag=True, help="Print docs/schema.md (Markdown) instead.")
@click.option(
    "--template",
    "template_path",
    type=click.Path(dir_okay=False),
    callback=_out_option,
    help="Write a one-loan example book to this file, in the format its extension names "
    "(.parquet, .arrow, .feather, .csv, .xlsx) (default: none, print the schema).",
)
@friendly_errors
def schema(markdown, template_path):
    """Print the book schema: every column's type, unit, default, rule and meaning
    (docs/schema.md), or write a template book to start from."""
    from gpucredit.io.schema import HEADER, schema_markdown, schema_rows, write_template

    if template_path is not None:
        from gpucredit.io.book import book_write_format

        book_write_format(template_path)  # an unknown extension is refused clearly
        try:
            path = write_template(template_path)
        except OSError as error:
            raise RunFailure(f"cannot write {template_path}: {error.strerror or error}") from None
        click.echo(f"wrote a one-loan template book to {_shown(path)}")
        return
    if markdown:
        click.echo(schema_markdown(), nl=False)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*HEADER, title="Book schema (docs/schema.md)", show_lines=False)
    table.columns[0].no_wrap = True
    for row in schema_rows():
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 160).print(table)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
@friendly_errors
def report(directory):
    """Re-render report.html from the files of a results DIRECTORY."""
    from gpucredit.io.report import render_report_from_dir

    path = render_report_from_dir(Path(directory))
    click.echo(f"wrote {_shown(path)}")


@main.command("reverse-stress")
@click.argument("book", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--assumptions", "assumptions_path", type=click.Path(dir_okay=False), help=ASSUMPTIONS_HELP
)
@click.option("--repair-correlation", is_flag=True, help=REPAIR_HELP)
@click.option(
    "--loss",
    "loss_usd",
    type=FiniteFloatRange(min=0, min_open=True),
    help="Target portfolio loss in USD, e.g. 1e9 (default: none, the VaR at --alpha).",
)
@click.option(
    "--alpha",
    type=ALPHA,
    help="Target the VaR at this level from a plain run (default 0.999 when --loss is absent).",
)
@click.option(
    "--scenarios",
    type=COUNT,
    default=20_000,
    help="Scenarios of the plain run that finds the VaR (with --alpha).",
)
@click.option("--seed", type=SEED, help="Random seed of that run (default: the assumptions').")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    callback=_out_option,
    default="results",
    help="Directory for reverse_stress.json (its report is re-rendered when there is one).",
)
@friendly_errors
def reverse_stress(
    book, assumptions_path, repair_correlation, loss_usd, alpha, scenarios, seed, out
):
    """The most likely systematic scenario in which BOOK loses --loss (or its VaR at --alpha)."""
    from gpucredit.io.results import (
        REPORT_FILE,
        REVERSE_STRESS_FILE,
        OutputLock,
        prepare_output_dir,
        refuse_overwriting_inputs,
    )
    from gpucredit.portfolio.loans import check_schedules

    if loss_usd is not None and alpha is not None:
        raise click.UsageError("give --loss or --alpha, not both")
    loans, assumptions = _book_and_assumptions(book, assumptions_path, repair_correlation)
    check_schedules(loans, assumptions)  # before the output directory exists
    out_dir = Path(out)
    inputs = {"book": book, "assumptions file": assumptions_path}
    refuse_overwriting_inputs(out_dir, inputs, (REVERSE_STRESS_FILE, REPORT_FILE))
    out_dir = prepare_output_dir(out_dir)
    with OutputLock(out_dir):  # never while a run writes into the directory
        _reverse_stress(loans, assumptions, out_dir, loss_usd, alpha, scenarios, seed)


def _reverse_stress(loans, assumptions, out_dir, loss_usd, alpha, scenarios, seed):
    """The design point of `loss_usd` (or of the VaR at `alpha`), written to out_dir."""
    from gpucredit.io.results import REVERSE_STRESS_FILE, SUMMARY_FILE, input_hashes, write_json
    from gpucredit.io.summary_text import print_design_point
    from gpucredit.portfolio.engine import simulate
    from gpucredit.portfolio.reverse_stress import ReverseStressError, find_design_point

    if loss_usd is None:
        alpha = alpha or 0.999
        plain = simulate(
            loans,
            assumptions,
            scenarios=scenarios,
            seed=seed,
            mode="conditional",
            alphas=(alpha,),
            contributions=False,
            sensitivities=False,
            calibration=False,
        )
        loss_usd = plain.var(alpha)
        click.echo(f"target: VaR {alpha:.4g} of a {scenarios:,}-scenario run = {loss_usd:,.0f} USD")
    try:
        point = find_design_point(loans, assumptions, loss_usd)
    except ReverseStressError as error:
        raise RunFailure(str(error)) from None
    # The book and assumptions it is of: a run's report shows it only when they are the run's.
    metadata = {"version": __version__} | input_hashes(loans, assumptions)
    write_json(out_dir / REVERSE_STRESS_FILE, point.to_dict() | {"metadata": metadata})
    if (out_dir / SUMMARY_FILE).exists():
        from gpucredit.io.report import render_report_from_dir

        render_report_from_dir(out_dir)
    print_design_point(point)


@main.command("validate-model")
@click.option("--quick", is_flag=True, help="The short form (about a minute; run by make test).")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    callback=_out_option,
    default="validation",
    help="Directory for validation.html and validation.json.",
)
@click.option("--seed", type=SEED, default=0, help="Random seed below 2^32.")
@friendly_errors
def validate_model(quick, out, seed):
    """Run the model validation checks; write validation.html and validation.json.

    Exit status 1 when any check fails (the files are written first)."""
    from gpucredit.io.assumptions import default_assumptions
    from gpucredit.io.book import example_book_path, read_book
    from gpucredit.io.results import prepare_output_dir
    from gpucredit.io.validation_report import write_validation
    from gpucredit.portfolio.validation import run_validation

    out_dir = prepare_output_dir(Path(out))
    base = default_assumptions()
    result = run_validation(
        base,
        read_book(example_book_path(), base),
        quick=quick,
        seed=seed,
        progress=lambda message: click.echo(message, err=True),
    )
    written = write_validation(result, out_dir)
    for check in result.failed:
        click.echo(f"FAILED: {check.name} ({check.tolerance})", err=True)
    verdict = "passed" if result.passed else "FAILED"
    click.echo(
        f"validate-model: {len(result.checks) - len(result.failed)}/{len(result.checks)} checks "
        f"{verdict} in {result.metadata['elapsed_seconds']:.0f} s; "
        f"{', '.join(_shown(p) for p in written)}"
    )
    if not result.passed:
        sys.exit(1)


@main.command("bench")
@click.option("--quick", is_flag=True, help="Small sizes: about a minute on a CPU.")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    callback=_out_option,
    default="bench/results",
    help="Directory for <device>.json and <device>.md.",
)
@click.option("--name", default=None, help="Results file name (default: the device).")
@friendly_errors
def bench_command(quick, out, name):
    """Benchmark throughput, scaling, memory and the roofline on this machine.

    Checks every backend against the NumPy reference first, then times each case in its own
    process and writes OUT/<device>.json and OUT/<device>.md.
    """
    from gpucredit.benchmark import run_benchmarks

    try:
        report = run_benchmarks(quick=quick, out_dir=out, name=name, echo=click.echo)
    except RuntimeError as error:  # the correctness check failed: nothing was timed
        raise RunFailure(str(error)) from None
    failed = [r for r in report["cases"] if "error" in r and "skipped" not in r["error"]]
    if failed:
        raise RunFailure(f"{len(failed)} benchmark case(s) failed; see {_shown(out)}")


if __name__ == "__main__":
    main()
