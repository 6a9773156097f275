"""The package layout is the architecture: layers import only the layers below them, no import cycle.

Layers, lowest first (README "Layout"):

    lori.core       the method in plain torch (no Lightning)
    lori.data       task sources, prompts, tokenisation, the DataModule
    lori.eval       sandbox, pass@k, answers, judges, metrics, generation, the evaluation tasks
    lori.training   Lightning glue: module, callbacks, pipeline stages, continual phases, baselines,
                    and what a command runs (merge_run, eval_run, dry_run, sweeps, fit_settings)
    lori.commands   one module per ``lori`` subcommand, the LightningCLI they share, the dispatcher:
                    each parses its arguments, calls the library and prints (no library code)
    lori.ablation   lori.training.sweeps with ``lori pipeline`` as its default runner (notebooks)

Imports are read with ``ast`` (nothing is imported), at the top of a file and inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lori"

# lowest first; a module belongs to the layer of the longest prefix that names it
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("package", ("lori",)),  # lori/__init__.py: imports nothing
    ("core", ("lori.core",)),
    ("data", ("lori.data",)),
    ("eval", ("lori.eval",)),
    ("training", ("lori.training",)),
    ("commands", ("lori.commands", "lori.__main__")),
    ("ablation", ("lori.ablation",)),  # the sweeps' default runner is `lori pipeline` (a command)
)
LIGHTNING = ("lightning", "pytorch_lightning")
# `lori fit | validate | test | predict` are LightningCLI's own subcommands, run by LoRICLI
LIGHTNING_CLI_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p): p for p in sorted(root.rglob("*.py"))}


def imported_names(path: Path, name: str, modules: dict[str, Path] | None = None) -> set[str]:
    """Every module ``path`` imports (absolute dotted names), wherever the import statement is.

    ``from pkg import x`` is an import of the module ``pkg.x`` when ``modules`` holds one (a
    submodule), else of ``pkg`` (a name defined there). The parent packages Python runs first are
    not counted: every submodule would otherwise import its package's ``__init__``.
    """
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.add(sub if modules is not None and sub in modules else module)
    return found


def lori_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the lori modules it imports."""
    edges = {}
    for name, path in modules.items():
        edges[name] = {m for m in imported_names(path, name, modules) if m in modules and m != name}
    return edges


def layer_of(module: str) -> int:
    best, index = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), i
    if index is None:
        raise AssertionError(f"{module} belongs to no layer of tests/test_layout.py LAYERS")
    return index


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(edges.items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(module):
                bad.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                           f"({LAYERS[layer_of(target)][0]})")
    return bad


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


@pytest.fixture(scope="module")
def edges() -> dict[str, set[str]]:
    return lori_edges(all_modules())


def test_every_module_belongs_to_one_layer():
    for module in all_modules():
        layer_of(module)  # raises for a module outside every layer


def test_no_module_imports_a_higher_layer(edges):
    bad = upward_imports(edges)
    assert not bad, "imports from a lower layer to a higher one:\n  " + "\n  ".join(bad)


def test_no_import_cycle(edges):
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_core_imports_no_lightning():
    bad = [f"{name} imports {m}" for name, path in all_modules().items() if name.startswith("lori.core")
           for m in sorted(imported_names(path, name)) if m.split(".")[0] in LIGHTNING]
    assert not bad, "lori.core must stay plain torch:\n  " + "\n  ".join(bad)


def _usage_subcommands() -> list[str]:
    """The subcommands listed in ``lori --help`` (``USAGE`` of lori/commands/main.py, read with ast)."""
    tree = ast.parse((PACKAGE / "commands" / "main.py").read_text(encoding="utf-8"))
    usage = next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "USAGE" for t in node.targets))
    first = usage.splitlines()[0]  # usage: lori {pipeline,fit,...} [--config FILE] [options]
    return first[first.index("{") + 1: first.index("}")].split(",")


def test_each_subcommand_has_its_module_in_the_commands_package():
    subcommands = _usage_subcommands()
    assert "pipeline" in subcommands and "merge" in subcommands
    commands = PACKAGE / "commands"
    for sub in subcommands:
        module = "lightning_cli" if sub in LIGHTNING_CLI_SUBCOMMANDS else f"{sub}_command"
        assert (commands / f"{module}.py").is_file(), f"`lori {sub}` has no lori/commands/{module}.py"
    command_modules = {p.stem.removesuffix("_command") for p in commands.glob("*_command.py")}
    assert command_modules == set(subcommands) - set(LIGHTNING_CLI_SUBCOMMANDS), (
        "each lori/commands/*_command.py is one `lori` subcommand of lori/commands/main.py's USAGE"
    )


