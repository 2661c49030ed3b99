"""The one module that touches private names of TRL, transformers, accelerate or deepspeed.

Everything else in the package uses their public API (``processing_class``, ``config.name_or_path``,
``transformers.trainer_utils.PREFIX_CHECKPOINT_DIR``). What remains here has no public equivalent:

* ``SFTTrainer._prepare_dataset``: TRL's own data preparation, run per generation buffer on recycled rows (the
  parity guarantee: recycled rows are prepared by TRL's code, not ours). Its body changed in 5 of TRL's last 11
  releases; we rely on its parameters and on it keeping a data set's extra columns.
* ``trl.trainer.sft_trainer.global_then_local_main_first``: the cross-rank barrier ``_prepare_dataset`` runs under.
  Per buffer, ranks prepare different rows at different times, so it is replaced by a no-op while a buffer is
  prepared (if TRL renamed it, a patch by name would land on nothing and multi-rank preparation could hang).
* ``Trainer._set_signature_columns_if_needed`` / ``_signature_columns``: the row-id column must survive the
  Trainer's pruning of unused columns (``remove_unused_columns=False`` would also keep every text column, which
  TRL's collator and a user's own collator do not expect: SFTTrainer's behaviour would change).
* ``Trainer._save_checkpoint`` / ``_get_output_dir``: a checkpoint must hold each rank's list of trained rows, and
  it must be in the folder the Trainer writes.
* ``transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref``: loading the oracle whole while a ZeRO-3 run
  is active (``unset_hf_deepspeed_config`` clears it but cannot restore it).

Each is checked when the trainer is built (:func:`check_trl`) or where it is used, and a mismatch raises
:class:`TRLIncompatibleError` naming the installed versions and the tested ones, instead of training on the wrong
thing or hanging. ``tests/test_trl_bridge.py`` changes each one the way a TRL release could and checks the error;
it also checks that no other module of the package touches these names.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
from importlib.metadata import PackageNotFoundError, version

#: The versions CI runs (``scripts/setup.sh`` pins the suite's; ``make compat`` runs the other ends). They are the
#: ranges ``pyproject.toml`` declares.
TESTED = {"trl": "1.16", "transformers": "5.18 to 5.25", "accelerate": "1.15", "deepspeed": "0.19"}

#: The parameters ``SFTTrainer._prepare_dataset`` is called with, in order (after ``self``).
PREPARE_DATASET_PARAMETERS = ("dataset", "processing_class", "args", "packing", "formatting_func", "dataset_name")


class TRLIncompatibleError(RuntimeError):
    """An internal of TRL/transformers that the trainer relies on is not what it was in the tested versions."""


def _installed(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def incompatible(what: str) -> TRLIncompatibleError:
    """The error for a changed internal: what changed, the installed versions and the tested ones."""
    installed = ", ".join(f"{name} {_installed(name)}" for name in TESTED)
    tested = ", ".join(f"{name} {versions}" for name, versions in TESTED.items())
    return TRLIncompatibleError(
        f"ReflectionSFTTrainer cannot work with the installed TRL/transformers: {what}. Installed: {installed}; "
        f"tested: {tested}. Install a tested version (pip install 'trl==1.16.*' 'transformers>=5.18,<5.26'), or "
        "report the versions at the project's issue tracker.")


ZERO3_SWITCH = "_hf_deepspeed_config_weak_ref"  # in transformers.integrations.deepspeed
ZERO3_SWITCH_GONE = (f"transformers.integrations.deepspeed.{ZERO3_SWITCH} (how a ZeRO-3 run tells from_pretrained "
                     "to partition, which the oracle must load without) is gone")


# ---- checks when the trainer is built ------------------------------------------------------------------------
def check_trl(trainer_class) -> None:
    """Before ``SFTTrainer.__init__``: every private name we use exists with the signature we call."""
    import trl.trainer.sft_trainer as sft
    from transformers.integrations import deepspeed as hf_deepspeed

    if not hasattr(hf_deepspeed, ZERO3_SWITCH):  # checked here too, not only when a ZeRO-3 run loads its oracle
        raise incompatible(ZERO3_SWITCH_GONE)

    if not callable(getattr(sft, "global_then_local_main_first", None)):
        raise incompatible("trl.trainer.sft_trainer.global_then_local_main_first (the barrier around TRL's data "
                           "preparation, which each generation buffer must run without) is gone")
    prepare = getattr(trainer_class, "_prepare_dataset", None)
    if prepare is None:
        raise incompatible("SFTTrainer._prepare_dataset (TRL's data preparation, run on each buffer of recycled rows) "
                           "is gone")
    try:
        inspect.signature(prepare).bind(None, *PREPARE_DATASET_PARAMETERS)
    except TypeError as err:
        raise incompatible(f"SFTTrainer._prepare_dataset{inspect.signature(prepare)} cannot be called as "
                           f"_prepare_dataset(self, {', '.join(PREPARE_DATASET_PARAMETERS)}) ({err})") from None
    # The Trainer's own methods, not our overrides of them (TrainerHooks), which always exist.
    mro = trainer_class.__mro__
    trainer_base = mro[mro.index(TrainerHooks) + 1] if TrainerHooks in mro else trainer_class
    for name, parameters in (("_set_signature_columns_if_needed", ()), ("_save_checkpoint", ("model", "trial")),
                             ("_get_output_dir", ("trial",))):
        method = getattr(trainer_base, name, None)
        try:
            inspect.signature(method).bind(None, *parameters)
        except TypeError:
            raise incompatible(f"Trainer.{name}({', '.join(parameters)}) is gone or takes other parameters") from None


def check_prepared_columns(dataset, column: str) -> None:
    """After ``SFTTrainer.__init__``: TRL's preparation kept our row-id ``column`` (a map-style data set; a stream's
    rows are checked when they reach the collator)."""
    names = getattr(dataset, "column_names", None)
    if names is not None and column not in names:
        raise incompatible(f"TRL's _prepare_dataset dropped the column {column!r} that identifies each row (it kept "
                           f"{sorted(names)})")


def check_signature_columns(trainer, column: str) -> None:
    """The Trainer's pruning of unused columns keeps ``column`` (asked now, not at the first batch)."""
    trainer._set_signature_columns_if_needed()
    columns = getattr(trainer, "_signature_columns", None)
    if not isinstance(columns, (list, tuple)) or column not in columns:
        raise incompatible(f"the Trainer's list of model input columns (_signature_columns) does not keep {column!r}: "
                           "the row id would be pruned before the collator")


