"""Fault harness with the real oracle (the embedded SmolLM2-135M-Instruct, greedy) and the real launchers: kill -9
at random instants of ``ReflectionSFTTrainer``'s epoch 1 on 2 ranks (``accelerate launch``) and of the offline
``reflect-trainer recycle``, each followed by a resume; and a 2-machine trainer run (``accelerate launch
--num_machines 2``, each machine in its own UTS and pid namespace, loopback rendezvous) on one shared cache.

Kills are chained: a run is killed at a random instant, resumed (the trainer from its newest complete checkpoint),
killed again, ... and, once most of the oracle work is cached, completed and compared with an uninterrupted run;
then a new chain starts on an empty cache. Each kill instant is drawn uniformly over the oracle work still left
(measured on the uninterrupted run), starting when the run opens its cache. Trainer kills alternate between one
rank (the launcher must then stop the other: no hang) and the whole job (a machine crash).

The student is a 1.6M-parameter model with SmolLM2's tokenizer (random weights, saved once): the oracle's work and
the trainer's bookkeeping are what is tested, and checkpoints of it take milliseconds. The data are the shortest
real AlpacaEval pairs. A probe (a ``sitecustomize`` on the children's ``PYTHONPATH``) logs each key a process sends
to the oracle, as ``faults.py``'s scripted generate does; it changes nothing else.

Columns as in ``faults.py``: rows lost (a record present after a kill and missing or changed later, or an exported row
missing or different from the uninterrupted run's), stored twice (record lines of one key beyond the first),
duplicate generations (keys sent to the oracle more than once, not counting work lost with a killed run), hangs (a
process still running past its deadline, e.g. a rank left waiting by a killed one), wrong hits (a record whose text
is not the uninterrupted run's for that key, or a key it never generated). All checks: the cache opened after every
kill, every completion exited 0, and its export equals the uninterrupted run's. Exits 1 if any count is not 0 or a
check failed.

    PYTHONPATH=. .venv/bin/python benchmarks/faults_real.py [--kills 20] [--cli-kills 20] [--host-trials 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from test_support.cache_files import records_by_writer  # noqa: E402
from test_support.data import short_pairs  # noqa: E402
from test_support.http_server import free_port  # noqa: E402
from test_support.students import tiny_student  # noqa: E402

RECIPE = REPO / "recipes" / "llama7b_recycled.py"
CPU_CONFIG = REPO / "recipes" / "cpu_smollm2.yaml"
STARTED, FINISHED = 600.0, 60.0  # deadlines: a whole run; all of a job's processes gone after a kill

# Loaded by every child Python (its directory is first on PYTHONPATH). Once reflect_trainer.cache is imported, it
# wraps RecycleCache: each cache writes "ready-<tag>-<pid>" when opened (the run reached its cache: epoch 1 begins),
# each key handed to the oracle is logged as "<key> <writer id>" with one O_APPEND write (survives kill -9), and
# claims of dead owners taken over are counted in "takeovers-<tag>-<pid>".
PROBE = r'''
import os, sys
if os.environ.get("FAULTS_CALLS"):
    import importlib.abc, importlib.util

    def _patch(module):
        cls = module.RecycleCache
        calls, tag = os.environ["FAULTS_CALLS"], os.environ.get("FAULTS_TAG", "run")
        init, get_or_generate = cls.__init__, cls.get_or_generate

        def _append(name, text):
            fd = os.open(os.path.join(calls, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)

        def __init__(self, *args, **kwargs):
            init(self, *args, **kwargs)
            _append(f"ready-{tag}-{os.getpid()}", "")

        def logged_get_or_generate(self, keys, generate):
            def logged(mine):
                _append(f"{tag}-{os.getpid()}.log", "".join(f"{k} {self.writer_id}\n" for k in mine))
                return generate(mine)
            fetched = get_or_generate(self, keys, logged)
            if fetched.taken_over:
                _append(f"takeovers-{tag}-{os.getpid()}", f"{fetched.taken_over}\n")
            return fetched

        cls.__init__, cls.get_or_generate = __init__, logged_get_or_generate

    class _Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "reflect_trainer.cache":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            loader_exec = spec.loader.exec_module

            def exec_module(module):
                loader_exec(module)
                _patch(module)
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Hook())
'''


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def records(cache_dir: Path) -> list[dict]:
    """Every record on disk, each with ``_segment``: the writer id of the segment that holds it."""
    return [{**r, "_segment": writer} for writer, recs in records_by_writer(cache_dir).items() for r in recs]


def export_rows(path: Path) -> list[dict] | None:
    if not path.exists():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Setup:
    """What every scenario shares: the data, the student, the probe, the uninterrupted references."""

    def __init__(self, root: Path, pairs: int, max_new_tokens: int):
        self.root = root
        self.max_new_tokens = max_new_tokens
        rows = short_pairs().to_list()
        # The shortest real pairs: prefill, not the protocol, would otherwise take the time.
        rows = sorted(rows, key=lambda r: len(r["instruction"]) + len(r["input"]) + len(r["output"]))[:pairs]
        self.data = root / "pairs.jsonl"
        self.data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.pairs = len(rows)
        self.student = tiny_student(root / "student")  # the student whose training the scenarios run
        probe = root / "probe"
        probe.mkdir()
        (probe / "sitecustomize.py").write_text(PROBE)
        path = os.pathsep.join([str(probe), str(REPO), os.environ.get("PYTHONPATH", "")])
        self.env = {**os.environ, "PYTHONPATH": path,
                    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                    "TOKENIZERS_PARALLELISM": "false"}

    # ---- command lines ----
    def trainer_args(self, run: Path, resume: Path | None = None) -> list[str]:
        return [str(RECIPE), "--config", str(CPU_CONFIG), "--model_name_or_path", str(self.student),
                "--dataset_path", str(self.data), "--mode", "both", "--max_new_tokens", str(self.max_new_tokens),
                "--max_length", "256", "--per_device_train_batch_size", "1", "--buffer_batches", "2",
                "--num_train_epochs", "1", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "1",
                "--output_dir", str(run / "out"), "--cache_dir", str(run / "cache"),
                "--stats_file", str(run / "stats-{rank}.json"), "--recycled_out", str(run / "recycled.jsonl"),
                *(["--resume_from_checkpoint", str(resume)] if resume else [])]

    def trainer_cmd(self, run: Path, resume: Path | None = None) -> list[str]:
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port()), *self.trainer_args(run, resume)]

    def cli_cmd(self, run: Path) -> list[str]:
        return [sys.executable, "-m", "reflect_trainer.cli", "recycle", str(self.data), "--out",
                str(run / "recycled.jsonl"), "--cache-dir", str(run / "cache"), "--mode", "both", "--templates",
                "compact", "--max-new-tokens", str(self.max_new_tokens), "--batch-size", "2"]


class Run:
    """One launch of a command in its own session (so the whole job can be killed), with the probe's logs."""

    def __init__(self, setup: Setup, cmd: list[str], calls: Path, tag: str, log: Path):
        self.calls, self.tag = calls, tag
        calls.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.log = open(log, "ab")
        self.log_path, self.log_start = log, self.log.tell()  # this run's output starts here in the shared log
        self.proc = subprocess.Popen(cmd, env={**setup.env, "FAULTS_CALLS": str(calls), "FAULTS_TAG": tag},
                                     cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def ready(self, timeout: float = STARTED) -> float | None:
        """Seconds from launch until a process of this run opened the cache; None if the run ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if list(self.calls.glob(f"ready-{self.tag}-*")):
                return time.monotonic() - self.started
            if self.proc.poll() is not None:
                return None
            time.sleep(0.05)
        return None

    def wait(self, timeout: float) -> bool:
        """True if the run (and every process of its session) ended in time; otherwise kill it: a hang."""
        deadline = time.monotonic() + timeout
        try:
            self.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill_all()
            return False
        while time.monotonic() < deadline:  # the launcher is gone; are its workers?
            if not self._session_alive():
                return True
            time.sleep(0.1)
        self.kill_all()
        return False

    def _session_alive(self) -> bool:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == self.proc.pid and fields[0] != "Z":  # field 6 (session id) after state, ppid, pgrp
                return True
        return False

    def kill_all(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def workers(self) -> list[int]:
        return [p for p in descendants(self.proc.pid) if str(RECIPE) in cmdline(p) and "accelerate" not in cmdline(p)]

    def close(self) -> None:
        self.log.close()

    def error_lines(self, most: int = 12) -> str:
        """The last lines of this run's output that name an error (what a failed check prints)."""
        with open(self.log_path, "rb") as f:
            f.seek(self.log_start)
            lines = f.read().decode(errors="replace").splitlines()
        errors = [ln for ln in lines if "Error" in ln or "error" in ln or "Traceback" in ln]
        return "\n    ".join((errors or lines)[-most:])


class Chains:
    """Chained kill/resume runs of one command (trainer or CLI) and their bookkeeping."""

    def __init__(self, setup: Setup, name: str, kind: str, rng: random.Random):
        self.setup, self.kind, self.rng = setup, kind, rng
        self.base = setup.root / name
        self.base.mkdir()
        self.n = 0
        self.counts = Counter()
        self.checks_failed: list[str] = []
        self.reference = self._reference()
        # The oracle work of a whole run, in seconds: kill instants are drawn over what is left of it. Grown when a
        # run ends before its kill instant (on a shared machine the same work takes longer at times).
        self.window = self.reference["window"]

    def _cmd(self, run: Path, resume: Path | None = None) -> list[str]:
        return self.setup.trainer_cmd(run, resume) if self.kind == "trainer" else self.setup.cli_cmd(run)

    def _launch(self, run: Path, resume: Path | None = None) -> Run:
        self.n += 1
        return Run(self.setup, self._cmd(run, resume), run / "calls", f"r{self.n}", self.base / "runs.log")

    def _reference(self) -> dict:
        run = self.base / "reference"
        launch = self._launch(run)
        ready = launch.ready()
        ok = launch.wait(STARTED) and launch.proc.returncode == 0
        launch.close()
        elapsed = time.monotonic() - launch.started
        if not ok or ready is None:
            raise SystemExit(f"the uninterrupted {self.kind} run failed: see {self.base / 'runs.log'}")
        recs = records(run / "cache")
        return {"raw": {r["key"]: r["raw"] for r in recs}, "export": export_rows(run / "recycled.jsonl"),
                "startup": ready, "window": elapsed - ready, "elapsed": elapsed}

    def _newest_checkpoint(self, run: Path) -> Path | None:
        """The newest checkpoint the Trainer finished (its trainer_state.json is written last)."""
        done = [p for p in (run / "out").glob("checkpoint-*") if (p / "trainer_state.json").exists()]
        return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None

    def run(self, kills: int) -> None:
        chain = 0
        while self.counts["faults"] < kills:
            chain += 1
            self._chain(self.base / f"chain{chain}", kills)

    def _chain(self, run: Path, kills: int) -> None:
        killed_tags: set[str] = set()
        before: dict[str, str] = {}
        while True:
            cached = len({r["key"] for r in records(run / "cache")}) if (run / "cache").exists() else 0
            left = 1 - cached / max(1, len(self.reference["raw"]))
            if self.counts["faults"] >= kills or left < 0.15:
                break
            launch = self._launch(run, self._newest_checkpoint(run) if self.kind == "trainer" else None)
            launch_ready = launch.ready()
            if launch_ready is None:
                self.counts["hangs"] += not launch.wait(FINISHED)
                launch.close()
                self.checks_failed.append(f"{launch.tag}: ended before opening its cache (rc {launch.proc.returncode})"
                                          ":\n    " + launch.error_lines())
                break
            time.sleep(self.rng.uniform(0, self.window * left + 1.0))
            if launch.proc.poll() is None:
                mode = ("one rank", "whole job")[self.counts["faults"] % 2] if self.kind == "trainer" else "process"
                workers = launch.workers() if mode == "one rank" else []
                if workers:
                    os.kill(self.rng.choice(workers), signal.SIGKILL)  # the launcher must stop the other rank
                else:
                    mode = "whole job" if self.kind == "trainer" else mode
                    os.killpg(launch.proc.pid, signal.SIGKILL)
                self.counts["faults"] += 1
                self.counts[f"kill {mode}"] += 1
                killed_tags.add(launch.tag)
            self.counts["hangs"] += not launch.wait(FINISHED if launch.tag in killed_tags else STARTED)
            launch.close()
            before = self._after_fault(run, before)
            if launch.tag not in killed_tags:  # it finished before its kill instant: the chain is complete
                self.window = max(self.window, time.monotonic() - launch.started - launch_ready)
                self._verify(run, launch, killed_tags)
                return
        launch = self._launch(run, self._newest_checkpoint(run) if self.kind == "trainer" else None)
        self.counts["hangs"] += not launch.wait(STARTED)
        launch.close()
        self._after_fault(run, before)
        self._verify(run, launch, killed_tags)

    def _after_fault(self, run: Path, before: dict[str, str]) -> dict[str, str]:
        """The cache opens; nothing it held before is gone or changed."""
        from reflect_trainer.cache import RecycleCache

        try:
            cache = RecycleCache(run / "cache")
        except Exception as err:  # noqa: BLE001 - counted: the table reports it
            self.checks_failed.append(f"the cache did not open: {err!r}")
            return before
        self.counts["lost"] += sum(k not in cache or cache.get(k)["raw"] != raw for k, raw in before.items())
        return {r["key"]: r["raw"] for r in cache.records()}

    def _verify(self, run: Path, last: Run, killed_tags: set[str]) -> None:
        if last.proc.returncode != 0:
            self.checks_failed.append(f"{run.name}: the completing run exited {last.proc.returncode}:\n    "
                                      + last.error_lines())
        recs = records(run / "cache")
        per_key = Counter(r["key"] for r in recs)
        self.counts["twice"] += sum(n - 1 for n in per_key.values())
        self.counts["wrong"] += sum(self.reference["raw"].get(r["key"]) != r["raw"] for r in recs)
        self.counts["lost"] += sum(k not in per_key for k in self.reference["raw"])
        stored_in = {(r["_segment"], r["key"]) for r in recs}
        completed = Counter()
        for log in (run / "calls").glob("r*.log"):
            tag = log.stem.split("-")[0]
            for entry in log.read_text().splitlines():
                key, writer = entry.split(" ", 1)
                if tag not in killed_tags or (writer, key) in stored_in:
                    completed[key] += 1
        self.counts["dup_gen"] += sum(n - 1 for n in completed.values() if n > 1)
        exported, expected = export_rows(run / "recycled.jsonl"), self.reference["export"]
        if exported != expected:
            missing = len(expected) - sum(row in (exported or []) for row in expected)
            self.counts["lost"] += missing
            self.checks_failed.append(f"{run.name}: export differs from the uninterrupted run's "
                                      f"({missing} of {len(expected)} rows missing or different)")
        self.counts["takeovers"] += sum(int(n) for f in (run / "calls").glob("takeovers-*")
                                        for n in f.read_text().split())
        self.counts["chains"] += 1


def two_hosts(setup: Setup, reference: dict, trial: int) -> dict:
    """``accelerate launch --num_machines 2``: machine rank r in its own UTS + pid namespace (hostname hostA/hostB),
    rendezvous on 127.0.0.1, one cache directory."""
    run = setup.root / f"hosts{trial}"
    port = free_port()
    launches = []
    for machine, host in enumerate(("hostA", "hostB")):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "2", "--machine_rank", str(machine), "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
               *setup.trainer_args(run)]
        inner = ["unshare", "--uts", "--pid", "--fork", "--kill-child", "--mount-proc", "sh", "-c",
                 f'hostname {host} && exec "$@"', "sh", *cmd]
        launches.append(Run(setup, inner, run / "calls", f"m{machine}", setup.root / f"hosts{trial}.log"))
    hangs = sum(not launch.wait(STARTED) for launch in launches)
    for launch in launches:
        launch.close()
    recs = records(run / "cache")
    per_key = Counter(r["key"] for r in recs)
    generated = Counter(ln.split(" ", 1)[0] for log in (run / "calls").glob("m*.log")
                        for ln in log.read_text().splitlines())
    hosts = {r["_segment"].split("-", 1)[0] for r in recs}
    exported = export_rows(run / "recycled.jsonl")
    ok = (all(launch.proc.returncode == 0 for launch in launches) and exported == reference["export"]
          and hosts == {"hostA", "hostB"})
    return {"faults": 0, "takeovers": 0, "lost": sum(k not in per_key for k in reference["raw"]),
            "twice": sum(n - 1 for n in per_key.values()), "dup_gen": sum(n - 1 for n in generated.values()),
            "hangs": hangs, "wrong": sum(reference["raw"].get(r["key"]) != r["raw"] for r in recs), "ok": ok,
            "hosts": sorted(hosts)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="kill -9 instants in trainer epoch 1 (2 ranks)")
    parser.add_argument("--cli-kills", type=int, default=20, help="kill -9 instants of reflect-trainer recycle")
    parser.add_argument("--host-trials", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, caches)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="reflect-faults-real-"))
    started = time.monotonic()
    header = ("scenario", "trials", "faults hit", "takeovers", "rows lost", "stored twice", "dup. generations",
              "hangs", "wrong hits", "all checks")
    rows, notes, bad = [], [], False
    try:
        setup = Setup(root, args.pairs, args.max_new_tokens)
        for name, kind, kills in (("kill -9 in trainer epoch 1 (2 ranks), resume", "trainer", args.kills),
                                  ("kill -9 in reflect-trainer recycle, resume", "cli", args.cli_kills)):
            if not kills:
                continue
            chains = Chains(setup, kind, kind, rng)
            chains.run(kills)
            c = chains.counts
            rows.append((name, c["faults"], c["faults"], c["takeovers"], c["lost"], c["twice"], c["dup_gen"],
                         c["hangs"], c["wrong"], f"{c['chains'] - len(chains.checks_failed)}/{c['chains']} chains"))
            ref = chains.reference
            notes.append(f"{kind}: uninterrupted run {ref['elapsed']:.0f} s (start-up until it opens the cache "
                         f"{ref['startup']:.0f} "
                         f"s), {len(ref['raw'])} oracle prompts; kills: "
                         + ", ".join(f"{k[5:]} {v}" for k, v in sorted(c.items()) if k.startswith("kill "))
                         + f"; {c['chains']} chains; {time.monotonic() - started:.0f} s so far")
            notes += [f"  check failed: {m}" for m in chains.checks_failed]
            bad |= bool(chains.checks_failed)
            if kind == "trainer":
                trainer_reference = ref
            print(f"# {name}: done ({time.monotonic() - started:.0f}s)", file=sys.stderr, flush=True)
        if args.host_trials:
            if not args.kills:
                trainer_reference = Chains(setup, "trainer-ref", "trainer", rng).reference
            total, ok = Counter(), 0
            for trial in range(args.host_trials):
                r = two_hosts(setup, trainer_reference, trial)
                ok += r.pop("ok")
                notes.append(f"two hosts, trial {trial}: segments written by {r.pop('hosts')}")
                total.update(r)
            rows.append(("two hosts: accelerate --num_machines 2, unshare", args.host_trials, 0, 0, total["lost"],
                         total["twice"], total["dup_gen"], total["hangs"], total["wrong"], f"{ok}/{args.host_trials}"))
            bad |= ok != args.host_trials
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"# work directory kept: {root}", file=sys.stderr)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print(" | ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    for note in notes:
        print(note)
    print(f"{time.monotonic() - started:.0f} s in all")
    bad |= any(any(r[i] for i in range(4, 9)) for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
