"""The `gpucredit` command end to end: exit statuses, messages, outputs, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from gpucredit.cli import main
from gpucredit.io.book import write_book
from gpucredit.io.results import summary_schema
from gpucredit.portfolio.makebook import make_book


@pytest.fixture(scope="module")
def small_book(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("book") / "book.parquet"
    write_book(make_book(40, seed=3), path)
    return path


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_assumptions_prints_the_default_file_and_the_matrix():
    text = invoke("assumptions").output
    assert "[generations.H100]" in text and "depreciation" in text
    matrix = invoke("assumptions", "--matrix").output
    assert "rent:H100" in matrix and "credit" in matrix


def test_validate_prints_the_summary(small_book):
    result = invoke("validate", str(small_book))
    assert result.exit_code == 0
    assert "40 loans" in result.output and "LTV" in result.output


def _paper_vs_path(path: Path) -> dict:
    from gpucredit.io.assumptions import default_assumptions
    from gpucredit.io.book import read_book
    from gpucredit.portfolio.calibration import paper_vs_path
    from gpucredit.portfolio.loans import loan_arrays

    assumptions = default_assumptions()
    book = read_book(path, assumptions)
    return paper_vs_path(book, loan_arrays(book, assumptions), assumptions)


def _starved_book(tmp_path: Path) -> Path:
    """40 loans, every other one with no contract, cash, crypto or other income and 5%
    utilization: those cannot pay their debt service on their central path."""
    table = make_book(40, seed=3)
    starved = np.arange(table.num_rows) % 2 == 0
    for name, value in (
        ("utilization", 0.05),
        ("contracted_share", 0.0),
        ("cash_usd", 0.0),
        ("btc_units", 0.0),
        ("eth_units", 0.0),
        ("other_income_usd_per_year", 0.0),
    ):
        column = table.column(name).to_numpy(zero_copy_only=False).copy()
        column[starved] = value
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, pa.array(column, type=table.schema.field(name).type))
    path = tmp_path / "starved.parquet"
    write_book(table, path)
    return path


def test_validate_prints_the_paper_vs_path_loans(tmp_path):
    """The loans whose central path cannot pay: the count, the share of exposure and the
    largest few; --json carries every one."""
    book = _starved_book(tmp_path)
    expected = _paper_vs_path(book)
    assert expected["loans"] >= 20, "every starved loan falls short"
    result = invoke("validate", str(book))
    assert result.exit_code == 0, result.output
    share = f"{100 * expected['exposure_share']:.1f}%"
    assert (
        f"paper vs path: {expected['loans']} of 40 loans, {share} of exposure, cannot pay on "
        "their central path" in " ".join(result.output.split())
    )
    largest = sorted(expected["rows"], key=lambda r: -r["balance_usd"])
    shown = [r["loan_id"] for r in largest[:5]]
    assert all(loan_id in result.output for loan_id in shown)
    assert all(r["loan_id"] not in result.output for r in largest[5:])
    assert f"and {expected['loans'] - 5} more" in result.output
    assert "debt service" in result.output
    summary = json.loads(invoke("validate", str(book), "--json").output)
    assert summary["paper_vs_path"] == expected
    assert summary["loans"] == 40  # the book summary is unchanged


def test_validate_says_when_no_central_path_falls_short(tmp_path):
    """Ample cash and fully amortizing loans: every central path pays."""
    path = _book_with(tmp_path, cash_usd=1e12, amortization="linear", maturity_years=2.0)
    assert _paper_vs_path(path)["loans"] == 0
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "paper vs path: none" in result.output and "Largest paper-vs-path" not in result.output


def test_validate_refuses_a_bad_book_with_status_2(tmp_path):
    table = make_book(10, seed=1)
    pd = table.column("pd_annual").to_numpy().copy()
    pd[3] = 1.5
    bad = tmp_path / "bad.parquet"
    write_book(table.set_column(table.schema.get_field_index("pd_annual"), "pd_annual", [pd]), bad)
    result = CliRunner().invoke(main, ["validate", str(bad)])
    assert result.exit_code == 2
    loan_id = table.column("loan_id")[3].as_py()
    assert f"loan_id={loan_id}" in result.output and "pd_annual" in result.output
    assert "Traceback" not in result.output


def test_not_a_book_and_bad_assumptions_exit_2(tmp_path):
    junk = tmp_path / "junk.parquet"
    junk.write_text("hello")
    assert CliRunner().invoke(main, ["validate", str(junk)]).exit_code == 2
    bad = tmp_path / "a.toml"
    bad.write_text("[model]\nbeta_liquidty = 1.0\n")
    result = CliRunner().invoke(main, ["assumptions", "--matrix", "--assumptions", str(bad)])
    assert result.exit_code == 2 and "beta_liquidty" in result.output


def test_make_book_is_reproducible(tmp_path):
    a, b = tmp_path / "a.arrow", tmp_path / "b.arrow"
    invoke("make-book", "--loans", "25", "--seed", "9", "--out", str(a))
    invoke("make-book", "--loans", "25", "--seed", "9", "--out", str(b))
    assert a.read_bytes() == b.read_bytes()


RUN_ARGS = ["--backend", "numpy", "--no-sensitivities", "--scenarios", "640", "--quiet"]


def test_run_writes_every_result_file(small_book, tmp_path):
    out = tmp_path / "results"
    result = invoke("run", str(small_book), *RUN_ARGS, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "ES 99.9%" in result.output
    files = {p.name for p in out.iterdir()}
    assert {"summary.json", "losses.parquet", "contributions.parquet", "report.html"} <= files
    assert not any(name.endswith(".tmp") for name in files)
    assert not (out / ".checkpoint").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metadata"]["scenarios"] == 640
    assert len(summary["metadata"]["book_sha256"]) == 64
    assert len(summary["metadata"]["book_file_sha256"]) == 64
    losses = pq.read_table(out / "losses.parquet").column("loss_usd").to_numpy()
    assert summary["measures"]["el_usd"] == pytest.approx(losses.mean(), rel=1e-12)
    jsonschema.validate(summary, summary_schema())  # the CLI run's too
    # The calibration table, in summary.json, the terminal and the report.
    calibration = summary["calibration"]
    assert calibration["book"]["loans"] == 40
    assert calibration["paper_vs_path"] == _paper_vs_path(small_book)
    assert "calibration (whole book): year-1 default rate" in result.output
    assert f"paper vs path: {calibration['paper_vs_path']['loans']} of 40 loans" in result.output
    assert '<section id="calibration">' in (out / "report.html").read_text()


def test_run_without_calibration_and_the_stress_help(small_book, tmp_path):
    out = tmp_path / "results"
    args = ["run", str(small_book), *RUN_ARGS, "--no-calibration", "--no-contributions"]
    result = invoke(*args, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["calibration"] is None
    assert "calibration (whole book)" not in result.output
    assert "Calibration: not computed" in (out / "report.html").read_text()
    help_text = " ".join(invoke("run", "--help").output.split())
    assert "--no-calibration" in help_text
    assert "paper-metrics" in help_text.replace("paper- metrics", "paper-metrics")


def test_run_tails_only_writes_the_tail_and_the_same_numbers(small_book, tmp_path):
    """--tails-only: no losses.parquet, tail_losses.parquet and the histogram instead; the
    same measures and contributions as --keep-losses; `gpucredit report` re-renders it."""
    tails, full = tmp_path / "tails", tmp_path / "full"
    result = invoke("run", str(small_book), *RUN_ARGS, "--tails-only", "--out", str(tails))
    assert result.exit_code == 0, result.output
    assert "tails-only pass 1" in result.output and "ES 99.9%" in result.output
    files = {p.name for p in tails.iterdir()}
    assert "losses.parquet" not in files
    assert {"summary.json", "tail_losses.parquet", "contributions.parquet", "report.html"} <= files
    summary = json.loads((tails / "summary.json").read_text())
    assert summary["metadata"]["keep_losses"] is False
    assert sum(summary["loss_histogram"]["counts"]) == 640
    assert "Tails-only run" in (tails / "report.html").read_text()

    result = invoke("run", str(small_book), *RUN_ARGS, "--keep-losses", "--out", str(full))
    assert result.exit_code == 0, result.output
    kept = json.loads((full / "summary.json").read_text())
    assert kept["metadata"]["keep_losses"] is True
    assert kept["measures"] == summary["measures"]
    assert kept["loss_histogram"] == summary["loss_histogram"]
    assert pq.read_table(full / "contributions.parquet").equals(
        pq.read_table(tails / "contributions.parquet")
    )
    losses = pq.read_table(full / "losses.parquet").column("loss_usd").to_numpy()
    tail = pq.read_table(tails / "tail_losses.parquet").to_pydict()
    np.testing.assert_array_equal(losses[tail["scenario"]], tail["loss_usd"])
    assert min(tail["loss_usd"]) <= summary["measures"]["tail"]["99"]["var_usd"]
    assert len(tail["scenario"]) >= 0.01 * 640 + 2

    (tails / "report.html").unlink()
    result = invoke("report", str(tails))
    assert result.exit_code == 0 and (tails / "report.html").exists()
    # Keeping every loss in the same directory removes the tails-only file.
    assert invoke("run", str(small_book), *RUN_ARGS, "--out", str(tails)).exit_code == 0
    assert (tails / "losses.parquet").exists() and not (tails / "tail_losses.parquet").exists()


def test_tails_only_with_importance_sampling_is_refused(small_book, tmp_path):
    out = tmp_path / "refused"
    args = ["run", str(small_book), "--tails-only", "--importance-sampling", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    last = [line for line in result.output.splitlines() if line.strip()][-1]
    assert last.startswith("error: tails-only mode") and "importance sampling" in last
    assert "Traceback" not in result.output and not out.exists()
    assert "--keep-losses / --tails-only" in invoke("run", "--help").output


def test_unwritable_out_is_a_clear_error(small_book, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "results"  # a directory that cannot be created under a file
    result = CliRunner().invoke(main, ["run", str(small_book), *RUN_ARGS, "--out", str(out)])
    assert result.exit_code != 0
    assert "output directory" in result.output and "Traceback" not in result.output


def test_resume_without_a_checkpoint_is_refused(small_book, tmp_path):
    result = CliRunner().invoke(
        main, ["run", str(small_book), *RUN_ARGS, "--resume", "--out", str(tmp_path / "r")]
    )
    assert result.exit_code != 0 and "nothing to resume" in result.output


def test_killed_run_resumes_to_the_identical_result(small_book, tmp_path):
    """Kill the process mid-run, resume, compare with an uninterrupted run."""
    args = [
        str(small_book), "--backend", "numpy", "--no-sensitivities", "--scenarios", "3200",
        "--chunk-size", "64", "--quiet",
    ]  # fmt: skip
    command = [sys.executable, "-m", "gpucredit.cli", "run", *args]
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([*command, "--out", str(interrupted)], start_new_session=True)
    checkpoint = interrupted / ".checkpoint"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(checkpoint.glob("chunk-*.npz"))) < 5:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    saved = len(list(checkpoint.glob("chunk-*.npz")))
    assert 5 <= saved < 50, "the run must be killed part-way"
    assert not (interrupted / "summary.json").exists()

    resumed = CliRunner().invoke(main, ["run", *args, "--resume", "--out", str(interrupted)])
    assert resumed.exit_code == 0, resumed.output
    fresh = tmp_path / "fresh"
    assert invoke("run", *args, "--out", str(fresh)).exit_code == 0

    def losses(directory):
        return pq.read_table(directory / "losses.parquet").column("loss_usd").to_numpy()

    np.testing.assert_array_equal(losses(interrupted), losses(fresh))
    a = json.loads((interrupted / "summary.json").read_text())["measures"]
    b = json.loads((fresh / "summary.json").read_text())["measures"]
    assert a == b


# ----------------------------------------------------------------------------- bad options


def _refused(args: list[str], tmp_path: Path, option: str):
    out = tmp_path / "never"
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert option in result.output and "Traceback" not in result.output
    assert not out.exists(), "nothing may be written for a refused option"
    return result


@pytest.mark.parametrize(
    ("extra", "option"),
    [
        (["--alpha", "1.5"], "--alpha"),
        (["--alpha", "0.99", "--alpha", "1"], "--alpha"),
        (["--alpha", "0"], "--alpha"),
        (["--alpha", "-0.5"], "--alpha"),
        (["--alpha", "nan"], "--alpha"),
        (["--chunk-size", "-8"], "--chunk-size"),
        (["--chunk-size", "0"], "--chunk-size"),
        (["--importance-sampling", "--alpha", "1.5"], "--alpha"),
    ],
)
def test_run_refuses_a_bad_alpha_or_chunk_size_before_any_work(small_book, tmp_path, extra, option):
    args = ["run", str(small_book), "--backend", "numpy", "--no-sensitivities", "--quiet"]
    _refused([*args, "--scenarios", "64", *extra], tmp_path, option)


@pytest.mark.parametrize(
    ("extra", "option"),
    [
        (["--alpha", "1.5"], "--alpha"),
        (["--alpha", "0"], "--alpha"),
        (["--alpha", "nan"], "--alpha"),
        (["--loss", "-5"], "--loss"),
        (["--loss", "0"], "--loss"),
        (["--loss", "nan"], "--loss"),
        (["--loss", "inf"], "--loss"),
        (["--scenarios", "0"], "--scenarios"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_reverse_stress_refuses_a_bad_alpha_or_loss_before_any_work(
    small_book, tmp_path, extra, option
):
    _refused(["reverse-stress", str(small_book), *extra], tmp_path, option)


# ----------------------------------------------------------------------------- validate


def _book_with(tmp_path: Path, **columns) -> Path:
    table = make_book(12, seed=4)
    for name, value in columns.items():
        index = table.schema.get_field_index(name)
        column = pa.array([value] * len(table), type=table.schema.field(name).type)
        table = table.set_column(index, name, column)
    path = tmp_path / "book.parquet"
    write_book(table, path)
    return path


def test_validate_prints_n_a_for_an_undefined_ltv(tmp_path):
    """collateral_share 0 on every loan is valid: no collateral, so no LTV."""
    path = _book_with(tmp_path, collateral_share=0.0)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "LTV n/a" in result.output and "debt-service coverage" in result.output
    assert "Traceback" not in result.output


def test_validate_prints_n_a_for_an_undefined_ltv_and_dscr(tmp_path):
    """No collateral and no debt service today (0% bullet loans): neither ratio exists."""
    path = _book_with(
        tmp_path, collateral_share=0.0, rate=0.0, rate_type="fixed", amortization="bullet"
    )
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "LTV n/a, debt-service coverage n/a" in result.output
    assert "Traceback" not in result.output
    summary = json.loads(invoke("validate", str(path), "--json").output)
    assert summary["ltv"] is None and summary["dscr"] is None


def test_validate_refuses_a_negative_annuity_rate_with_status_2(tmp_path):
    """rate = -5 on an annuity made the schedule NaN ("losses must be finite" in run)."""
    path = _book_with(tmp_path, rate=-5.0, amortization="annuity")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert "column rate: must be in (-1, 1)" in result.output and "loan_id=" in result.output
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------- damaged resume


def _damaged_checkpoint(small_book: Path, out: Path) -> Path:
    """A checkpoint of `run small_book RUN_ARGS --chunk-size 64` with one chunk saved."""
    from gpucredit.io.assumptions import default_assumptions
    from gpucredit.io.book import read_book
    from gpucredit.io.results import Checkpoint
    from gpucredit.kernels.outputs import ChunkOutput
    from gpucredit.portfolio.config import RunConfig

    assumptions = default_assumptions()
    book = read_book(small_book, assumptions)
    alphas = RunConfig.resolve(assumptions).alphas
    checkpoint = Checkpoint(
        out, book, assumptions, 640, assumptions.seed, "conditional", "numpy", "float32", False,
        chunk_size=64, alphas=alphas,
    )  # fmt: skip
    n = len(book)
    checkpoint.save(0, ChunkOutput(np.zeros(64), np.zeros(n), np.zeros(n), np.zeros(n)))
    return out / ".checkpoint"


@pytest.mark.parametrize("damage", ["run.json", "truncated", "stray"])
def test_resume_from_a_damaged_checkpoint_is_a_clear_error(small_book, tmp_path, damage):
    out = tmp_path / "out"
    directory = _damaged_checkpoint(small_book, out)
    if damage == "run.json":
        bad = directory / "run.json"
        bad.write_text('{"book_sha256": "12')
    elif damage == "truncated":
        bad = directory / "chunk-000000000000.npz"
        bad.write_bytes(bad.read_bytes()[:50])
    else:
        bad = directory / "chunk-0.npz.bak.npz"
        bad.write_bytes(b"")
    args = ["run", str(small_book), *RUN_ARGS, "--chunk-size", "64", "--resume", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert str(bad) in result.output and "without --resume" in result.output
    assert not (out / "summary.json").exists()


def test_an_undefined_floating_schedule_is_a_clear_error(tmp_path):
    """A yearly grid and rate.level so low that a floating annuity's rate at origination is
    below −100% a period: `run` and `reverse-stress` exit 2 naming the file, the loan_id and
    the column, and write nothing."""
    import pyarrow as pa

    table = make_book(6, seed=3)
    n = table.num_rows
    for name, value in (("rate_type", "floating"), ("amortization", "annuity"), ("rate", -0.5)):
        column = pa.array([value] * n, type=table.schema.field(name).type)
        table = table.set_column(table.schema.get_field_index(name), name, column)
    book = tmp_path / "floating.parquet"
    write_book(table, book)
    assumptions = tmp_path / "low-rate.toml"
    assumptions.write_text("[simulation]\nsteps_per_year = 1\n[rate]\nlevel = -0.9\n")
    for command in (["run", *RUN_ARGS], ["reverse-stress", "--alpha", "0.99"]):
        out = tmp_path / f"refused-{command[0]}"
        args = [command[0], str(book), *command[1:], "--assumptions", str(assumptions)]
        result = CliRunner().invoke(main, [*args, "--out", str(out)])
        assert result.exit_code == 2, result.output
        lines = result.output.splitlines()
        assert len(lines) == n, result.output
        assert lines[0].startswith(f"error: {book}: loan_id=") and "column rate" in lines[0]
        assert "rate.level -0.9" in lines[0] and "annuity is undefined" in lines[0]
        assert "Traceback" not in result.output and not out.exists()


# ----------------------------------------------------------------------------- issue 20


def test_a_second_run_into_a_held_directory_is_refused_with_the_holders_pid(small_book, tmp_path):
    from gpucredit.io.results import OutputLock

    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out):
        result = CliRunner().invoke(main, ["run", str(small_book), *RUN_ARGS, "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert f"in use by another gpucredit run (pid {os.getpid()})" in result.output
    assert not (out / "summary.json").exists() and not (out / ".checkpoint").exists()


def test_a_run_without_resume_over_an_interrupted_run_is_refused(small_book, tmp_path):
    out = tmp_path / "out"
    checkpoint = _damaged_checkpoint(small_book, out)  # an intact one-chunk checkpoint
    saved = sorted(p.name for p in checkpoint.iterdir())
    result = CliRunner().invoke(main, ["run", str(small_book), *RUN_ARGS, "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "pass --resume to continue it, or remove" in result.output
    assert sorted(p.name for p in checkpoint.iterdir()) == saved  # nothing deleted


def test_the_input_book_is_never_overwritten_and_out_may_not_be_empty(small_book, tmp_path):
    directory = tmp_path / "d"
    directory.mkdir()
    book = directory / "losses.parquet"
    book.write_bytes(small_book.read_bytes())
    result = CliRunner().invoke(main, ["run", str(book), *RUN_ARGS, "--out", str(directory)])
    assert result.exit_code == 1, result.output
    assert "would overwrite the input book" in result.output
    assert book.read_bytes() == small_book.read_bytes()
    assert sorted(p.name for p in directory.iterdir()) == ["losses.parquet"]
    for command in (["run", str(small_book), *RUN_ARGS], ["reverse-stress", "--loss", "1e6"]):
        result = CliRunner().invoke(main, [*command, "--out", ""])
        assert result.exit_code == 2 and "must not be empty" in result.output


def test_a_reverse_stress_of_another_book_is_not_drawn_into_the_report(small_book, tmp_path):
    """reverse_stress.json records its book and assumptions; a run's report shows it only
    when they are the run's."""
    out = tmp_path / "out"
    result = invoke("reverse-stress", str(small_book), "--loss", "5e7", "--out", str(out))
    assert result.exit_code == 0, result.output
    design = json.loads((out / "reverse_stress.json").read_text())
    assert len(design["metadata"]["book_sha256"]) == 64
    assert invoke("run", str(small_book), *RUN_ARGS, "--out", str(out)).exit_code == 0
    assert "Not computed: run" not in (out / "report.html").read_text()  # its own: shown

    other = tmp_path / "other.parquet"
    write_book(make_book(12, seed=9), other)
    assert invoke("run", str(other), *RUN_ARGS, "--out", str(out)).exit_code == 0
    assert "Not computed: run" in (out / "report.html").read_text()  # another book's
    assert (out / "reverse_stress.json").exists()  # not this run's to delete


def test_validate_json_prints_null_never_infinity(small_book, monkeypatch):
    import gpucredit.portfolio.summary as summary

    original = summary.book_summary
    monkeypatch.setattr(
        summary, "book_summary", lambda *a: original(*a) | {"dscr": float("inf"), "x": [np.nan]}
    )
    result = invoke("validate", str(small_book), "--json")
    assert result.exit_code == 0, result.output
    assert "Infinity" not in result.output and "NaN" not in result.output
    document = json.loads(result.output)
    assert document["dscr"] is None and document["x"] == [None]


def test_names_in_errors_reach_the_terminal_escaped(tmp_path):
    path = tmp_path / "\x1b]0;pwned\x07book.parquet"
    path.write_bytes(b"not a book")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "\\x1b]0;pwned\\x07book.parquet" in result.output
