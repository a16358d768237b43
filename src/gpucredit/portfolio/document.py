"""The assumptions document (docs/spec.md §9-10): its schema, the checks of one layer, the
merge of layers and the rules across keys of the merged document.

A layer is a dict in the assumptions file's layout: a user file as parsed, a `[[stress]]`
table's overrides or those given to `with_overrides`. Merge rules (docs/spec.md §10): tables
merge key by key; a `[generations.X]` table amends X or adds a new generation (which must then
give every key); a `[[launches]]` list replaces the default list (`launches = []` removes it);
`[[correlation.pairs]]` override single entries of the assembled matrix, later layers winning
for the same pair; `[[stress]]` replaces the list of stress scenarios.

Every problem of a layer is collected before one `AssumptionsError` lists them all, each as
`<source>: <dotted key path>: <rule>`.
"""

from __future__ import annotations

import copy
import math
import reprlib
from collections.abc import Callable
from dataclasses import dataclass

from gpucredit.kernels.params import PD_ANCHORS, factor_names

SEED_LIMIT = 2**32
NAME_FORBIDDEN = (".", ":", "~")  # they separate parts of parameter and factor names
MESSAGE_PROBLEMS = 100  # problems an error message lists (`.problems` keeps all)


class AssumptionsError(Exception):
    """Bad assumptions: `.problems` lists every one, each naming the file, key path and rule."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems[:MESSAGE_PROBLEMS])
        if len(self.problems) > MESSAGE_PROBLEMS:  # a broken file may have thousands
            lines += f"\n  ... and {len(self.problems) - MESSAGE_PROBLEMS:,} more"
        super().__init__(f"{len(self.problems)} problem(s) in the assumptions:\n{lines}")


# ---------------------------------------------------------------------------------------
# Schema: one rule per leaf key. A rule is (kind, check); check returns the broken rule's
# text or None. Kinds: "number" (int or float, not bool), "int", "str", "bool".

Check = Callable[[object], str | None] | None


@dataclass(frozen=True)
class Range:
    """A plausible range of a number, written "[0, 1)" ("(" and ")" exclude their end).

    The ranges are generous: they catch unit slips (a percentage typed for a fraction, watts
    for kW) and sizes no run can hold, not unusual views. A refusal says what the number
    means; `typo_divisor` is the slip a value out of range most likely is (100: a percentage;
    1000: watts for kW, $/MWh for $/kWh), suggested when the value divided by it fits.
    """

    interval: str
    meaning: str  # the number's unit and scale, said with every refusal
    typo_divisor: float | None = None

    def contains(self, x) -> bool:
        low, high = (float(end) for end in self.interval[1:-1].split(","))
        above = x > low if self.interval[0] == "(" else x >= low
        below = x < high if self.interval[-1] == ")" else x <= high
        return above and below

    def __call__(self, x) -> str | None:
        return None if self.contains(x) else f"must be in {self.interval} ({self.meaning})"

    def typo_hint(self, x) -> str:
        """The suggestion ('; did you mean 0.05?') when x / typo_divisor lies in the range."""
        if self.typo_divisor is None:
            return ""
        guess = x / self.typo_divisor
        return f"; did you mean {guess:g}?" if self.contains(guess) else ""


def _number(interval: str, meaning: str, typo_divisor: float | None = None):
    return ("number", Range(interval, meaning, typo_divisor))


def _whole(interval: str, meaning: str):
    return ("int", Range(interval, meaning))


def _seed(x) -> str | None:
    return None if 0 <= x < SEED_LIMIT else "must be in [0, 2^32)"


def _one_of(*choices: str) -> Callable[[object], str | None]:
    def check(x) -> str | None:
        return None if x in choices else f"must be one of {', '.join(map(repr, choices))}"

    return check


def _non_empty(x) -> str | None:
    return None if x else "must not be empty"


def _name(x) -> str | None:
    if not x:
        return "must not be empty"
    if any(c in x for c in NAME_FORBIDDEN):
        return f"must not contain any of {' '.join(NAME_FORBIDDEN)}"
    return None


CORRELATION_GROUPS = (
    "rent_rent",
    "price_price",
    "rent_price_same",
    "rent_price_cross",
    "btc_eth",
    "crypto_rent",
    "crypto_price",
    "credit_rent",
    "credit_price",
    "credit_crypto",
    "power_rent",
    "rate_crypto",
)

# Shared ranges (several keys have the same unit and scale).
_VOL = _number("[0, 2]", "a yearly volatility as a fraction: 2 is 200%", 100)
_CRYPTO_VOL = _number("[0, 3]", "a yearly volatility as a fraction: 3 is 300%", 100)
_CRYPTO_DRIFT = _number("[-3, 3]", "a yearly drift: 3 is a price growing 20-fold a year", 100)
_YEARLY_RATE = _number("(-1, 1)", "a yearly rate as a fraction", 100)
_SHARE_LOST = _number("[0, 1)", "a share of the value lost: 1 would wipe it out", 100)
_MEAN_REVERSION = _number("[0, 12]", "a yearly speed: 12 is a half-life of 3 weeks")
_BETA = _number("[0, 10]", "threshold shift per unit of log coverage, in standard deviations")
_GPUS = "GPUs: 1e8 is more than every data-centre GPU ever made"
_CORRELATION = _number("[-1, 1]", "a correlation")

# Every leaf key of the assumptions file with its kind and rule, by dotted path ("*": any
# generation or launch; docs/spec.md §10). The section schemas below are read from it, so a
# new key is one line here; every number has a plausible range.
KEYS: dict[str, tuple[str, Check]] = {
    "simulation.horizon_years": _number("(0, 30]", "years"),
    "simulation.steps_per_year": _whole("[1, 52]", "periods a year: 52 is weekly"),
    "simulation.scenarios": _whole("[1, 1e10]", "1e10 scenarios take hours on a GPU"),
    "simulation.seed": ("int", _seed),
    "simulation.copula": ("str", _one_of("gaussian", "t")),
    "simulation.t_dof": _whole("[1, 100]", "beyond 100 the t copula is the Gaussian one"),
    "simulation.discount": ("bool", None),
    "simulation.mode": ("str", _one_of("conditional", "sampled")),
    "generations.*.rent_usd_per_hour": _number("(0, 100]", "$ per GPU-hour: a B200 rents at 4.5"),
    "generations.*.rent_drift": _number("[-2, 1]", "a yearly log trend: -2 is -86% a year", 100),
    "generations.*.rent_vol": _VOL,
    "generations.*.rent_mean_reversion": _MEAN_REVERSION,
    "generations.*.price_usd": _number("(0, 1e6]", "$ per GPU: a B200 costs about 40,000"),
    "generations.*.depreciation": _number("[-0.5, 2]", "a yearly rate: 2 loses 86% a year", 100),
    "generations.*.price_vol": _VOL,
    "generations.*.power_kw_per_gpu": _number("[0, 10]", "kW per GPU: a B200 draws 1.3", 1000),
    "generations.*.haircut_base": _SHARE_LOST,
    "generations.*.market_depth_gpus_per_year": _number("(0, 1e8]", f"{_GPUS} (a year)"),
    "generations.*.financed_fleet_gpus": _number("[0, 1e8]", _GPUS),
    "launches.*.name": ("str", _name),
    "launches.*.years_from_now": _number("(1e-9, 100]", "years, beyond the time tolerance"),
    "launches.*.price_jump.*": _SHARE_LOST,
    "launches.*.rent_jump.*": _SHARE_LOST,
    "crypto.btc.price_usd": _number("(0, 1e7]", "$ per BTC"),
    "crypto.btc.drift": _CRYPTO_DRIFT,
    "crypto.btc.vol": _CRYPTO_VOL,
    "crypto.btc.hashprice_drift": _number("[-2, 1]", "a yearly log trend: -2 is -86% a year", 100),
    "crypto.eth.price_usd": _number("(0, 1e7]", "$ per ETH"),
    "crypto.eth.drift": _CRYPTO_DRIFT,
    "crypto.eth.vol": _CRYPTO_VOL,
    "credit.persistence": _number("[0, 1)", "an annual autocorrelation", 100),
    "power.usd_per_kwh": _number("(0, 2]", "$ per kWh: US industry pays about 0.08", 1000),
    "power.drift": _number("[-0.5, 0.5]", "a yearly drift: 0.5 is +65% a year", 100),
    "power.vol": _VOL,
    "rate.level": _YEARLY_RATE,
    "rate.mean_reversion": _MEAN_REVERSION,
    "rate.mean": _YEARLY_RATE,
    "rate.vol": _number("[0, 0.1]", "yearly volatility in rate units: 0.01 is 1 point", 100),
    "model.pd_anchor": ("str", _one_of(*PD_ANCHORS)),
    "model.offtaker_correlation": _number("[0, 1)", "an asset correlation"),
    "model.beta_liquidity": _BETA,
    "model.beta_collateral": _BETA,
    "model.beta_refinancing": _BETA,
    "model.haircut_slope": _number("[0, 10]", "haircut added by a year's depth sold at once"),
    "model.haircut_power": _number("(0, 5]", "exponent of sales over depth: 1 is linear"),
    "model.haircut_max": _SHARE_LOST,
    "model.refi_ltv": _number("(0, 1]", "a share of the fleet's value lent against it", 100),
    "model.coverage_floor": _number("[1e-6, 1]", "its log must stay finite in float32"),
    "model.coverage_cap": _number("[1, 1000]", "beyond 1000x coverage says nothing more"),
    **{f"correlation.{group}": _CORRELATION for group in CORRELATION_GROUPS},
    "correlation.pairs.*.a": ("str", None),
    "correlation.pairs.*.b": ("str", None),
    "correlation.pairs.*.value": _CORRELATION,
}


def _schema(prefix: str) -> dict[str, tuple[str, Check]]:
    """The keys of KEYS directly under `prefix` (e.g. "generations.*"), by their last part."""
    return {
        path[len(prefix) + 1 :]: rule
        for path, rule in KEYS.items()
        if path.startswith(prefix + ".") and "." not in path[len(prefix) + 1 :]
    }


SIMULATION_KEYS = _schema("simulation")
GENERATION_KEYS = _schema("generations.*")
BTC_KEYS = _schema("crypto.btc")  # BTC also carries the hashprice trend (docs/spec.md §3)
ETH_KEYS = _schema("crypto.eth")
CREDIT_KEYS = _schema("credit")
POWER_KEYS = _schema("power")
RATE_KEYS = _schema("rate")
MODEL_KEYS = _schema("model")
CORRELATION_KEYS = _schema("correlation")
PAIR_KEYS = _schema("correlation.pairs.*")
LAUNCH_KEYS = _schema("launches.*")
LAUNCH_JUMPS = ("price_jump", "rent_jump")
JUMP_RULE = KEYS["launches.*.price_jump.*"]
COINS = {"btc": BTC_KEYS, "eth": ETH_KEYS}
SECTIONS = (
    "simulation",
    "generations",
    "launches",
    "crypto",
    "credit",
    "power",
    "rate",
    "model",
    "correlation",
)
TOP_LEVEL_KEYS = (*SECTIONS, "stress")
STRESS_KEYS = ("name", "description", "offtakers_default", *SECTIONS)
FLAT_SECTIONS = {
    "simulation": SIMULATION_KEYS,
    "credit": CREDIT_KEYS,
    "power": POWER_KEYS,
    "rate": RATE_KEYS,
    "model": MODEL_KEYS,
}


# ---------------------------------------------------------------------------------------
# Structural checks of one layer (a user file, a stress table or an overrides dict): unknown
# keys, types and per-key ranges. Cross-key rules run on the merged document (below).


class Problems:
    """Collects problems, each prefixed with the source (file) name."""

    def __init__(self, source: str):
        self.source = source
        self.items: list[str] = []

    def add(self, path: str, rule: str) -> None:
        self.items.append(f"{self.source}: {path}: {rule}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(value) -> str:
    return type(value).__name__


_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 60


def _shown(value) -> str:
    """A value in a message: its repr, cut short (a file may hold a huge or deeply nested one)."""
    return _SHOWN.repr(value)


def _check_leaf(value, kind: str, check: Check, path: str, problems: Problems) -> None:
    if kind == "number":
        # bool is an int subclass in Python, but `true` is not a number in an assumptions file
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.add(path, f"must be a number, got {_type_name(value)} {_shown(value)}")
            return
        if not math.isfinite(value):
            problems.add(path, f"must be finite, got {_shown(value)}")
            return
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            problems.add(
                path, f"must be a whole number (integer), got {_type_name(value)} {_shown(value)}"
            )
            return
    elif kind == "str":
        if not isinstance(value, str):
            problems.add(path, f"must be a string, got {_type_name(value)} {_shown(value)}")
            return
    elif kind == "bool":
        if not isinstance(value, bool):
            problems.add(path, f"must be true or false, got {_type_name(value)} {_shown(value)}")
            return
    if check is not None:
        rule = check(value)
        if rule is not None:
            hint = check.typo_hint(value) if isinstance(check, Range) else ""
            problems.add(path, f"{rule}, got {_shown(value)}{hint}")


def _is_table(value, path: str, problems: Problems) -> bool:
    if not isinstance(value, dict):
        problems.add(path, f"must be a table, got {_type_name(value)} {_shown(value)}")
        return False
    return True


def _is_list_of_tables(value, path: str, problems: Problems) -> bool:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        problems.add(path, f"must be an array of tables, got {_type_name(value)} {_shown(value)}")
        return False
    return True


def _unknown_key(path: str, key: str, known, problems: Problems) -> None:
    problems.add(_join(path, key), f"unknown key; known keys: {', '.join(known)}")


def _check_flat(table: dict, schema: dict, path: str, problems: Problems) -> None:
    for key, value in table.items():
        if key not in schema:
            _unknown_key(path, key, schema, problems)
        else:
            _check_leaf(value, *schema[key], _join(path, key), problems)


def _check_generations(table: dict, base_generations, path: str, problems: Problems) -> None:
    for g, gen in table.items():
        gen_path = _join(path, g)
        rule = _name(g)
        if rule is not None:
            problems.add(gen_path, f"generation name {rule}")
        if not _is_table(gen, gen_path, problems):
            continue
        _check_flat(gen, GENERATION_KEYS, gen_path, problems)
        if g not in base_generations:
            missing = [key for key in GENERATION_KEYS if key not in gen]
            if missing:
                problems.add(
                    gen_path, f"a new generation must give every key; missing: {', '.join(missing)}"
                )


def _check_launches(launches: list, path: str, problems: Problems) -> None:
    for e, launch in enumerate(launches):
        launch_path = f"{path}[{e}]"
        for key, value in launch.items():
            key_path = _join(launch_path, key)
            if key in LAUNCH_KEYS:
                _check_leaf(value, *LAUNCH_KEYS[key], key_path, problems)
            elif key in LAUNCH_JUMPS:
                if _is_table(value, key_path, problems):
                    for g, jump in value.items():
                        _check_leaf(jump, *JUMP_RULE, _join(key_path, g), problems)
            else:
                _unknown_key(launch_path, key, (*LAUNCH_KEYS, *LAUNCH_JUMPS), problems)
        for key in LAUNCH_KEYS:
            if key not in launch:
                problems.add(_join(launch_path, key), "missing (every launch needs it)")


def _check_correlation(table: dict, path: str, problems: Problems) -> None:
    for key, value in table.items():
        key_path = _join(path, key)
        if key == "pairs":
            if not _is_list_of_tables(value, key_path, problems):
                continue
            seen: set[frozenset] = set()
            for p, pair in enumerate(value):
                pair_path = f"{key_path}[{p}]"
                _check_flat(pair, PAIR_KEYS, pair_path, problems)
                for needed in PAIR_KEYS:
                    if needed not in pair:
                        problems.add(
                            _join(pair_path, needed), "missing (every pair needs a, b, value)"
                        )
                a, b = pair.get("a"), pair.get("b")
                if isinstance(a, str) and isinstance(b, str):
                    if a == b:
                        problems.add(
                            pair_path, f"a and b must differ (the diagonal is 1), got {a!r}"
                        )
                    elif frozenset((a, b)) in seen:
                        problems.add(pair_path, f"the pair {a!r}, {b!r} is given twice")
                    seen.add(frozenset((a, b)))
        elif key in CORRELATION_KEYS:
            _check_leaf(value, *CORRELATION_KEYS[key], key_path, problems)
        else:
            _unknown_key(path, key, (*CORRELATION_KEYS, "pairs"), problems)


def _check_sections(doc: dict, allowed, base_generations, path: str, problems: Problems) -> None:
    """Structural checks of one layer whose top-level keys must be among `allowed`."""
    for key, value in doc.items():
        key_path = _join(path, key)
        if key not in allowed:
            _unknown_key(path, key, allowed, problems)
        elif key in FLAT_SECTIONS:
            if _is_table(value, key_path, problems):
                _check_flat(value, FLAT_SECTIONS[key], key_path, problems)
        elif key == "generations":
            if _is_table(value, key_path, problems):
                _check_generations(value, base_generations, key_path, problems)
        elif key == "launches":
            if _is_list_of_tables(value, key_path, problems):
                _check_launches(value, key_path, problems)
        elif key == "crypto":
            if _is_table(value, key_path, problems):
                for coin, table in value.items():
                    coin_path = _join(key_path, coin)
                    if coin not in COINS:
                        _unknown_key(key_path, coin, COINS, problems)
                    elif _is_table(table, coin_path, problems):
                        _check_flat(table, COINS[coin], coin_path, problems)
        elif key == "correlation":
            if _is_table(value, key_path, problems):
                _check_correlation(value, key_path, problems)
        elif key in ("name", "description"):  # stress tables only
            _check_leaf(value, "str", _non_empty if key == "name" else None, key_path, problems)
        elif key == "offtakers_default":  # stress tables only; the names are the book's
            names_ok = isinstance(value, list) and all(
                isinstance(v, str) and v.strip() for v in value
            )
            if not names_ok:
                problems.add(key_path, "must be a list of offtaker names (non-empty strings)")


def _check_stresses(stresses, base_generations, problems: Problems) -> None:
    if not _is_list_of_tables(stresses, "stress", problems):
        return
    names: set[str] = set()
    for s, stress in enumerate(stresses):
        stress_path = f"stress[{s}]"
        _check_sections(stress, STRESS_KEYS, base_generations, stress_path, problems)
        name = stress.get("name")
        if name is None:
            problems.add(_join(stress_path, "name"), "missing (every stress needs a name)")
        elif isinstance(name, str):
            if name in names:
                problems.add(_join(stress_path, "name"), f"duplicate stress name {name!r}")
            names.add(name)


def check_layer(doc: dict, base_generations, problems: Problems) -> None:
    """Structural checks of a user file or overrides dict (stress tables included)."""
    _check_sections(doc, TOP_LEVEL_KEYS, base_generations, "", problems)
    if "stress" in doc:
        # a stress may add a generation that the same file adds: check against both
        own = doc.get("generations")
        generations = set(base_generations) | (set(own) if isinstance(own, dict) else set())
        _check_stresses(doc["stress"], generations, problems)


# ---------------------------------------------------------------------------------------
# Merge and cross-key checks on the merged document.


def _merge_pairs(base: list, user: list) -> list:
    """Pairs keyed by the unordered (a, b): a later value replaces an earlier one."""
    merged: dict[frozenset, dict] = {frozenset((p["a"], p["b"])): p for p in base}
    for pair in user:
        merged[frozenset((pair["a"], pair["b"]))] = pair
    return list(merged.values())


def merge(base: dict, user: dict) -> dict:
    """`user` (one layer in the §10 layout, already checked) over `base`; neither is changed."""
    out = copy.deepcopy(base)
    for key, value in copy.deepcopy(user).items():
        if key in ("launches", "stress"):
            out[key] = value  # lists replace
        elif key in ("generations", "crypto"):
            section = out.setdefault(key, {})
            for name, table in value.items():
                section[name] = {**section.get(name, {}), **table}
        elif key == "correlation":
            section = out.setdefault(key, {})
            for group, group_value in value.items():
                if group == "pairs":
                    section["pairs"] = _merge_pairs(section.get("pairs", []), group_value)
                else:
                    section[group] = group_value
        else:
            out[key] = {**out.get(key, {}), **value}
    return out


def check_merged(doc: dict, path: str, problems: Problems) -> None:
    """Rules that involve several keys, on a merged (complete) document."""
    sim = doc["simulation"]
    steps_total = sim["horizon_years"] * sim["steps_per_year"]
    if abs(steps_total - round(steps_total)) > 1e-9:
        problems.add(
            _join(path, "simulation.horizon_years"),
            f"horizon_years * steps_per_year must be a whole number of periods, "
            f"got {sim['horizon_years']!r} * {sim['steps_per_year']!r} = {steps_total!r}",
        )
    # A period moves the rent and the rate by κΔ of their distance to the mean (docs/spec.md
    # §2): with κΔ > 1 the step overshoots the mean, and beyond 2 the path diverges.
    steps = sim["steps_per_year"]
    speeds = [
        (f"generations.{g}.rent_mean_reversion", gen["rent_mean_reversion"])
        for g, gen in doc["generations"].items()
    ]
    speeds.append(("rate.mean_reversion", doc["rate"]["mean_reversion"]))
    for key, speed in speeds:
        if speed > steps:
            problems.add(
                _join(path, key),
                f"must be <= simulation.steps_per_year ({steps}), got {speed!r}: a period's "
                f"step would overshoot the mean; raise steps_per_year or lower the speed",
            )
    model = doc["model"]
    if model["coverage_cap"] <= model["coverage_floor"]:
        problems.add(
            _join(path, "model.coverage_cap"),
            f"must be > model.coverage_floor, got cap {model['coverage_cap']!r} "
            f"<= floor {model['coverage_floor']!r}",
        )
    generations = tuple(doc["generations"])
    names: set[str] = set()
    for e, launch in enumerate(doc.get("launches", [])):
        launch_path = _join(path, f"launches[{e}]")
        if launch["name"] in names:
            problems.add(_join(launch_path, "name"), f"duplicate launch name {launch['name']!r}")
        names.add(launch["name"])
        for jump in LAUNCH_JUMPS:
            for g in launch.get(jump, {}):
                if g not in generations:
                    problems.add(
                        _join(launch_path, f"{jump}.{g}"),
                        f"unknown generation {g!r}; generations: {', '.join(generations)}",
                    )
    factors = factor_names(generations)
    for p, pair in enumerate(doc["correlation"].get("pairs", [])):
        for end in ("a", "b"):
            if pair[end] not in factors:
                problems.add(
                    _join(path, f"correlation.pairs[{p}].{end}"),
                    f"unknown factor {pair[end]!r}; factors: {', '.join(factors)}",
                )
