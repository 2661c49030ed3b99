"""First contact: the CLI is generated from ``ReflectionConfig``; a bad name, path, server or data set fails before the
student or the oracle is touched, with the fix in the message; the CLI maps it to exit 2 in one line; and the
package installs into an environment that already trains with TRL without changing it."""

import dataclasses
import json
import logging
import re
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from datasets import Dataset, IterableDataset

from reflect_trainer import InputError, ReflectionConfig
from reflect_trainer.cli import RECYCLE_ALIASES, build_parser, main
from test_support.students import UntouchableStudent

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [{"instruction": "Name a colour.", "input": "", "output": "Red."},
         {"instruction": "Name a fruit.", "input": "", "output": "An apple."}]


def closed_port_url() -> str:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture
def no_oracle_work(monkeypatch):
    """Building a Recycler (which loads or calls the oracle) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the recycler was built before the input check")

    monkeypatch.setattr("reflect_trainer.recycler.Recycler", refuse)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- the CLI is generated from the config ------------------------------------------------------------------------
def help_entries(capsys, monkeypatch) -> dict[str, str]:
    """`recycle --help` as {option string: its entry, whitespace normalised}."""
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_:
        main(["recycle", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    entries: dict[str, str] = {}
    for block in re.split(r"\n(?=  -)", text.split("options:", 1)[1]):
        entry = " ".join(block.split())
        for option in re.findall(r"(?:^|, )(--[\w-]+)", entry):
            entries[option] = entry
    return entries


def test_recycle_help_lists_every_config_field_with_the_configs_default(capsys, monkeypatch):
    entries = help_entries(capsys, monkeypatch)
    for field in dataclasses.fields(ReflectionConfig):
        entry = entries.get(f"--{field.name}")
        assert entry is not None, f"--{field.name} is not a flag of recycle"
        assert f"--{field.name.replace('_', '-')}" in entry
        if field.name == "cache_dir":  # deliberately different, and the help says so and why
            assert f"'{field.default}'" in entry and "OUT without suffix + .cache" in entry and "resumes" in entry
        else:
            default = field.default_factory() if field.default is dataclasses.MISSING else field.default
            assert f"(default: {default})" in entry, entry


def test_recycle_keeps_the_flag_names_of_existing_command_lines():
    args = build_parser().parse_args([
        "recycle", "d.jsonl", "--out", "o.jsonl", "--oracle", "/m", "--engine", "openai", "--base-url", "http://h/v1",
        "--served-model", "m", "--quantization", "none", "--templates", "compact", "--batch-size", "4",
        "--structured-output", "--selection-drop", "--selection-threshold", "0.5", "--max-new-tokens", "64",
        "--on-bad-row", "skip", "--cache-dir", "c", "--mode", "response", "--limit", "3", "--keep-dropped"])
    assert (args.oracle_model_path, args.oracle_engine, args.oracle_base_url, args.oracle_served_model,
            args.oracle_quantization, args.template_set, args.oracle_batch_size) == (
        "/m", "openai", "http://h/v1", "m", "none", "compact", 4)
    assert args.structured_output is True and args.selection_drop is True and args.selection_threshold == 0.5
    assert (args.max_new_tokens, args.on_bad_row, args.cache_dir, args.mode, args.limit, args.keep_dropped) == (
        64, "skip", "c", "response", 3, True)
    assert set(RECYCLE_ALIASES.values()) <= {f.name for f in dataclasses.fields(ReflectionConfig)}


def capture_config(monkeypatch) -> list:
    """Replace the Recycler by one that records the config it was given, then stops the command (exit 1)."""
    seen = []

    def record(config, **kwargs):
        seen.append(config)
        raise RuntimeError("stop here")

    monkeypatch.setattr("reflect_trainer.recycler.Recycler", record)
    return seen


def test_recycle_defaults_the_cache_beside_the_output_so_a_rerun_finds_it(tmp_path, monkeypatch):
    seen = capture_config(monkeypatch)
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    assert main(["recycle", str(data), "--out", str(tmp_path / "runs" / "recycled.jsonl")]) == 1
    assert seen[0].cache_dir == str(tmp_path / "runs" / "recycled.cache")
    assert seen[0].max_new_tokens == ReflectionConfig().max_new_tokens  # the config's default, not the CLI's own


def test_recycle_config_file_sets_fields_and_the_command_line_wins(tmp_path, monkeypatch, caplog):
    seen = capture_config(monkeypatch)
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    config = tmp_path / "recycle.yaml"
    config.write_text(f"data: {data}\nout: {tmp_path / 'o.jsonl'}\nmode: response\nmax_new_tokens: 64\n"
                      "loop_ngram: 6\nlearning_rate: 2.0e-5\n")  # a recipe's training key: ignored, said so
    with caplog.at_level(logging.WARNING):
        assert main(["recycle", "--config", str(config), "--max-new-tokens", "32"]) == 1
    assert (seen[0].mode, seen[0].max_new_tokens, seen[0].loop_ngram) == ("response", 32, 6)
    assert "learning_rate" in caplog.text


def test_recycle_config_file_with_a_misspelt_key_exits_2_naming_it(tmp_path, capsys, no_oracle_work):
    config = tmp_path / "recycle.yaml"
    config.write_text("oracle_engin: openai\n")
    assert main(["recycle", "d.jsonl", "--out", "o.jsonl", "--config", str(config)]) == 2
    assert "did you mean 'oracle_engine'" in capsys.readouterr().err


# ---- the config refuses what cannot work, when it is built -------------------------------------------------------
@pytest.mark.parametrize("settings, message", [
    (dict(oracle_engine="vlm"), r"oracle_engine='vlm' is not known; use one of auto, transformers, .*vllm"),
    (dict(oracle_quantization="q4"), r"oracle_quantization='q4' is not known; use one of auto, nf4, int8, none"),
])
def test_config_refuses_an_unknown_engine_or_quantization_listing_the_valid_ones(settings, message):
    with pytest.raises(InputError, match=message):
        ReflectionConfig(**settings)


def test_config_takes_the_embedded_oracle_by_name_and_a_path_of_another_machine():
    assert ReflectionConfig(oracle_model_path="embedded:smollm2").oracle_model_path is None
    assert ReflectionConfig(oracle_model_path="embedded").oracle_model_path is None
    # A recipe names the folder on the machine it runs on: the path is checked where it is used, not parsed.
    assert ReflectionConfig(oracle_model_path="/models/oracle").oracle_model_path == "/models/oracle"


# ---- the trainer checks before it prepares the student -----------------------------------------------------------
def build_trainer(train_dataset, config=None, **kwargs):
    from reflect_trainer import ReflectionSFTTrainer

    started = time.perf_counter()
    try:
        ReflectionSFTTrainer(UntouchableStudent(), train_dataset=train_dataset, reflection_config=config, **kwargs)
    finally:
        assert time.perf_counter() - started < 10  # seconds: far below any model set-up (typically < 0.1)


def empty_stream():
    return IterableDataset.from_generator(lambda: iter(()))


@pytest.mark.parametrize("dataset", [Dataset.from_list([]), Dataset.from_dict({"instruction": [], "output": []}),
                                     "stream"], ids=["no columns", "alpaca columns", "stream"])
def test_trainer_refuses_an_empty_train_set_before_the_student(dataset, tmp_path):
    dataset = empty_stream() if dataset == "stream" else dataset
    with pytest.raises(ValueError, match="train_dataset has no rows"):
        build_trainer(dataset, ReflectionConfig(cache_dir=str(tmp_path)))


def test_trainer_refuses_an_unknown_data_format_before_the_student(tmp_path):
    with pytest.raises(ValueError, match=r"columns \['question'\]; expected Alpaca"):
        build_trainer(Dataset.from_dict({"question": ["Why?"]}), ReflectionConfig(cache_dir=str(tmp_path)))


@pytest.mark.parametrize("where, message", [
    ("missing", r"oracle_model_path '.*missing' does not exist; pass a local model folder \(with config.json\)"),
    ("empty folder", r"has no config.json: it is not a model folder; pass the folder that holds config.json"),
])
def test_trainer_refuses_an_oracle_path_that_cannot_load_before_the_student(where, message, tmp_path):
    path = tmp_path / where
    if where == "empty folder":
        path.mkdir()
    config = ReflectionConfig(cache_dir=str(tmp_path / "cache"), oracle_model_path=str(path))
    with pytest.raises(InputError, match=message):
        build_trainer(Dataset.from_list(PAIRS), config)


def test_trainer_refuses_an_oracle_server_that_does_not_answer_before_the_student(tmp_path):
    url = closed_port_url()
    config = ReflectionConfig(cache_dir=str(tmp_path), oracle_engine="openai", oracle_base_url=url,
                              oracle_served_model="m")
    started = time.perf_counter()
    with pytest.raises(InputError, match=rf"oracle server at {re.escape(url)} does not answer GET /models .*start it"):
        build_trainer(Dataset.from_list(PAIRS), config)
    assert time.perf_counter() - started < 6  # the short timeout, not oracle_timeout's 300 s


# ---- the CLI: every error is an exit code and one line -----------------------------------------------------------
def one_line_error(caplog) -> str:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and not errors[0].exc_info, "one error line, no traceback"
    message = errors[0].getMessage()
    assert "\n" not in message and "Traceback" not in caplog.text
    return message


@pytest.mark.parametrize("rows_or_text, extra, message", [
    ("", [], "has no rows"),
    ([{"question": "Why?"}], [], r"columns \['question'\]; expected Alpaca"),
    (PAIRS, ["--oracle", "/no/such/oracle"], "'/no/such/oracle' does not exist"),
    (PAIRS, ["--engine", "vlm"], "oracle_engine='vlm' is not known"),
    (PAIRS, ["--quantization", "q4"], "oracle_quantization='q4' is not known"),
    (PAIRS, ["--engine", "openai", "--base-url", "CLOSED", "--served-model", "m"], "does not answer GET /models"),
    (PAIRS, ["--mode", "selective"], "needs --student PATH"),
], ids=["empty", "unknown format", "missing oracle", "unknown engine", "unknown quantization", "server down",
        "selective without student"])
def test_cli_recycle_exits_2_with_one_line_before_any_oracle_work(rows_or_text, extra, message, tmp_path, caplog,
                                                                  no_oracle_work):
    data = tmp_path / "data.jsonl"
    data.write_text(rows_or_text) if isinstance(rows_or_text, str) else write_jsonl(data, rows_or_text)
    extra = [closed_port_url() if a == "CLOSED" else a for a in extra]
    out = tmp_path / "out.jsonl"
    with caplog.at_level(logging.INFO):
        assert main(["recycle", str(data), "--out", str(out), *extra]) == 2
    assert re.search(message, one_line_error(caplog))
    assert not out.exists()


def test_cli_maps_an_unexpected_error_to_exit_1_in_one_line(tmp_path, caplog, monkeypatch):
    capture_config(monkeypatch)  # the "recycler" raises RuntimeError
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    assert main(["recycle", str(data), "--out", str(tmp_path / "o.jsonl")]) == 1
    assert one_line_error(caplog) == "RuntimeError: stop here (rerun with -v for the traceback)"


# ---- packaging ---------------------------------------------------------------------------------------------------
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_package_metadata_says_the_python_and_keeps_heavy_packages_in_extras():
    meta = project()
    assert meta["requires-python"] == ">=3.11"
    core = " ".join(meta["dependencies"])
    for heavy in ("deepspeed", "bitsandbytes", "vllm", "llama-cpp"):
        assert heavy not in core
    extras = meta["optional-dependencies"]
    assert {"deepspeed", "quantization", "vllm", "llama-cpp", "eval", "test", "all"} <= set(extras)


def fake_environment(tmp_path: Path, leave_out: tuple[str, ...], versions: dict[str, str] | None = None) -> Path:
    """A copy of this environment's package metadata (no code) in a fresh venv, without ``leave_out`` and with the
    ``versions`` given (name -> version): what pip sees in a user's TRL environment."""
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    site = next((env / "lib").glob("python3*/site-packages"))
    ours = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "trl").is_dir())
    for dist in ours.glob("*.dist-info"):
        name = dist.name.split("-")[0].lower().replace("_", "-")
        if name in leave_out or name.startswith("nvidia-"):
            continue
        metadata = (dist / "METADATA").read_text()
        dist_name = dist.name
        if versions and name in versions:
            old = re.search(r"^Version: (.+)$", metadata, re.M).group(1)
            metadata = metadata.replace(f"Version: {old}", f"Version: {versions[name]}", 1)
            dist_name = dist.name.replace(old, versions[name])
        (site / dist_name).mkdir()
        (site / dist_name / "METADATA").write_text(metadata)
        (site / dist_name / "RECORD").write_text("")
    return env


