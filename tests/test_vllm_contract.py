"""The vllm engine against the REAL vLLM API, at both ends of the ``vllm`` extra's range, on a machine without a GPU.

vLLM cannot be installed usefully here (its CUDA stack), and ``tests/test_vllm_engine.py`` runs the engine against a
fake module. This file closes the gap between the fake and vLLM: it downloads the real vLLM wheel of the lowest and
the highest version the extra allows (``pip download --no-deps``, once, kept in ``~/.cache/reflect_trainer/vllm_wheels``
or ``$REFLECT_TRAINER_VLLM_WHEELS``), reads its Python source out of the zip (nothing installed, nothing imported) and
checks with ``ast`` that everything our engine asks of vLLM is there, with the parameters we pass.

What our engine asks is not listed by hand: it is read from ``reflect_trainer/oracles/vllm_engine.py`` with ``ast``
(the modules it imports, the names it reads from them, the ``LLM`` and ``SamplingParams`` keywords it builds, the
``LLM`` methods and their keywords, the prompt keys, the output attributes), so a new call is checked as soon as it is
written. Written by hand: where vLLM defines what it checks against (``LLM``, ``EngineArgs``, the GPU worker, the
``Literal`` types) and ``OUTPUT_TYPES``, which vLLM class a loop variable of ``generate`` holds.

What this does not prove: that vLLM runs these calls correctly on a GPU (``benchmarks/gpu_vllm_check.py`` does).
"""

from __future__ import annotations

import ast
import logging
import os
import re
import subprocess
import sys
import tempfile
import tomllib
import types
import zipfile
from functools import cache
from pathlib import Path

import pytest
import torch

from reflect_trainer.oracles import vllm_engine
from reflect_trainer.oracles.vllm_engine import QUANTIZATIONS, VLLMOracle

ROOT = Path(__file__).resolve().parents[1]
WHEELS = Path(os.environ.get("REFLECT_TRAINER_VLLM_WHEELS", "~/.cache/reflect_trainer/vllm_wheels")).expanduser()
#: What a variable of the engine's ``generate`` holds: ``LLM.generate`` returns ``list[RequestOutput]`` (checked below),
#: the engine iterates it as ``output`` and takes ``completion = output.outputs[0]``.
OUTPUT_TYPES = {"output": ("vllm.outputs", "RequestOutput"), "completion": ("vllm.outputs", "CompletionOutput")}
#: What pip says when no index answers (no vllm listed at all, or a connection error); any other failure fails the test.
OFFLINE = ("(from versions: none)", "NewConnectionError", "Max retries exceeded",
           "Temporary failure in name resolution", "Network is unreachable", "ProxyError")


# --- the supported range, from pyproject.toml ------------------------------------------------------------------------

def extra_range() -> tuple[str, str]:
    """The lowest and highest version the ``vllm`` extra allows: its ``>=`` and ``<=`` bounds. An open upper bound
    (``<0.32``) would let in versions no test has read, so it is refused."""
    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (line,) = [spec for spec in extras["vllm"] if Requirement(spec).name == "vllm"]
    bounds = {spec.operator: spec.version for spec in Requirement(line).specifier}
    assert set(bounds) == {">=", "<="}, f"the vllm extra must be '>=LOW,<=HIGH' so both ends are checked: {line!r}"
    return bounds[">="], bounds["<="]


VERSIONS = extra_range()


def test_vllm_extra_is_trl_range_and_not_wider():
    import importlib.metadata

    from packaging.requirements import Requirement

    trl = [Requirement(r) for r in importlib.metadata.requires("trl") or [] if r.startswith("vllm")]
    assert trl, "TRL no longer declares a vllm extra: check its supported range by hand"
    ours = Requirement(f"vllm>={VERSIONS[0]},<={VERSIONS[1]}").specifier
    assert all(v in trl[0].specifier for v in VERSIONS)  # both ends inside TRL's range
    assert ours == trl[0].specifier, f"TRL {importlib.metadata.version('trl')} supports {trl[0].specifier}"


# --- the real vLLM source, read from its wheel ----------------------------------------------------------------------

