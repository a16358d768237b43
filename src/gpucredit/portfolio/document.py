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
from collections.abc import Callable

from gpucredit.kernels.params import PD_ANCHORS, factor_names

SEED_LIMIT = 2**32
NAME_FORBIDDEN = (".", ":", "~")  # they separate parts of parameter and factor names


class AssumptionsError(Exception):
    """Bad assumptions: `.problems` lists every one, each naming the file, key path and rule."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the assumptions:\n{lines}")


# ---------------------------------------------------------------------------------------
# Schema: one rule per leaf key. A rule is (kind, check); check returns the broken rule's
# text or None. Kinds: "number" (int or float, not bool), "int", "str", "bool".

Check = Callable[[object], str | None] | None


def _positive(x) -> str | None:
    return None if x > 0 else "must be > 0"


def _after_today(x) -> str | None:
    # docs/spec.md's time tolerance: a launch within 1e-9 years of today would fall in no period.
    return None if x > 1e-9 else "must be > 0 (years, beyond the 1e-9 time tolerance)"


def _nonnegative(x) -> str | None:
    return None if x >= 0 else "must be >= 0"


def _fraction(x) -> str | None:
    # jumps and haircuts: a share lost, 1 would wipe the value out (ln 0)
    return None if 0 <= x < 1 else "must be in [0, 1)"


def _yearly_rate(x) -> str | None:
    # as the book's rates: catches percentages (4 for 4%) and keeps schedules defined
    return None if -1 < x < 1 else "must be in (-1, 1) (a yearly rate as a fraction)"


def _persistence(x) -> str | None:
    if not 0 <= x < 1:
        return "must be in [0, 1) (an annual autocorrelation)"
    return None


def _correlation(x) -> str | None:
    return None if -1 <= x <= 1 else "must be in [-1, 1]"


def _at_least_one(x) -> str | None:
    return None if x >= 1 else "must be >= 1"


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


SIMULATION_KEYS: dict[str, tuple[str, Check]] = {
    "horizon_years": ("number", _positive),
    "steps_per_year": ("int", _at_least_one),
    "scenarios": ("int", _at_least_one),
    "seed": ("int", _seed),
    "copula": ("str", _one_of("gaussian", "t")),
    "t_dof": ("int", _at_least_one),
    "discount": ("bool", None),
    "mode": ("str", _one_of("conditional", "sampled")),
}
GENERATION_KEYS: dict[str, tuple[str, Check]] = {
    "rent_usd_per_hour": ("number", _positive),
    "rent_drift": ("number", None),
    "rent_vol": ("number", _nonnegative),
    "rent_mean_reversion": ("number", _nonnegative),
    "price_usd": ("number", _positive),
    "depreciation": ("number", None),
    "price_vol": ("number", _nonnegative),
    "power_kw_per_gpu": ("number", _nonnegative),
    "haircut_base": ("number", _fraction),
    "market_depth_gpus_per_year": ("number", _positive),
    "financed_fleet_gpus": ("number", _nonnegative),
}
COIN_KEYS: dict[str, tuple[str, Check]] = {
    "price_usd": ("number", _positive),
    "drift": ("number", None),
    "vol": ("number", _nonnegative),
}
# BTC also carries the hashprice trend of miners' other income (docs/spec.md §3).
BTC_KEYS: dict[str, tuple[str, Check]] = {**COIN_KEYS, "hashprice_drift": ("number", None)}
CREDIT_KEYS: dict[str, tuple[str, Check]] = {"persistence": ("number", _persistence)}
POWER_KEYS: dict[str, tuple[str, Check]] = {
    "usd_per_kwh": ("number", _positive),
    "drift": ("number", None),
    "vol": ("number", _nonnegative),
}
RATE_KEYS: dict[str, tuple[str, Check]] = {
    "level": ("number", _yearly_rate),
    "mean_reversion": ("number", _nonnegative),
    "mean": ("number", _yearly_rate),
    "vol": ("number", _nonnegative),
}
MODEL_KEYS: dict[str, tuple[str, Check]] = {
    "pd_anchor": ("str", _one_of(*PD_ANCHORS)),
    "beta_liquidity": ("number", None),
    "beta_collateral": ("number", None),
    "beta_refinancing": ("number", None),
    "haircut_slope": ("number", _nonnegative),
    "haircut_power": ("number", _positive),
    "haircut_max": ("number", _fraction),
    "refi_ltv": ("number", _positive),
    "coverage_floor": ("number", _positive),
    "coverage_cap": ("number", _positive),
}
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
CORRELATION_KEYS: dict[str, tuple[str, Check]] = {
    group: ("number", _correlation) for group in CORRELATION_GROUPS
}
PAIR_KEYS: dict[str, tuple[str, Check]] = {
    "a": ("str", None),
    "b": ("str", None),
    "value": ("number", _correlation),
}
LAUNCH_KEYS: dict[str, tuple[str, Check]] = {
    "name": ("str", _name),
    "years_from_now": ("number", _after_today),
}
LAUNCH_JUMPS = ("price_jump", "rent_jump")
COINS = ("btc", "eth")
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
STRESS_KEYS = ("name", "description", *SECTIONS)
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


def _check_leaf(value, kind: str, check: Check, path: str, problems: Problems) -> None:
    if kind == "number":
        # bool is an int subclass in Python, but `true` is not a number in an assumptions file
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.add(path, f"must be a number, got {_type_name(value)} {value!r}")
            return
        if not math.isfinite(value):
            problems.add(path, f"must be finite, got {value!r}")
            return
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            problems.add(
                path, f"must be a whole number (integer), got {_type_name(value)} {value!r}"
            )
            return
    elif kind == "str":
        if not isinstance(value, str):
            problems.add(path, f"must be a string, got {_type_name(value)} {value!r}")
            return
    elif kind == "bool":
        if not isinstance(value, bool):
            problems.add(path, f"must be true or false, got {_type_name(value)} {value!r}")
            return
    if check is not None:
        rule = check(value)
        if rule is not None:
            problems.add(path, f"{rule}, got {value!r}")


def _is_table(value, path: str, problems: Problems) -> bool:
    if not isinstance(value, dict):
        problems.add(path, f"must be a table, got {_type_name(value)} {value!r}")
        return False
    return True


def _is_list_of_tables(value, path: str, problems: Problems) -> bool:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        problems.add(path, f"must be an array of tables, got {_type_name(value)} {value!r}")
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
                        _check_leaf(jump, "number", _fraction, _join(key_path, g), problems)
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
                        schema = BTC_KEYS if coin == "btc" else COIN_KEYS
                        _check_flat(table, schema, coin_path, problems)
        elif key == "correlation":
            if _is_table(value, key_path, problems):
                _check_correlation(value, key_path, problems)
        elif key in ("name", "description"):  # stress tables only
            _check_leaf(value, "str", _non_empty if key == "name" else None, key_path, problems)


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
