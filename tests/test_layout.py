"""The layout the README draws is the one the code has: each module sits in one layer and imports only its own
layer or those below (read from every module's syntax tree), TRL is imported by the training layer alone, and the
trainer module stays wiring."""

import ast
from pathlib import Path

import reflect_trainer

PACKAGE = Path(reflect_trainer.__file__).parent

# Bottom to top, as in the README's "Layout" section.
LAYERS = {
    "protocol": ["oracles/__init__", "oracles/decoding", "structured", "templates"],
    "text and data": ["text", "formats", "exchange", "schema", "thinking", "fingerprint", "chat"],
    "judging": ["parsing", "gates"],
    "cache": ["cache", "cache_index"],
    "checks": ["hub", "preflight", "config", "trl_bridge"],
    "engines": ["oracles/section_budget", "oracles/section_processor", "oracles/transformers_engine",
                "oracles/llama_cpp_engine", "oracles/openai_http", "oracles/vllm_engine", "oracles/self_oracle",
                "embedded"],
    "recycling": ["recycler", "phase", "recycling_stats", "selection"],
    "training": ["trainer", "recycled_rows", "sampling", "placement", "ledger"],
    "offline": ["cli", "distributed", "export", "report", "evaluation/__init__", "evaluation/ifeval",
                "evaluation/pairwise", "__init__"],
}
LAYER = {module: i for i, modules in enumerate(LAYERS.values()) for module in modules}
# Imports inside a function that reach up a layer, each for a reason (a test fails on any other):
UPWARD_LAZY = {
    ("oracles/__init__", "oracles/vllm_engine"),  # engine resolution asks the installed vLLM what it can quantize
    ("oracles/self_oracle", "selection"),  # the self-oracle's identity is the student's (one definition)
    ("preflight", "oracles/openai_http"),  # a server check talks to the server as the engine does
}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield str(path.relative_to(PACKAGE))[:-3], ast.parse(path.read_text())


def _target(module: str, node: ast.ImportFrom) -> list[str]:
    """The package modules a relative ``from ... import`` reads (a name of a package: its ``__init__``)."""
    base = module.split("/")[:-1]
    base = base[: len(base) - (node.level - 1)]
    if node.module:
        path = "/".join(base + node.module.split("."))
        return [path if path in LAYER else path + "/__init__"]
    names = ["/".join(base + [alias.name]) for alias in node.names]
    return [n if n in LAYER else "/".join(base + ["__init__"]) for n in names]


def _function_level(tree) -> set[int]:
    """Line numbers of the imports inside a function (lazy) rather than at module level."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines |= {n.lineno for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return lines


def test_every_module_has_a_layer_and_imports_only_its_own_or_those_below():
    names = {module for module, _ in _modules()}
    assert names == set(LAYER), f"modules without a layer: {names - set(LAYER)}; gone: {set(LAYER) - names}"
    upward = []
    for module, tree in _modules():
        lazy = _function_level(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            for target in _target(module, node):
                assert target in LAYER, f"{module} imports {target}, which is not a module of the package"
                if LAYER[target] > LAYER[module] and not (node.lineno in lazy and (module, target) in UPWARD_LAZY):
                    upward.append(f"{module} imports {target} (line {node.lineno})")
    assert not upward, "imports that reach up a layer:\n" + "\n".join(upward)


def test_trl_is_imported_by_the_training_layer_alone():
    """The transform, the CLI and the cache start without TRL (seconds of import), and TRL's names have one home."""
    importers = set()
    for module, tree in _modules():
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else [])
            if any(name == "trl" or name.startswith("trl.") for name in names):
                importers.add(module)
    assert importers == {"trainer", "trl_bridge"}


def test_the_trainer_module_is_wiring():
    source = (PACKAGE / "trainer.py").read_text()
    assert len(source.splitlines()) <= 260  # the aim is 250; its docstrings are the public API's
    tree = ast.parse(source)
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ReflectionSFTTrainer")
    own = [n.name for n in trainer.body if isinstance(n, ast.FunctionDef)]
    assert len(own) <= 16, own