def missing_row_id(column: str) -> TRLIncompatibleError:
    """A training batch reached the collator without the row-id column: it must not train on unrecycled rows."""
    return incompatible(f"a training batch reached the collator without its {column!r} column, so it cannot be "
                        "swapped for its recycled rows")


# ---- hooks: the private overrides, delegating to public-named ones ---------------------------------------------
class TrainerHooks:
    """Mixed in before ``SFTTrainer``: the Trainer's private hooks we override, turned into named ones.

    ``extra_signature_columns``: columns the Trainer must not prune. ``save_checkpoint_extras(folder)``: called with
    the checkpoint folder the Trainer is about to write, before it writes anything there.
    """

    extra_signature_columns: tuple[str, ...] = ()

    def save_checkpoint_extras(self, folder: str) -> None:
        pass

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        columns = getattr(self, "_signature_columns", None)
        if isinstance(columns, (list, tuple)):
            missing = [c for c in self.extra_signature_columns if c not in columns]
            if missing:
                self._signature_columns = [*columns, *missing]

    # A checkpoint counts as complete once its trainer_state.json exists (the Trainer writes it last; resumes trust
    # it, and so does `last_complete_checkpoint`). But rank 0 writes it without waiting for the other ranks, which are
    # still writing their own files (rng_state_<rank>.pth), and not atomically: a kill -9 at that instant left a
    # checkpoint that looked complete with a torn or missing file of another rank, and its resume failed or drew other
    # random numbers. So the state is written to a temporary name, every rank finishes its files (one barrier), then
    # it is renamed -- inside the state write, because the Trainer deletes older checkpoints (`save_total_limit`)
    # right after it: renamed later, a kill -9 in between left no complete checkpoint at all.
    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self.save_checkpoint_extras(folder)
        state, waited = self.state, []

        def save_once_every_rank_wrote(path: str) -> None:
            type(state).save_to_json(state, path + ".tmp")
            self.accelerator.wait_for_everyone()  # the ranks that do not write the state wait after their files
            waited.append(path)
            os.replace(path + ".tmp", path)

        state.save_to_json = save_once_every_rank_wrote  # the instance's, for this save only
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del state.save_to_json
        if not waited:  # this rank wrote no state: its files are written, it joins the barrier of the ranks that do
            self.accelerator.wait_for_everyone()
        from transformers.trainer import TRAINER_STATE_NAME

        if self.args.should_save and not os.path.isfile(os.path.join(folder, TRAINER_STATE_NAME)):
            raise incompatible(f"the Trainer saved its checkpoint elsewhere than {folder!r}, where the list of rows "
                               "trained was saved for a resume")