# lori/commands/ holds one <subcommand>_command.py per subcommand and these; a command parses its
# arguments, calls the library and prints: what it computes lives in core/data/eval/training
COMMAND_FILES = {"__init__", "main", "lightning_cli"}
MAX_COMMAND_LINES, MAX_COMMAND_FUNCTION = 200, 40


def command_violations(commands: Path) -> list[str]:
    """What a module of lori/commands/ may not hold: library code (classes other than a LightningCLI
    parser, so no dataclass or exception class; long functions; long modules; files that are no
    subcommand). ``lightning_cli.py`` (LoRICLI and its config parsing) has no line limit."""
    bad = []
    for path in sorted(commands.glob("*.py")):
        if path.stem not in COMMAND_FILES and not path.stem.endswith("_command"):
            bad.append(f"{path.name}: not a subcommand module; library code belongs to core/data/eval/training")
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        if path.stem != "lightning_cli" and lines > MAX_COMMAND_LINES:
            bad.append(f"{path.name}: {lines} lines (> {MAX_COMMAND_LINES})")
        for node in ast.parse(text).body:
            if isinstance(node, ast.ClassDef) and not node.name.endswith("CLI"):
                bad.append(f"{path.name}: class {node.name} (only LightningCLI parsers live in commands)")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_COMMAND_FUNCTION:
                    bad.append(f"{path.name}: {node.name} is {length} lines (> {MAX_COMMAND_FUNCTION})")
    return bad


def test_commands_only_parse_call_and_print():
    bad = command_violations(PACKAGE / "commands")
    assert not bad, "move library code out of lori/commands/:\n  " + "\n  ".join(bad)


# ---- the checks themselves can fail -----------------------------------------------------------
def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        path = tmp_path / "lori" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return {module_name_in(tmp_path, p): p for p in sorted((tmp_path / "lori").rglob("*.py"))}


def module_name_in(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_an_upward_import_inside_a_function_is_reported(tmp_path):
    modules = _tree(tmp_path, {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/layer.py": "def f():\n    from lori.training.module import LoRIModule\n",
        "training/__init__.py": "",
        "training/module.py": "from lori.core import layer\n",
    })
    bad = upward_imports(lori_edges(modules))
    assert bad == ["lori.core.layer (core) imports lori.training.module (training)"]


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    modules = _tree(tmp_path, {
        "__init__.py": "",
        "commands/__init__.py": "",
        "commands/main.py": "from lori.commands import dryrun_command\n",
        "commands/dryrun_command.py": "def f():\n    from lori.commands.main import main\n",
    })
    cycle = find_cycle(lori_edges(modules))
    assert cycle == ["lori.commands.dryrun_command", "lori.commands.main", "lori.commands.dryrun_command"]


def test_relative_imports_are_resolved(tmp_path):
    modules = _tree(tmp_path, {
        "__init__.py": "",
        "eval/__init__.py": "",
        "eval/metrics.py": "from . import answers\nfrom ..training import module\n",
        "eval/answers.py": "",
        "training/__init__.py": "",
        "training/module.py": "",
    })
    assert lori_edges(modules)["lori.eval.metrics"] == {"lori.eval.answers", "lori.training.module"}


def test_library_code_in_a_command_is_reported(tmp_path):
    long_body = "".join(f"    x{i} = {i}\n" for i in range(MAX_COMMAND_FUNCTION))
    _tree(tmp_path, {
        "commands/__init__.py": "",
        "commands/main.py": "def main():\n    pass\n",
        "commands/fine_command.py": "class FineCLI:\n    pass\n\n\ndef main(argv):\n    return argv\n",
        "commands/merge_command.py": ("from dataclasses import dataclass\n\n\n@dataclass\nclass MergeConfig:\n"
                                      "    r: int = 4\n\n\nclass MergeConfigError(ValueError):\n    pass\n"),
        "commands/dryrun_command.py": "def dry_run():\n" + long_body,
        "commands/helpers.py": "def helper():\n    pass\n",
        "commands/eval_command.py": "x = 1\n" * (MAX_COMMAND_LINES + 1),
    })
    assert command_violations(tmp_path / "lori" / "commands") == [
        f"dryrun_command.py: dry_run is {MAX_COMMAND_FUNCTION + 1} lines (> {MAX_COMMAND_FUNCTION})",
        f"eval_command.py: {MAX_COMMAND_LINES + 1} lines (> {MAX_COMMAND_LINES})",
        "helpers.py: not a subcommand module; library code belongs to core/data/eval/training",
        "merge_command.py: class MergeConfig (only LightningCLI parsers live in commands)",
        "merge_command.py: class MergeConfigError (only LightningCLI parsers live in commands)",
    ]