def fetch_wheel(version: str) -> Path:
    """The cached wheel, downloaded once. Into a temporary folder first, so a parallel run never reads half a file."""
    WHEELS.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        found = sorted(WHEELS.glob(f"vllm-{version}-*.whl"))
        if found:
            return found[0]
        with tempfile.TemporaryDirectory(dir=WHEELS) as tmp:
            # --platform: the Linux wheel (the only one vLLM publishes), from whatever machine runs the test.
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                   "--platform", "manylinux_2_28_x86_64", f"vllm=={version}", "-d", tmp,
                                   "--progress-bar", "off"], capture_output=True, text=True, timeout=1800)
            for wheel in Path(tmp).glob("vllm-*.whl"):
                os.replace(wheel, WHEELS / wheel.name)
    message = (proc.stderr or proc.stdout).strip()
    if any(mark in message for mark in OFFLINE):  # a failure, not a skip: a skipped contract proves nothing
        pytest.fail(f"offline: no package index answered for vllm=={version}, whose wheel this test reads "
                    f"(pip: {message.splitlines()[-1]}); put the wheel in {WHEELS} to run it offline")
    pytest.fail(f"pip download vllm=={version} failed:\n{message}")


class VLLMSource:
    """One vLLM version's Python source, parsed on demand from its wheel."""

    def __init__(self, wheel: Path):
        self.zip = zipfile.ZipFile(wheel)
        self.files = set(self.zip.namelist())

    @cache
    def module(self, name: str) -> ast.Module | None:
        base = name.replace(".", "/")
        for path in (f"{base}.py", f"{base}/__init__.py"):
            if path in self.files:
                return ast.parse(self.zip.read(path))
        return None

    def _resolve(self, module: str, level: int, relative: str | None, package: bool) -> str:
        parts = module.split(".") if package else module.split(".")[:-1]
        parts = parts[:len(parts) - (level - 1)] if level else []
        return ".".join(parts + ([relative] if relative else [])) if level else relative

    def _is_package(self, name: str) -> bool:
        return f"{name.replace('.', '/')}/__init__.py" in self.files

    def find(self, module: str, name: str, _seen: frozenset = frozenset()) -> tuple[str, ast.AST] | None:
        """Where ``module.name`` is defined (following re-exports, star imports and vLLM's lazy ``MODULE_ATTRS``):
        ``(module, node)``, or None where ``from module import name`` would fail."""
        tree = self.module(module)
        if tree is None or (module, name) in _seen:
            return None
        seen = _seen | {(module, name)}
        stars = []
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
                return module, node
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    return module, node
                if any(isinstance(t, ast.Name) and t.id == "MODULE_ATTRS" for t in targets):  # vllm's lazy names
                    for key, value in zip(node.value.keys, node.value.values):
                        if key.value == name:
                            target, attr = value.value.split(":")
                            return self.find(self._resolve(module, 1, target.lstrip("."), True), attr, seen)
            if isinstance(node, ast.ImportFrom):
                source = self._resolve(module, node.level, node.module, self._is_package(module))
                for alias in node.names:
                    if alias.name == "*":
                        stars.append(source)
                    elif (alias.asname or alias.name) == name:
                        if self.module(f"{source}.{alias.name}") is not None:
                            return f"{source}.{alias.name}", self.module(f"{source}.{alias.name}")
                        return self.find(source, alias.name, seen)
        for source in stars:
            found = self.find(source, name, seen)
            if found and not name.startswith("_"):
                return found
        return None

    def cls(self, module: str, name: str) -> tuple[str, ast.ClassDef]:
        found = self.find(module, name)
        assert found and isinstance(found[1], ast.ClassDef), f"{module}.{name} is not a class"
        return found

    def fields(self, module: str, name: str) -> set[str]:
        """Annotated class attributes (dataclass, msgspec and TypedDict fields), bases included, and the attributes
        its methods assign to ``self``."""
        where, node = self.cls(module, name)
        out = {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
        out |= {t.attr for s in ast.walk(node) if isinstance(s, (ast.Assign, ast.AnnAssign))
                for t in (s.targets if isinstance(s, ast.Assign) else [s.target])
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
        for base in node.bases:
            if isinstance(base, ast.Name) and self.find(where, base.id):
                base_module, base_node = self.find(where, base.id)
                if isinstance(base_node, ast.ClassDef):
                    out |= self.fields(base_module, base.id)
        return out

    def method(self, module: str, cls: str, name: str) -> ast.FunctionDef | None:
        _, node = self.cls(module, cls)
        return next((s for s in node.body if isinstance(s, ast.FunctionDef) and s.name == name), None)

    def literal(self, module: str, name: str) -> set[str]:
        """The strings of a ``Literal[...]`` alias (or a list of strings)."""
        _, node = self.find(module, name)
        return {n.value for n in ast.walk(node.value) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def takes(function: ast.FunctionDef, keywords: set[str], positional: int = 0) -> list[str]:
    """What of a call with these keywords and this many positional arguments ``function`` would refuse."""
    args = function.args
    named = [a.arg for a in args.posonlyargs + args.args][1:]  # without self
    problems = [] if positional <= len(named) or args.vararg else [f"{positional} positional arguments"]
    if args.kwarg is None:
        problems += sorted(k for k in keywords if k not in named + [a.arg for a in args.kwonlyargs])
    return problems


@pytest.fixture(scope="module", params=VERSIONS, ids=[f"vllm-{v}" for v in VERSIONS])
def vllm_source(request) -> VLLMSource:
    return VLLMSource(fetch_wheel(request.param))


# --- what our engine asks of vLLM, read from its source ------------------------------------------------------------

def _const(node) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _import_target(node) -> str | None:
    """``"vllm.x"`` for ``importlib.import_module("vllm.x")`` (or a module function that returns one)."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module":
        return _const(node.args[0])
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return IMPORTERS.get(node.func.id)
    return None


def _is_self(node, attr: str) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == attr and isinstance(node.value, ast.Name) \
        and node.value.id == "self"


ENGINE = ast.parse(Path(vllm_engine.__file__).read_text())
FUNCTIONS = {f"{cls.name}.{f.name}" if cls else f.name: f
             for cls in [None, *[n for n in ENGINE.body if isinstance(n, ast.ClassDef)]]
             for f in (cls.body if cls else ENGINE.body) if isinstance(f, ast.FunctionDef)}
IMPORTERS = {name: _const(ret.value.args[0]) for name, f in FUNCTIONS.items() for ret in ast.walk(f)
             if isinstance(ret, ast.Return) and isinstance(ret.value, ast.Call)
             and getattr(ret.value.func, "attr", None) == "import_module"}


def names_read() -> set[tuple[str, str]]:
    """``(module, name)`` for every name the engine reads from a vLLM module (``vllm.LLM``,
    ``importlib.import_module("vllm.distributed").destroy_model_parallel``...)."""
    out = set()
    for function in FUNCTIONS.values():
        bound = {t.id: _import_target(n.value) for n in ast.walk(function) if isinstance(n, ast.Assign)
                 for t in n.targets if isinstance(t, ast.Name) and _import_target(n.value)}
        for node in ast.walk(function):
            if isinstance(node, ast.Attribute):
                module = _import_target(node.value) or (bound.get(node.value.id) if isinstance(node.value, ast.Name)
                                                        else None)
                if module and module.startswith("vllm"):
                    out.add((module, node.attr))
    return out


def modules_imported() -> set[str]:
    return {_import_target(n) for n in ast.walk(ENGINE) if _import_target(n) and _import_target(n).startswith("vllm")}


def dict_keys(function: ast.FunctionDef, name: str) -> tuple[set[str], list[ast.Call]]:
    """Keys the function puts in its dict ``name`` (``dict(k=...)``, ``name.update(k=...)``, ``name["k"] = ...``), and
    the calls whose result it merges in (``name.update(call())``)."""
    keys, merged = set(), []
    for node in ast.walk(function):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and target.id == name and isinstance(node.value, ast.Call):
                    keys |= {k.arg for k in node.value.keywords if k.arg}
                if isinstance(target, ast.Subscript) and getattr(target.value, "id", None) == name:
                    keys.add(_const(target.slice))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "update" \
                and getattr(node.func.value, "id", None) == name:
            keys |= {k.arg for k in node.keywords if k.arg}
            merged += [a for a in node.args if isinstance(a, ast.Call)]
    return keys, merged


def constructor_keywords(callee) -> set[str]:
    """Keywords of every call to ``callee(node) -> bool`` in the engine, ``**kwargs`` dicts expanded."""
    keys = set()
    for function in FUNCTIONS.values():
        for node in ast.walk(function):
            if isinstance(node, ast.Call) and callee(node.func):
                for keyword in node.keywords:
                    if keyword.arg:
                        keys.add(keyword.arg)
                    elif isinstance(keyword.value, ast.Name):
                        keys |= dict_keys(function, keyword.value.id)[0]
    return keys


def constraint_branches() -> list[tuple[str, str, set[str]]]:
    """``(vLLM class, SamplingParams keyword, class keywords)`` per structured-output API generation the engine knows,
    in the order it tries them (``_constraint_builder``)."""
    function = FUNCTIONS["_constraint_builder"]
    classes = {t.id: _const(n.value.args[1]) for n in ast.walk(function) if isinstance(n, ast.Assign)
               and isinstance(n.value, ast.Call) and getattr(n.value.func, "id", None) == "getattr"
               for t in n.targets}
    return [(classes[v.func.id], _const(k), {kw.arg for kw in v.keywords})
            for lam in ast.walk(function) if isinstance(lam, ast.Lambda) and isinstance(lam.body, ast.Dict)
            for k, v in zip(lam.body.keys, lam.body.values)]


def llm_method_calls() -> list[ast.Call]:
    return [n for n in ast.walk(ENGINE) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and _is_self(n.func.value, "llm")]


# --- the checks ------------------------------------------------------------------------------------------------------

def test_engine_calls_are_found_in_its_source():
    """The extraction itself: if this breaks, the checks below would pass on nothing."""
    assert {("vllm", "LLM"), ("vllm", "SamplingParams"), ("vllm.distributed", "cleanup_dist_env_and_memory"),
            ("vllm.distributed", "destroy_model_parallel")} <= names_read()
    assert {"model", "quantization", "enable_sleep_mode", "distributed_executor_backend"} <= constructor_keywords(
        lambda f: isinstance(f, ast.Attribute) and f.attr == "LLM")
    assert {"max_tokens", "temperature", "stop"} <= constructor_keywords(lambda f: _is_self(f, "_sampling_params"))
    assert {c.func.attr for c in llm_method_calls()} >= {"generate", "sleep", "wake_up", "collective_rpc"}
    assert [b[0] for b in constraint_branches()] == ["StructuredOutputsParams", "GuidedDecodingParams"]


def test_every_vllm_module_and_name_the_engine_reads_exists(vllm_source):
    missing = [m for m in modules_imported() if vllm_source.module(m) is None]
    missing += [f"{m}.{name}" for m, name in sorted(names_read()) if vllm_source.find(m, name) is None]
    assert not missing, f"missing in this vLLM: {missing}"


def test_llm_takes_every_keyword_the_engine_passes(vllm_source):
    """``LLM(model, *, ..., **kwargs)`` hands what it does not name to ``EngineArgs``: a keyword must be one or the
    other, or vLLM raises a TypeError at construction."""
    init = vllm_source.method("vllm.entrypoints.llm", "LLM", "__init__")
    assert any(isinstance(n, ast.Call) and getattr(n.func, "id", None) == "EngineArgs"
               and any(k.arg is None for k in n.keywords) for n in ast.walk(init)), "LLM no longer forwards **kwargs"
    known = {a.arg for a in init.args.args + init.args.kwonlyargs} | vllm_source.fields("vllm.engine.arg_utils",
                                                                                        "EngineArgs")
    ours = constructor_keywords(lambda f: isinstance(f, ast.Attribute) and f.attr == "LLM")
    assert ours - known == set()


def test_llm_literal_settings_are_values_vllm_accepts(vllm_source):
    backends = {_const(n.value) for n in ast.walk(ENGINE) if isinstance(n, ast.Assign) for t in n.targets
                if isinstance(t, ast.Subscript) and _const(t.slice) == "distributed_executor_backend"}
    assert backends == {"external_launcher"}  # what the engine passes, read from it
    assert backends <= vllm_source.literal("vllm.config.parallel", "DistributedExecutorBackend")
    assert vllm_source.literal("vllm.config.model", "ModelDType") >= {"auto"}
    wake_tags = {_const(e) for c in llm_method_calls() if c.func.attr == "wake_up" for k in c.keywords
                 for e in getattr(k.value, "elts", [])}
    doc = ast.get_docstring(vllm_source.method("vllm.entrypoints.llm", "LLM", "wake_up"))
    assert all(f'"{tag}"' in doc for tag in wake_tags), (wake_tags, doc)


def test_llm_methods_take_the_arguments_the_engine_passes(vllm_source):
    problems = []
    for call in llm_method_calls():
        method = vllm_source.method("vllm.entrypoints.llm", "LLM", call.func.attr)
        if method is None:
            problems.append(f"LLM.{call.func.attr} is gone")
            continue
        keywords = {k.arg for k in call.keywords if k.arg}
        problems += [f"LLM.{call.func.attr}: {p}" for p in takes(method, keywords, len(call.args))]
        if call.func.attr == "collective_rpc":  # the method name runs on every GPU worker
            rpc = _const(call.args[0])
            if vllm_source.method("vllm.v1.worker.gpu_worker", "Worker", rpc) is None:
                problems.append(f"the GPU worker has no {rpc!r} for collective_rpc")
    assert not problems


def test_sampling_params_has_every_field_the_engine_sets(vllm_source):
    fields = vllm_source.fields("vllm.sampling_params", "SamplingParams")
    ours = constructor_keywords(lambda f: _is_self(f, "_sampling_params"))
    assert ours - fields == set()


def test_structured_output_branch_the_engine_takes_exists_with_regex(vllm_source):
    """The engine takes the first structured-output class this vLLM offers: it must be there, take ``regex``, and
    ``SamplingParams`` must take it under the engine's keyword."""
    fields = vllm_source.fields("vllm.sampling_params", "SamplingParams")
    offered = [b for b in constraint_branches() if vllm_source.find("vllm.sampling_params", b[0])]
    assert offered, "neither structured-output class exists: the engine would refuse structured output"
    cls, keyword, constraint_keywords = offered[0]
    assert keyword in fields
    assert constraint_keywords - vllm_source.fields("vllm.sampling_params", cls) == set()


def test_prompts_are_token_prompts_vllm_knows(vllm_source):
    keys = {_const(k) for n in ast.walk(FUNCTIONS["VLLMOracle.generate"]) if isinstance(n, ast.Dict) for k in n.keys}
    assert keys and keys - vllm_source.fields("vllm.inputs", "TokensPrompt") == set()


def test_outputs_have_every_attribute_the_engine_reads(vllm_source):
    generate = vllm_source.method("vllm.entrypoints.llm", "LLM", "generate")
    assert "RequestOutput" in ast.unparse(generate.returns)
    init = vllm_source.method("vllm.outputs", "RequestOutput", "__init__")
    assert "CompletionOutput" in ast.unparse(next(a for a in init.args.args if a.arg == "outputs").annotation)
    read = {(n.value.id, n.attr) for n in ast.walk(FUNCTIONS["VLLMOracle.generate"]) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id in OUTPUT_TYPES}
    assert {name for name, _ in read} == set(OUTPUT_TYPES)
    missing = [f"{OUTPUT_TYPES[v][1]}.{a}" for v, a in sorted(read) if a not in vllm_source.fields(*OUTPUT_TYPES[v])]
    assert not missing


def test_sleep_mode_is_there(vllm_source):
    assert "enable_sleep_mode" in vllm_source.fields("vllm.engine.arg_utils", "EngineArgs")
    sleep = vllm_source.method("vllm.entrypoints.llm", "LLM", "sleep")
    assert [a.arg for a in sleep.args.args][:2] == ["self", "level"]


# --- oracle_engine="auto": honest about what has not run on a GPU yet ----------------------------------------------

@pytest.fixture
def vllm_importable(monkeypatch):
    """vLLM "installed" for ``resolve_engine``, and the once-per-process warning not yet given."""
    import importlib.util

    import reflect_trainer.oracles as oracles

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm"
                        else real_find_spec(name, *a))
    monkeypatch.setattr(oracles, "_vllm_warned", False)


def untested_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "untested on GPUs" in
            r.getMessage()]


def test_auto_picking_vllm_warns_once_that_it_is_untested_on_gpus_and_names_the_way_out(
        vllm_importable, oracle_path, caplog):
    from reflect_trainer.oracles import resolve_engine

    with caplog.at_level(logging.WARNING, logger="reflect_trainer.oracles"):
        assert resolve_engine("auto", oracle_path, "cuda:0")[0] == "vllm"
        assert resolve_engine("auto", oracle_path, "cuda:0")[0] == "vllm"  # the trainer and the recycler both ask
    (message,) = untested_warnings(caplog)
    assert "benchmarks/gpu_vllm_check.py" in message and "oracle_engine='transformers'" in message


def test_no_untested_warning_when_vllm_is_chosen_explicitly_not_chosen_or_gpu_checked(
        vllm_importable, oracle_path, caplog, monkeypatch):
    from reflect_trainer.oracles import resolve_engine

    with caplog.at_level(logging.WARNING, logger="reflect_trainer.oracles"):
        assert resolve_engine("vllm", oracle_path, "cuda:0")[0] == "vllm"  # the user asked for it
        assert resolve_engine("auto", oracle_path, "cpu")[0] == "transformers"
        monkeypatch.setattr(vllm_engine, "GPU_CHECKED_RELEASE", "0.9.0")  # once gpu_vllm_check.py has passed
        assert resolve_engine("auto", oracle_path, "cuda:0")[0] == "vllm"
    assert untested_warnings(caplog) == []


# --- where the two ends differ: bitsandbytes (nf4) left vLLM in 0.28 -------------------------------------------------

@pytest.fixture
def fake_vllm_with_real_quantizations(monkeypatch, vllm_source):
    """A stand-in ``vllm`` (as in test_vllm_engine.py) whose quantization methods are this version's real ones."""
    log = []
    methods = sorted(vllm_source.literal("vllm.model_executor.layers.quantization", "QuantizationMethods"))
    assert vllm_source.find("vllm.model_executor.layers.quantization", "QUANTIZATION_METHODS")
    vllm = types.ModuleType("vllm")
    vllm.__version__ = "real-list"
    vllm.LLM = lambda **kwargs: log.append(kwargs)
    vllm.SamplingParams = dict
    quantization = types.ModuleType("vllm.model_executor.layers.quantization")
    quantization.QUANTIZATION_METHODS = methods
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.StructuredOutputsParams = dict
    for name, module in (("vllm", vllm), ("vllm.sampling_params", sampling),
                         ("vllm.model_executor.layers.quantization", quantization)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return log, methods


def test_nf4_reaches_vllm_where_it_has_bitsandbytes_and_is_refused_with_the_fix_where_not(
        fake_vllm_with_real_quantizations, oracle_path):
    log, methods = fake_vllm_with_real_quantizations
    assert QUANTIZATIONS["none"] is None
    if QUANTIZATIONS["nf4"] in methods:
        VLLMOracle(oracle_path, quantization="nf4")
        assert log[-1]["quantization"] == "bitsandbytes"
    else:
        with pytest.raises(ValueError, match=re.escape("oracle_quantization='none'")):
            VLLMOracle(oracle_path, quantization="nf4")
        assert log == []  # refused before vLLM builds anything
    VLLMOracle(oracle_path, quantization="none")
    assert log[-1]["quantization"] is None


def test_both_ends_are_what_the_engine_was_written_for():
    """The range's known difference, pinned: if a new end changes it, this says where to look."""
    ends = {v: VLLMSource(fetch_wheel(v)) for v in VERSIONS}
    has_bnb = {v: "bitsandbytes" in s.literal("vllm.model_executor.layers.quantization", "QuantizationMethods")
               for v, s in ends.items()}
    assert has_bnb == {VERSIONS[0]: True, VERSIONS[1]: False}
    assert all(s.find("vllm.sampling_params", "GuidedDecodingParams") is None for s in ends.values())


def test_auto_quantization_on_vllm_is_nf4_only_where_that_vllm_has_bitsandbytes(fake_vllm_with_real_quantizations):
    from reflect_trainer.oracles import resolve_quantization

    _, methods = fake_vllm_with_real_quantizations
    chosen, why = resolve_quantization("vllm", "auto", "cuda:0")
    assert chosen == ("nf4" if "bitsandbytes" in methods else "none"), why
