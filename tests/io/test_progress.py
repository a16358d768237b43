"""The run's progress display: one row (or log line) per phase, with rate and ETA."""

from __future__ import annotations

from conftest import random_book
from gpucredit.io.progress import RunProgress
from gpucredit.portfolio.engine import simulate
from gpucredit.portfolio.stress import stress_case


def test_plain_mode_logs_every_phase_of_a_run(assumptions, capsys):
    case = stress_case(assumptions, "liquidity-freeze")
    settings = dict(scenarios=256, backend="numpy", chunk_size=64, el_sensitivity_scenarios=64)
    with RunProgress(interactive=False) as progress:
        progress.note("a [bold]note[/bold] printed as it is")
        simulate(random_book(2, 12), assumptions, stress=(case,), progress=progress, **settings)
    err = capsys.readouterr().err
    assert "a [bold]note[/bold] printed as it is" in err
    for phase in ("pass 1", "contributions", "calibration (year 1)", "sensitivities"):
        assert f"{phase}: " in err, phase
    assert "stress liquidity-freeze: 256/256 scenarios" in err
    assert "eta" in err


def test_bars_have_one_row_per_phase():
    with RunProgress(interactive=True) as progress:
        progress.phase("pass 1", 100)
        progress(100, 100)
        progress.phase("stress [red]x[/red]", 100)  # a name is never markup
        progress(50, 100)
        rows = [(t.description, t.completed, t.total) for t in progress._bars.tasks]
    assert rows == [("pass 1", 100, 100), ("stress [red]x[/red]", 50, 100)]


def test_quiet_prints_nothing(capsys):
    with RunProgress(quiet=True) as progress:
        progress.phase("pass 1", 10)
        progress(10, 10)
        progress.note("hidden")
    assert capsys.readouterr().err == ""
