"""summary.json against its JSON Schema (src/gpucredit/data/summary.schema.json): a real run's
summary validates, and a misspelled or mistyped key is refused (issue 17 item 4)."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from conftest import random_book
from gpucredit.io.assumptions import default_assumptions
from gpucredit.io.results import SUMMARY_FILE, summary_schema, write_results
from gpucredit.portfolio.engine import simulate
from gpucredit.portfolio.risk import SUMMARY_FORMAT_VERSION
from gpucredit.portfolio.stress import stress_case


@pytest.fixture(scope="module")
def summaries(tmp_path_factory) -> list[dict]:
    """summary.json of two small runs: 2,048 scenarios (intervals withheld: nulls) with two
    stresses, and 10,000 tails-only scenarios without contributions (intervals at 99%)."""
    book, assumptions = random_book(12, 5), default_assumptions()
    stress = tuple(stress_case(assumptions, n) for n in ("paper-metrics", "rate-shock"))
    runs = [
        dict(scenarios=2048, stress=stress),
        dict(scenarios=10_000, keep_losses=False, contributions=False),
    ]
    out = []
    for i, settings in enumerate(runs):
        result = simulate(
            book, assumptions, seed=3, backend="numpy", sensitivities=False, **settings
        )
        directory = tmp_path_factory.mktemp(f"run{i}")
        write_results(result, directory, book, assumptions)
        out.append(json.loads((directory / SUMMARY_FILE).read_text()))
    return out


def _validator() -> jsonschema.protocols.Validator:
    schema = summary_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_a_real_runs_summary_validates(summaries):
    validator = _validator()
    for summary in summaries:
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(summary)]
        assert errors == []
    first, second = summaries
    assert first["format_version"] == SUMMARY_FORMAT_VERSION
    assert set(first["measures"]["tail"]) == {"99", "99_9"}
    assert first["measures"]["tail"]["99_9"]["alpha"] == 0.999
    assert set(first["stress"]["rate-shock"]["change"]) == {
        "el_usd",
        "var_99_usd",
        "es_99_usd",
        "var_99_9_usd",
        "es_99_9_usd",
    }
    assert {"es_99_share", "es_99_9_share"} <= set(first["calibration"]["book"])
    assert "es_99_share" not in second["calibration"]["book"]  # no contributions
    assert second["measures"]["tail"]["99"]["interval_available"] is True
    # Whole counts are integers in the file, not 1234.0.
    assert isinstance(first["book"]["gpus"], int)
    assert all(isinstance(g["gpus"], int) for g in first["book"]["by_generation"].values())


@pytest.mark.parametrize(
    "path, change",
    [
        ((), ("el", 1.0)),  # a misspelled top-level key
        (("measures",), ("el", 1.0)),  # the unsuffixed name of version 1
        (("measures", "tail", "99"), ("es", 1.0)),
        (("measures", "tail"), ("0.99", None)),  # a tail keyed the old way
        (("book",), ("share_dscr_below_1", 0.1)),
        (("calibration", "book"), ("es_0.99_share", 0.1)),
        (("stress", "paper-metrics", "change"), ("es_0.99", 1.0)),
        (("metadata",), ("sceanrios", 10)),
    ],
)
def test_a_misspelled_key_is_refused(summaries, path, change):
    summary = copy.deepcopy(summaries[0])
    target = summary
    for key in path:
        target = target[key]
    key, value = change
    target[key] = copy.deepcopy(summary["measures"]["tail"]["99"]) if value is None else value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(summary, summary_schema())


@pytest.mark.parametrize(
    "path, value",
    [
        (("format_version",), 1),
        (("book", "gpus"), 1234.5),  # a count must be whole
        (("measures", "n_scenarios"), "2048"),
        (("measures", "el_ci_usd"), [1.0]),
    ],
)
def test_a_mistyped_value_is_refused(summaries, path, value):
    summary = copy.deepcopy(summaries[0])
    target = summary
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(summary, summary_schema())
