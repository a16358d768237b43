"""The package's layers hold: kernels < portfolio < io < cli, no import cycle between modules,
and the command line starts without JAX.

Every `import` and `from ... import` under src/gpucredit is read with `ast`, at module level
and inside functions alike (a lazy import is still a dependency), and so is
`importlib.import_module("...")` with a literal name.

- kernels (pure numeric) imports only kernels;
- portfolio (the domain) imports portfolio and kernels;
- io (formats: files, TOML, reports) imports io, portfolio and kernels;
- cli, __main__ and benchmark (entry points) and the package `__init__` (lazy re-exports)
  import anything.
The package root itself may be imported from any layer only for `__version__`: its other
names are the lazy re-exports of higher layers.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "gpucredit"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

ALLOWED = {
    "kernels": {"kernels"},
    "portfolio": {"portfolio", "kernels"},
    "io": {"io", "portfolio", "kernels"},
}
ENTRY_POINTS = {"cli", "__main__", "benchmark", "__init__"}  # may import anything
ROOT_NAMES_ANYWHERE = {"__version__"}  # `from gpucredit import __version__` from any layer


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. gpucredit.portfolio.engine
    path: Path
    line: int
    target: str  # the imported module, e.g. gpucredit.io.book
    names: tuple[str, ...]  # for `from target import names`
    text: str  # the statement as written

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root.parent)}:{self.line}"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """'kernels', 'portfolio', 'io', or an entry point ('cli', '__init__', ...)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def is_module(dotted: str, root: Path) -> bool:
    """Whether `dotted` names a module or package of the tree at `root`."""
    path = root.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or path.is_dir()


def imports_of(path: Path, root: Path) -> list[Import]:
    """Every import of the package's own modules in one file (any depth, any function)."""
    module = module_name(path, root)
    is_package = path.name == "__init__.py"
    source = path.read_text(encoding="utf-8")
    found = []

    def add(node: ast.AST, target: str, names: tuple[str, ...] = ()) -> None:
        if target == PACKAGE or target.startswith(PACKAGE + "."):
            text = ast.get_source_segment(source, node) or ""
            found.append(Import(module, path, node.lineno, target, names, " ".join(text.split())))

    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = module if is_package else module.rpartition(".")[0]
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            # `from gpucredit.portfolio import engine` imports the module gpucredit.portfolio.engine
            names = [alias.name for alias in node.names]
            for name in [n for n in names if is_module(f"{target}.{n}", root)]:
                add(node, f"{target}.{name}", (name,))
            others = tuple(n for n in names if not is_module(f"{target}.{n}", root))
            if others:
                add(node, target, others)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", None))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            add(node, node.args[0].value)
    return found


def all_imports(root: Path = SRC) -> list[Import]:
    return [i for path in sorted(root.rglob("*.py")) for i in imports_of(path, root)]