def last_complete_checkpoint(output_dir: str) -> str:
    """What ``train(resume_from_checkpoint=True)`` resumes from: the newest checkpoint whose trainer_state.json exists.

    The Trainer's own pick (``get_last_checkpoint``) is the newest checkpoint folder, complete or not: after a kill -9
    in the middle of a save, the resume failed (transformers 5.23: ``FileNotFoundError`` for that folder's
    trainer_state.json) although the checkpoint before it was complete, until someone deleted the folder by hand.
    Only the rename in ``TrainerHooks._save_checkpoint`` makes a state file appear.
    """
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    steps = {int(m.group(1)): os.path.join(output_dir, name) for name in names
             if (m := re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name))}
    complete = [step for step, folder in steps.items() if os.path.isfile(os.path.join(folder, TRAINER_STATE_NAME))]
    if not complete:
        torn = sorted(os.path.basename(folder) for folder in steps.values())
        # The Trainer's own message first, so code that matches it keeps working.
        raise ValueError(f"No valid checkpoint found in output directory ({output_dir})"
                         + (f": {', '.join(torn)} hold no {TRAINER_STATE_NAME} (a save was killed midway)"
                            if torn else ""))
    return steps[max(complete)]


# ---- TRL's preparation, per buffer -------------------------------------------------------------------------------
@contextlib.contextmanager
def _per_buffer_preparation():
    """TRL's preparation, called from one rank's collator: no cross-rank barrier, no progress bars.

    ``_prepare_dataset`` runs under ``global_then_local_main_first`` (barriers meant for ``__init__``, where every
    rank prepares together); per buffer, ranks prepare different rows at different times, so a barrier would hang.
    """
    import datasets
    import trl.trainer.sft_trainer as sft

    barrier, bars = sft.global_then_local_main_first, datasets.is_progress_bar_enabled()
    sft.global_then_local_main_first = contextlib.nullcontext
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        sft.global_then_local_main_first = barrier
        if bars:
            datasets.enable_progress_bars()


def prepare_rows(trainer, rows: list[dict], features, args, formatting_func, id_column: str) -> dict:
    """``{row id: {input_ids, labels}}`` of ``rows`` (in the user's format, each with its id in ``id_column``),
    prepared by SFTTrainer's own ``_prepare_dataset`` (chat template, tokenisation, masks, truncation) as one rank's
    buffer: no barrier, no packing, no progress bars. Rows TRL drops (no trainable token left) are absent.
    ``features``: the source's, or ``None`` to infer them."""
    if not rows:
        return {}
    from datasets import Dataset

    with _per_buffer_preparation():
        prepared = trainer._prepare_dataset(Dataset.from_list(rows, features=features), trainer.processing_class,
                                            args, False, formatting_func, "recycled")
    return {r[id_column]: {"input_ids": r["input_ids"], "labels": r["labels"]}
            for r in prepared.select_columns([id_column, "input_ids", "labels"])}


# ---- transformers' DeepSpeed integration ---------------------------------------------------------------------------
@contextlib.contextmanager
def outside_zero3_init():
    """Load a model whole even while a ZeRO-3 run is active.

    transformers partitions every ``from_pretrained`` under ``deepspeed.zero.Init`` while an ``HfDeepSpeedConfig``
    with stage 3 is alive. The oracle must not be partitioned: each rank generates on its own, out of lockstep.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    if not hasattr(hf_deepspeed, ZERO3_SWITCH):
        raise incompatible(ZERO3_SWITCH_GONE)
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def as_sft_config(args, model):
    """The config SFTTrainer would use (its own conversion of a ``TrainingArguments``, its default name), never the
    user's object itself: it must stay reusable for a baseline."""
    import copy

    from transformers import TrainingArguments
    from trl import SFTConfig

    if args is None:
        from trl.trainer.utils import get_config_model_id

        name = model if isinstance(model, str) else get_config_model_id(model.config)
        return SFTConfig(f"{name.split('/')[-1]}-SFT")
    if isinstance(args, TrainingArguments) and not isinstance(args, SFTConfig):
        dict_args = args.to_dict()
        dict_args["hub_token"] = args.hub_token
        return SFTConfig(**dict_args)
    return copy.copy(args)


def with_chat_template(model, args, processing_class):
    """``processing_class``, loaded as SFTTrainer would when ``None``, with a chat template: Alpaca rows train as
    conversations, and a base model's tokenizer has none (the paper's Vicuna template then, :mod:`.chat`)."""
    from .chat import ensure_chat_template

    if processing_class is None:
        from transformers import AutoProcessor
        from trl.trainer.utils import get_config_model_id

        name = model if isinstance(model, str) else get_config_model_id(model.config)
        processing_class = AutoProcessor.from_pretrained(name, trust_remote_code=args.trust_remote_code)
    ensure_chat_template(getattr(processing_class, "tokenizer", processing_class))
    return processing_class
