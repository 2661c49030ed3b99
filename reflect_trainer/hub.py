"""The oracle by Hugging Face hub id, like the student: ``oracle_model_path: org/name`` (+ ``oracle_revision``) is
resolved through ``huggingface_hub`` to a pinned commit, and the engines load the snapshot folder of that commit.

A hub model's cache identity is ``repo id @ commit``: a commit's files never change, so nothing is hashed (a 13B
model's 26 GB would take minutes to read). A path that exists locally is always a local folder, even one that looks
like ``org/name``, and keeps the hash of its weights (``fingerprint.py``).

Resolution honours ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` and the cache variables (``HF_HUB_CACHE``,
``HUGGINGFACE_HUB_CACHE``, ``HF_HOME``, ``XDG_CACHE_HOME``), read when resolving (``huggingface_hub`` reads them once,
at import). Offline, the commit and the files come from the cache; online the commit is asked of the hub, and the
files are downloaded when the oracle is loaded (a run served from the result cache downloads nothing).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .preflight import InputError

logger = logging.getLogger(__name__)

# `org/name` or `name`, as the hub spells them; not a path written as one (absolute, ./, ~) nor a .gguf file.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# With safetensors weights in the repo, the other formats are not downloaded (as transformers and vLLM do).
_OTHER_WEIGHTS = ["*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.ot", "*.onnx",
                  "*.onnx_data", "*.tflite", "*.gguf", "original/*", "onnx/*", "coreml/*", "openvino/*"]
_resolved: dict[tuple, HubModel] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class HubModel:
    """A hub repo pinned to one commit."""

    repo_id: str
    revision: str | None  # as asked: None is the default branch
    commit: str
    files: tuple[str, ...] = field(default=(), compare=False)  # the repo's file list, when the hub was asked

    @property
    def identity(self) -> str:
        return f"{self.repo_id}@{self.commit}"


def is_hub_id(path: str | os.PathLike | None) -> bool:
    """``path`` names a hub repo: it does not exist locally and is spelt ``org/name`` (or ``name``)."""
    if path is None:
        return False
    path = str(path)
    return (not Path(path).exists() and not path.startswith(("/", ".", "~")) and not path.endswith(".gguf")
            and bool(_HUB_ID.match(path)))


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return _truthy(env) if env is not None else constants.HF_HUB_OFFLINE


def cache_dir() -> str:
    """The hub cache folder, by huggingface_hub's own rules, from the environment as it is now."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return os.path.expandvars(os.path.expanduser(hub))


def _unresolved(repo_id: str, revision: str | None, why: str, offline_now: bool) -> InputError:
    rev = revision or "the default branch"
    fetch = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    fixes = [f"download it first (`{fetch}`, or `huggingface-cli download` with older huggingface_hub)"]
    if offline_now:
        fixes.insert(0, "set HF_HUB_OFFLINE=0 so it is downloaded")
    fixes.append("check oracle_model_path and oracle_revision")
    fixes.append("or give a local model folder (with config.json)")
    return InputError(f"oracle_model_path {repo_id!r} (oracle_revision: {rev}) is not a local folder and cannot be "
                      f"resolved on the Hugging Face hub: {why}; {', '.join(fixes)}")


def _from_cache(repo_id: str, revision: str | None, folder: str) -> Path | None:
    """The cached snapshot folder (named by its commit) of ``revision`` (a branch or tag through ``refs/``, or a
    commit) that holds a config.json; None if there is none."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=folder, revision=revision)
    return Path(found).parent if isinstance(found, str) else None


def resolve(repo_id: str, revision: str | None = None) -> HubModel:
    """Pin a hub id to a commit, once per process (identity and loading then agree even if the branch moves).

    Raises :class:`~reflect_trainer.preflight.InputError` naming the repo, the revision and what to do when it
    cannot be resolved (offline and not cached, unknown repo or revision)."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    folder, offline_now = cache_dir(), offline()
    key = (repo_id, revision, folder, offline_now)
    with _lock:
        if key in _resolved:
            return _resolved[key]
    model = None
    why = "it is not in the hub cache " + folder + (" and HF_HUB_OFFLINE is set" if offline_now else "")
    if not offline_now:
        try:
            info = HfApi().model_info(repo_id, revision=revision)
            model = HubModel(repo_id, revision, info.sha, tuple(s.rfilename for s in info.siblings or ()))
        except RevisionNotFoundError:
            raise _unresolved(repo_id, revision, f"the repo has no revision {revision!r}", offline_now) from None
        except (RepositoryNotFoundError, GatedRepoError) as err:
            raise _unresolved(repo_id, revision, f"the hub has no such repo, or it is private or gated "
                              f"({type(err).__name__}; log in with `hf auth login` or set HF_TOKEN)",
                              offline_now) from None
        except HFValidationError as err:
            raise _unresolved(repo_id, revision, f"not a valid repo id ({err})", offline_now) from None
        except (OSError, httpx2.HTTPError) as err:  # no connection, hub down: the cache may still have it
            logger.warning("cannot reach the hub for %s (%s): looking in the cache %s", repo_id, err, folder)
            why = f"the hub cannot be reached ({type(err).__name__}) and it is not in the hub cache {folder}"
    if model is None:
        try:
            cached = _from_cache(repo_id, revision, folder)
        except HFValidationError as err:
            raise _unresolved(repo_id, revision, f"not a valid repo id ({err})", offline_now) from None
        if cached is None:
            raise _unresolved(repo_id, revision, why, offline_now)
        model = HubModel(repo_id, revision, cached.name)
    logger.info("oracle %s (revision %s) is commit %s", repo_id, revision or "default branch", model.commit)
    with _lock:
        _resolved[key] = model
    return model


def snapshot(model: HubModel) -> Path:
    """The local folder of the commit's files: online downloaded first (what is missing; the safetensors weights only
    when the repo has them); offline (or the hub unreachable) the cached snapshot as it is. Not
    ``snapshot_download(local_files_only=True)``: it refuses a snapshot that lacks files of the repo's listing, such
    as the ``.bin`` weights an online run left out."""
    from huggingface_hub import snapshot_download

    if model.files and not offline():
        ignore = _OTHER_WEIGHTS if any(f.endswith(".safetensors") for f in model.files) else None
        return Path(snapshot_download(model.repo_id, revision=model.commit, cache_dir=cache_dir(),
                                      ignore_patterns=ignore))
    cached = _from_cache(model.repo_id, model.commit, cache_dir())
    if cached is None:
        raise _unresolved(model.repo_id, model.revision, f"its commit {model.commit} is not in the hub cache "
                          f"{cache_dir()}", offline())
    return cached


def hub_model(model_path: str | os.PathLike | None, revision: str | None = None) -> HubModel | None:
    """The pinned hub model ``model_path`` names, or None for a local path."""
    return resolve(str(model_path), revision) if is_hub_id(model_path) else None


def local_folder(model_path: str | os.PathLike, revision: str | None = None) -> Path:
    """Where an engine loads ``model_path`` from: the path itself, or a hub id's snapshot folder."""
    model = hub_model(model_path, revision)
    return Path(model_path) if model is None else snapshot(model)
