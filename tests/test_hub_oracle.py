"""The oracle by hub id: ``oracle_model_path: org/name`` (+ ``oracle_revision``) resolves through ``huggingface_hub``
to a pinned commit, loads from that commit's snapshot folder and has ``repo@commit`` as its identity (no weights read);
a local folder keeps its weights hash. The hub is a stand-in: a Hugging Face cache folder in ``tmp_path`` laid out as
``huggingface_hub`` lays it out, holding the real embedded SmolLM2 oracle's files; no network."""

from __future__ import annotations

import time

import pytest
from datasets import Dataset
from huggingface_hub.file_download import repo_folder_name

from reflect_trainer import InputError, ReflectionConfig, fingerprint
from reflect_trainer.embedded import default_oracle_path
from reflect_trainer.oracles import GenerationSettings, oracle_identity
from reflect_trainer.preflight import check_oracle
from test_support.students import UntouchableStudent

REPO = "stand-in-org/smollm2-oracle"
MAIN = "a" * 39 + "1"  # the default branch's commit
V2 = "b" * 39 + "2"  # another branch's commit
PAIRS = [{"instruction": "Name a colour.", "input": "", "output": "Red."}]
PROMPT = [[{"role": "user", "content": "What is the capital of France?"}]]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A hub cache with REPO at two commits: ``refs/main`` -> MAIN, ``refs/v2`` -> V2; the files are the embedded
    oracle's (symlinked, as the real cache links its snapshots to blobs). Offline, as the tests run."""
    cache = tmp_path / "hf_hub"
    storage = cache / repo_folder_name(repo_id=REPO, repo_type="model")
    for ref, commit in (("main", MAIN), ("v2", V2)):
        snapshot = storage / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for f in default_oracle_path().iterdir():
            if f.is_file():
                (snapshot / f.name).symlink_to(f)
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return storage


@pytest.fixture
def no_weights_read(monkeypatch):
    """Hashing any weights fails the test."""
    def refuse(path):
        raise AssertionError(f"weights were hashed: {path}")
    monkeypatch.setattr(fingerprint, "_hash_content", refuse)


def test_hub_id_resolves_offline_to_the_snapshot_of_the_default_branch(hub):
    from reflect_trainer.hub import hub_model, local_folder

    assert hub_model(REPO).commit == MAIN
    assert local_folder(REPO) == hub / "snapshots" / MAIN
    assert local_folder(REPO, "v2") == hub / "snapshots" / V2
    check_oracle(ReflectionConfig(oracle_model_path=REPO, oracle_engine="transformers"))  # passes at start-up


def test_offline_a_snapshot_without_the_weights_an_online_run_left_out_is_used(hub):
    """An online run downloads the safetensors only, and huggingface_hub records the repo's whole file list (with
    .bin weights) beside the snapshot; offline the snapshot must still be used as it is."""
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

    from reflect_trainer.hub import local_folder

    listing = {f.name: TreeCacheEntry(size=1, blob_id="0" * 40) for f in (hub / "snapshots" / MAIN).iterdir()}
    write_tree_cache(str(hub), MAIN, {**listing, "pytorch_model.bin": TreeCacheEntry(size=1, blob_id="1" * 40)})
    assert local_folder(REPO) == hub / "snapshots" / MAIN


@pytest.mark.parametrize("engine", ["transformers", "vllm"])
def test_hub_oracle_identity_is_repo_at_commit_and_reads_no_weights(hub, no_weights_read, engine):
    assert oracle_identity(engine, REPO, quantization="none") == f"{engine}:{REPO}@{MAIN}:none"


def test_another_revision_of_the_hub_oracle_has_another_identity(hub, no_weights_read):
    main = oracle_identity("transformers", REPO, quantization="none")
    by_branch = oracle_identity("transformers", REPO, quantization="none", revision="v2")
    by_commit = oracle_identity("transformers", REPO, quantization="none", revision=V2)
    assert by_branch == by_commit == f"transformers:{REPO}@{V2}:none" != main


def test_recycler_loads_the_hub_oracle_and_generates_what_the_local_folder_does(hub, tmp_path):
    from reflect_trainer import Recycler
    from reflect_trainer.oracles.transformers_engine import TransformersOracle

    settings = GenerationSettings(max_new_tokens=6)
    config = ReflectionConfig(oracle_model_path=REPO, oracle_engine="transformers", oracle_quantization="none",
                              oracle_device="cpu", cache_dir=str(tmp_path / "cache"))
    recycler = Recycler(config)
    from_hub = recycler.oracle.generate(PROMPT, settings)[0].text
    assert recycler.oracle.identity == recycler.oracle_identity == f"transformers:{REPO}@{MAIN}:none"
    local = TransformersOracle(str(default_oracle_path()), quantization="none", device="cpu")
    assert from_hub.strip() and from_hub == local.generate(PROMPT, settings)[0].text