def dry_run(env: Path, requirements: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "--dry-run", "--no-index",
         "--quiet", "--report", str(tmp_path / "report.json"), *requirements],
        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("transformers_version", ["5.18.0", "5.23.0", "5.25.0"])  # the suite's, and make compat's
def test_installing_into_a_trl_environment_changes_nothing_and_pulls_no_deepspeed_or_bitsandbytes(
        tmp_path, transformers_version):
    from importlib.metadata import version

    assert (version("trl"), version("transformers")) == ("1.16.0", "5.23.0")
    # The environment: everything here (trl 1.16.0, transformers, torch ...) except deepspeed, bitsandbytes and us.
    env = fake_environment(tmp_path, ("deepspeed", "bitsandbytes", "reflect-trainer"),
                           {"transformers": transformers_version})
    # No index: anything the core requirements need that the environment lacks fails the resolution, named.
    result = dry_run(env, project()["dependencies"], tmp_path)
    assert result.returncode == 0, result.stderr
    installs = [(p["metadata"]["name"], p["metadata"]["version"])
                for p in json.loads((tmp_path / "report.json").read_text())["install"]]
    assert installs == []  # trl and transformers unchanged, no deepspeed, bitsandbytes or nvidia-* package
    # The check can fail: the same environment does not satisfy the quantization extra.
    assert dry_run(env, [*project()["dependencies"], "bitsandbytes"], tmp_path).returncode != 0


def test_the_embedded_demo_oracle_comes_with_a_loud_warning_unless_asked_for_by_name(caplog, tmp_path):
    from reflect_trainer import Recycler

    with caplog.at_level(logging.WARNING, logger="reflect_trainer.recycler"):
        Recycler(ReflectionConfig(cache_dir=str(tmp_path / "a")))
    warned = [r.getMessage() for r in caplog.records if "DEMO oracle" in r.getMessage()]
    assert len(warned) == 1 and "135M" in warned[0] and "oracle_model_path" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="reflect_trainer.recycler"):
        named = Recycler(ReflectionConfig(cache_dir=str(tmp_path / "b"), oracle_model_path="embedded:smollm2"))
    assert not [r for r in caplog.records if "DEMO oracle" in r.getMessage()]
    assert named._oracle_path == Recycler(ReflectionConfig(cache_dir=str(tmp_path / "c")))._oracle_path