def layer_violations(root: Path = SRC) -> list[str]:
    """One line per wrong-way import: file:line, the modules, their layers, the statement."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        layer = layer_of(module)
        if layer not in ALLOWED and layer not in ENTRY_POINTS:
            problems.append(
                f"{path.relative_to(root.parent)}: module {module} is in no layer; add "
                f"{layer!r} to ALLOWED or ENTRY_POINTS in tests/test_layers.py"
            )
            continue
        if layer in ENTRY_POINTS:
            continue
        for imp in imports_of(path, root):
            target_layer = layer_of(imp.target)
            if target_layer == "__init__":
                if set(imp.names) <= ROOT_NAMES_ANYWHERE:
                    continue
                reason = f"the package root (only {sorted(ROOT_NAMES_ANYWHERE)} may be imported)"
            elif target_layer in ALLOWED[layer]:
                continue
            else:
                reason = f"layer {target_layer!r}; {layer} may import {sorted(ALLOWED[layer])}"
            problems.append(
                f"{imp.where(root)}: {module} ({layer}) imports {imp.target}: {reason}: "
                f"`{imp.text}`"
            )
    return problems


def import_cycles(root: Path = SRC) -> list[list[str]]:
    """The strongly connected components of more than one module (the package root, which
    every module's import implies, left out), each as a list of modules."""
    modules = {module_name(p, root) for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in all_imports(root):
        if imp.module == PACKAGE:
            continue
        target = imp.target
        while target not in modules and "." in target:  # `from pkg.mod import name`
            target = target.rpartition(".")[0]
        if target in modules and target != PACKAGE and target != imp.module:
            graph[imp.module].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


# ----------------------------------------------------------------------------- the package


def test_every_import_goes_down_the_layers():
    problems = layer_violations()
    assert not problems, "wrong-way imports:\n" + "\n".join(problems)


def test_no_import_cycles_between_modules():
    cycles = import_cycles()
    assert not cycles, "import cycles (lazy imports count):\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )


def test_the_scan_sees_the_package():
    """The checks above read the real tree: the known imports are found, lazy ones too."""
    imports = all_imports()
    assert {layer_of(module_name(p, SRC)) for p in SRC.rglob("*.py")} >= {
        "kernels",
        "portfolio",
        "io",
        "cli",
    }
    edges = {(i.module, i.target) for i in imports}
    assert ("gpucredit.io.book", "gpucredit.portfolio.book") in edges  # module level
    assert ("gpucredit.cli", "gpucredit.portfolio.engine") in edges  # inside a command


# ----------------------------------------------------------------------------- the checks fail


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / PACKAGE
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for package in ("kernels", "portfolio", "io"):
        (root / package).mkdir(exist_ok=True)
        (root / package / "__init__.py").touch()
    return root


def test_a_wrong_way_import_is_reported_with_its_module_line_and_statement(tmp_path):
    root = _tree(
        tmp_path,
        {
            "kernels/fast.py": """\
                import numpy as np

                from gpucredit.kernels import params


                def load():
                    from gpucredit.io.book import read_book  # lazy, still wrong

                    return read_book
                """,
            "portfolio/model.py": """\
                from gpucredit import __version__
                from gpucredit import simulate
                from gpucredit.kernels.params import ModelParams
                from .. import cli
                """,
            "io/files.py": "import importlib\nimportlib.import_module('gpucredit.cli')\n",
            "cli.py": "import gpucredit.io.files\n",
            "extra/thing.py": "",
        },
    )
    problems = layer_violations(root)
    text = "\n".join(problems)
    assert len(problems) == 5, text
    assert (
        "gpucredit/kernels/fast.py:7: gpucredit.kernels.fast (kernels) imports gpucredit.io.book"
        in text
    )
    assert "`from gpucredit.io.book import read_book`" in text
    assert "gpucredit/portfolio/model.py:2:" in text and "the package root" in text
    assert "gpucredit/portfolio/model.py:4:" in text and "imports gpucredit.cli" in text
    assert "gpucredit/io/files.py:2:" in text and "import_module" in text
    assert "gpucredit.extra.thing is in no layer" in text
    assert "model.py:1:" not in text and "model.py:3:" not in text  # allowed ones


def test_an_import_cycle_is_reported(tmp_path):
    root = _tree(
        tmp_path,
        {
            "portfolio/a.py": "from gpucredit.portfolio.b import g\n",
            "portfolio/b.py": "def g():\n    from gpucredit.portfolio import a\n",
            "portfolio/c.py": "from gpucredit.portfolio.a import g\n",
        },
    )
    assert import_cycles(root) == [["gpucredit.portfolio.a", "gpucredit.portfolio.b"]]


# ----------------------------------------------------------------------------- startup

HEAVY = ("jax", "jaxlib", "pyarrow", "scipy", "matplotlib", "gpucredit.portfolio.engine")


def _loaded_after(code: str) -> list[str]:
    probe = textwrap.dedent(code) + textwrap.dedent(
        f"""
        import json, sys
        print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "code",
    [
        "import gpucredit.cli",
        "import gpucredit.kernels.params",
        "import gpucredit",
        """
        from gpucredit.cli import main
        try:
            main(["--help"])
        except SystemExit as done:
            assert done.code == 0
        """,
        """
        from gpucredit.cli import main
        try:
            main(["--version"])
        except SystemExit as done:
            assert done.code == 0
        """,
    ],
    ids=["import-cli", "import-kernels-params", "import-package", "help", "version"],
)
def test_the_command_line_starts_without_jax_pyarrow_or_the_engine(code):
    assert _loaded_after(code) == []


def test_the_package_names_load_on_first_use():
    loaded = _loaded_after(
        """
        import gpucredit
        assert callable(gpucredit.simulate) and gpucredit.RunResult.__name__ == "RunResult"
        assert set(gpucredit.__all__) <= set(dir(gpucredit))
        try:
            gpucredit.no_such_name
        except AttributeError:
            pass
        else:
            raise AssertionError("no AttributeError")
        """
    )
    assert "gpucredit.portfolio.engine" in loaded