def test_recycler_uses_the_oracle_revision_of_the_config(hub, tmp_path, no_weights_read):
    from reflect_trainer import Recycler

    config = ReflectionConfig(oracle_model_path=REPO, oracle_revision="v2", oracle_engine="transformers",
                              oracle_quantization="none", oracle_device="cpu", cache_dir=str(tmp_path / "cache"))
    assert Recycler(config).oracle_identity == f"transformers:{REPO}@{V2}:none"


@pytest.mark.parametrize("repo, revision, named", [
    ("stand-in-org/not-downloaded", None, "oracle_revision: the default branch"),
    (REPO, "no-such-branch", "oracle_revision: no-such-branch"),
])
def test_an_unresolvable_hub_oracle_fails_before_the_student_with_what_to_do(hub, tmp_path, repo, revision, named):
    from reflect_trainer import ReflectionSFTTrainer

    config = ReflectionConfig(oracle_model_path=repo, oracle_revision=revision, oracle_engine="transformers",
                              cache_dir=str(tmp_path / "cache"))
    started = time.perf_counter()
    with pytest.raises(InputError) as error:
        ReflectionSFTTrainer(UntouchableStudent(), train_dataset=Dataset.from_list(PAIRS), reflection_config=config)
    assert time.perf_counter() - started < 10
    message = str(error.value)
    assert f"oracle_model_path {repo!r}" in message and named in message
    for fix in ("HF_HUB_OFFLINE=0", f"hf download {repo}", "huggingface-cli download", "local model folder"):
        assert fix in message
    with pytest.raises(InputError, match="cannot be resolved on the Hugging Face hub"):
        check_oracle(config)


def weights_folder(parent):
    folder = parent / "stand-in-org" / "smollm2-oracle"  # spelt like REPO, and it exists here
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    return folder


def test_a_local_folder_keeps_its_weights_hash_identity_even_when_spelt_like_a_hub_id(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    weights_folder(tmp_path)
    # What the engine computed before hub ids existed (fingerprint.weights_fingerprint of these two files).
    before = "transformers:6b4a7a319fa6402c:nf4"
    assert oracle_identity("transformers", REPO, quantization="nf4") == before
    assert oracle_identity("transformers", str(tmp_path / REPO), quantization="nf4") == before
    assert oracle_identity("vllm", REPO, quantization="nf4") == "vllm:6b4a7a319fa6402c:nf4"


# ---- with the hub reachable (a stand-in HfApi: no network) -------------------------------------------------------
ONLINE = "c" * 39 + "3"  # the commit the stand-in hub reports for the default branch


@pytest.fixture
def online(hub, monkeypatch):
    """HF_HUB_OFFLINE=0 and a stand-in hub: ``model_info`` reports ONLINE with safetensors and .bin weights;
    ``snapshot_download`` records what it was asked and returns the folder it would have filled."""
    import huggingface_hub
    from types import SimpleNamespace

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    files = ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json"]
    asked: list[dict] = []

    def model_info(self, repo_id, revision=None, **kwargs):
        return SimpleNamespace(sha=ONLINE, siblings=[SimpleNamespace(rfilename=f) for f in files])

    def snapshot_download(repo_id, **kwargs):
        asked.append({"repo_id": repo_id, **kwargs})
        return str(hub / "snapshots" / MAIN)  # (its files: any snapshot of the stand-in will do)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return asked


def test_online_the_hub_pins_the_commit_and_only_safetensors_weights_are_downloaded(online, no_weights_read):
    from reflect_trainer.hub import local_folder

    assert oracle_identity("transformers", REPO, quantization="none") == f"transformers:{REPO}@{ONLINE}:none"
    assert online == []  # the identity needs the commit only: nothing is downloaded for a run served from the cache
    local_folder(REPO)
    (call,) = online
    assert call["repo_id"] == REPO and call["revision"] == ONLINE and not call.get("local_files_only")
    assert "*.bin" in call["ignore_patterns"] and "*.safetensors" not in call["ignore_patterns"]


def test_online_an_unreachable_hub_falls_back_to_the_cached_commit(online, monkeypatch, no_weights_read):
    import httpx2
    import huggingface_hub

    def unreachable(self, repo_id, **kwargs):
        raise httpx2.ConnectError("no route to host")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    assert oracle_identity("transformers", REPO, quantization="none") == f"transformers:{REPO}@{MAIN}:none"


@pytest.mark.parametrize("error, says", [("RevisionNotFoundError", "the repo has no revision 'v9'"),
                                         ("RepositoryNotFoundError", "the hub has no such repo, or it is private")])
def test_online_an_unknown_revision_or_repo_fails_at_start_up_naming_it(online, monkeypatch, tmp_path, error, says):
    import httpx2
    import huggingface_hub
    from huggingface_hub import errors

    def unknown(self, repo_id, **kwargs):
        response = httpx2.Response(404, request=httpx2.Request("GET", "https://hub.invalid/api/models"))
        raise getattr(errors, error)("404", response=response)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unknown)
    config = ReflectionConfig(oracle_model_path=REPO, oracle_revision="v9", oracle_engine="transformers")
    with pytest.raises(InputError, match=f"oracle_model_path '{REPO}' \\(oracle_revision: v9\\).*{says}"):
        check_oracle(config)
    assert online == []
