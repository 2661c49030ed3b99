"""Every private name of TRL/transformers the trainer relies on is touched in ``trl_bridge`` only, and checked: changed
the way a TRL release could change it, building (or training) the trainer fails with an error that names the
installed and the tested versions, instead of training on the wrong rows or hanging."""

import ast
import inspect
import os
from pathlib import Path

import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTTrainer

from reflect_trainer import ReflectionConfig
from reflect_trainer.trainer import ROW, ReflectionSFTTrainer
from reflect_trainer.trl_bridge import TRLIncompatibleError
from test_support.oracles import ScriptedOracle
from test_support.students import sft_config, tiny_student

PACKAGE = Path(__file__).resolve().parents[1] / "reflect_trainer"
PRIVATE_NAMES = {"_prepare_dataset", "global_then_local_main_first", "_set_signature_columns_if_needed",
                 "_signature_columns", "_save_checkpoint", "_get_output_dir", "_hf_deepspeed_config_weak_ref",
                 "_name_or_path", "_tokenizer"}
PAIRS = [{"instruction": f"Name a colour number {i}.", "input": "", "output": f"Colour {i} is red."} for i in range(4)]


def test_no_module_but_the_bridge_touches_a_private_name_of_trl_or_transformers():
    touched = {}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        names |= {node.value for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        names |= {node.name for node in ast.walk(tree)  # an override is a touch too (our own `_tokenizer()` is not)
                  if isinstance(node, ast.FunctionDef) and node.name in ("_set_signature_columns_if_needed",
                                                                         "_save_checkpoint")}
        for name in names & PRIVATE_NAMES:
            touched.setdefault(name, []).append(path.relative_to(PACKAGE).as_posix())
        if "checkpoint-" in path.read_text():  # the Trainer's folder name: PREFIX_CHECKPOINT_DIR, not a copy
            touched.setdefault("checkpoint-", []).append(path.relative_to(PACKAGE).as_posix())
    elsewhere = {name: paths for name, paths in touched.items() if set(paths) - {"trl_bridge.py"}}
    assert not elsewhere
    assert set(touched) >= PRIVATE_NAMES - {"_name_or_path", "_tokenizer"}  # (the public names replaced these two)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return str(tiny_student(tmp_path_factory.mktemp("student")))


def build(student, tmp_path, model=None, **args):
    oracle = ScriptedOracle(lambda c: "[Better Answer] A colour. [End]")
    return ReflectionSFTTrainer(
        model=model or AutoModelForCausalLM.from_pretrained(student), args=sft_config(tmp_path, **args),
        train_dataset=Dataset.from_list(PAIRS), processing_class=AutoTokenizer.from_pretrained(student),
        reflection_config=ReflectionConfig(cache_dir=str(tmp_path / "cache"), mode="response", progress_bar=False),
        oracle=oracle)


def assert_names_versions(err, what):
    from importlib.metadata import version

    message = str(err.value)
    assert what in message
    assert f"trl {version('trl')}" in message and f"transformers {version('transformers')}" in message
    assert "tested: trl 1.16, transformers 5.18 to 5.25" in message


def test_the_tested_versions_build_and_train_with_the_row_id_kept(student, tmp_path):
    trainer = build(student, tmp_path, max_steps=1, num_train_epochs=1)
    assert ROW in trainer.train_dataset.column_names and ROW in trainer._signature_columns
    trainer.train()
    assert trainer.recycling_stats()["rows_recycled"] == len(PAIRS)  # the look-ahead buffer (8 batches) holds all


def test_a_renamed_barrier_is_an_error_naming_versions(student, tmp_path, monkeypatch):
    import trl.trainer.sft_trainer as sft

    monkeypatch.delattr(sft, "global_then_local_main_first")
    with pytest.raises(TRLIncompatibleError) as err:
        build(student, tmp_path)
    assert_names_versions(err, "global_then_local_main_first")


def test_prepare_dataset_with_a_new_required_parameter_is_an_error_naming_versions(student, tmp_path, monkeypatch):
    original = SFTTrainer._prepare_dataset

    def with_a_new_parameter(self, dataset, processing_class, args, packing, formatting_func, dataset_name, new):
        return original(self, dataset, processing_class, args, packing, formatting_func, dataset_name)

    monkeypatch.setattr(SFTTrainer, "_prepare_dataset", with_a_new_parameter)
    with pytest.raises(TRLIncompatibleError) as err:
        build(student, tmp_path)
    assert_names_versions(err, "_prepare_dataset")
    assert "new" in str(err.value)  # the signature found is shown


def test_prepare_dataset_that_prunes_extra_columns_is_an_error_naming_versions(student, tmp_path, monkeypatch):
    original = SFTTrainer._prepare_dataset

    def pruning(self, dataset, *args, **kwargs):
        prepared = original(self, dataset, *args, **kwargs)
        return prepared.remove_columns([c for c in prepared.column_names if c.startswith("_")])

    monkeypatch.setattr(SFTTrainer, "_prepare_dataset", pruning)
    assert list(inspect.signature(pruning).parameters)[:2] == ["self", "dataset"]
    with pytest.raises(TRLIncompatibleError) as err:
        build(student, tmp_path)
    assert_names_versions(err, f"dropped the column {ROW!r}")


def test_signature_columns_under_another_name_is_an_error_naming_versions(student, tmp_path, monkeypatch):
    from transformers import Trainer

    def renamed(self):
        self._model_input_columns = ["input_ids", "labels"]  # a release that renames the attribute

    monkeypatch.setattr(SFTTrainer, "_set_signature_columns_if_needed", renamed)
    monkeypatch.setattr(Trainer, "_signature_columns", None, raising=False)
    with pytest.raises(TRLIncompatibleError) as err:
        build(student, tmp_path)
    assert_names_versions(err, "_signature_columns")


def test_a_training_batch_without_its_row_id_raises_and_an_eval_batch_passes(student, tmp_path):
    trainer = build(student, tmp_path)
    bare = [{"input_ids": [1, 2, 3], "completion_mask": [0, 1, 1]}]
    with pytest.raises(TRLIncompatibleError) as err:
        trainer.data_collator(bare)
    assert_names_versions(err, f"without its {ROW!r} column")
    trainer.in_evaluation_loop = True  # what evaluate() and predict() set
    batch = trainer.data_collator(bare)
    assert batch["input_ids"].tolist() == [[1, 2, 3]]


def test_a_checkpoint_folder_other_than_ours_is_an_error_not_a_resume_that_misses_rows(student, tmp_path, monkeypatch):
    import transformers.trainer

    monkeypatch.setattr(transformers.trainer, "PREFIX_CHECKPOINT_DIR", "ckpt")  # a release with another layout
    trainer = build(student, tmp_path, max_steps=1, num_train_epochs=1, save_strategy="steps", save_steps=1)
    with pytest.raises(TRLIncompatibleError) as err:
        trainer.train()
    assert_names_versions(err, "saved its checkpoint elsewhere")
    assert (tmp_path / "out" / "ckpt-1" / transformers.trainer.TRAINER_STATE_NAME).is_file()


@pytest.mark.parametrize("name, replacement", [
    ("_save_checkpoint", None),  # gone
    ("_save_checkpoint", lambda self, model, trial, metrics: None),  # a new required parameter
    ("_get_output_dir", None),
])
def test_checkpoint_internals_changed_are_an_error_at_construction(student, tmp_path, monkeypatch, name, replacement):
    owners = [cls for cls in SFTTrainer.__mro__ if name in vars(cls)]  # SFTTrainer overrides _save_checkpoint too
    assert owners
    if replacement is None:  # gone from TRL and transformers alike
        for cls in owners:
            monkeypatch.delattr(cls, name)
    else:  # changed where our override's super() call lands
        monkeypatch.setattr(SFTTrainer, name, replacement)
    with pytest.raises(TRLIncompatibleError) as err:
        build(student, tmp_path)
    assert_names_versions(err, f"Trainer.{name}(")


def test_a_renamed_zero3_switch_is_an_error_when_the_oracle_loads_whole():
    from transformers.integrations import deepspeed as hf_deepspeed

    from reflect_trainer.trl_bridge import outside_zero3_init

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    with outside_zero3_init():  # the tested version: switched off inside, restored after
        assert hf_deepspeed._hf_deepspeed_config_weak_ref is None
    assert hf_deepspeed._hf_deepspeed_config_weak_ref is saved
    del hf_deepspeed._hf_deepspeed_config_weak_ref  # a release that renames it
    try:
        with pytest.raises(TRLIncompatibleError) as err:
            with outside_zero3_init():
                pass
        assert_names_versions(err, "_hf_deepspeed_config_weak_ref")
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def test_a_renamed_zero3_switch_is_an_error_at_construction(student, tmp_path, monkeypatch):
    from transformers.integrations import deepspeed as hf_deepspeed

    model = AutoModelForCausalLM.from_pretrained(student)  # loaded first: transformers reads the name itself
    monkeypatch.delattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref")
    with pytest.raises(TRLIncompatibleError) as err:
        build(student, tmp_path, model=model)
    assert_names_versions(err, "_hf_deepspeed_config_weak_ref")


def test_a_checkpoint_is_marked_complete_only_after_every_rank_wrote_its_files(student, tmp_path):
    """trainer_state.json (what a resume trusts) appears after the barrier that waits for every rank's files (rank 1
    writes rng_state_1.pth while rank 0 writes the state), and atomically: written under a temporary name first."""
    trainer = build(student, tmp_path, max_steps=1, num_train_epochs=1, save_strategy="steps", save_steps=1)
    folder = tmp_path / "out" / "checkpoint-1"
    seen = []
    barrier = trainer.accelerator.wait_for_everyone

    def recording_barrier():
        seen.append(((folder / "trainer_state.json").exists(), (folder / "trainer_state.json.tmp").exists()))
        barrier()

    trainer.accelerator.wait_for_everyone = recording_barrier
    trainer.train()
    assert (False, True) in seen  # a barrier with the state written under its temporary name only
    assert (folder / "trainer_state.json").is_file() and not (folder / "trainer_state.json.tmp").exists()
    assert (folder / "reflect_trained-0.json").is_file()


def test_with_save_total_limit_an_old_checkpoint_is_deleted_only_once_the_new_one_is_complete(
        student, tmp_path, monkeypatch):
    """The Trainer deletes checkpoints over `save_total_limit` right after it writes the state: the rename into place
    must come first, or a kill -9 in between leaves no complete checkpoint to resume from."""
    import shutil

    trainer = build(student, tmp_path, max_steps=2, num_train_epochs=1, save_strategy="steps", save_steps=1,
                    save_total_limit=1)
    out, rmtree, deleted = tmp_path / "out", shutil.rmtree, []

    def deleting(path, *args, **kwargs):
        complete = sorted(p.name for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file())
        deleted.append((os.path.basename(path), complete))
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", deleting)
    trainer.train()
    assert deleted == [("checkpoint-1", ["checkpoint-1", "checkpoint-2"])]


def test_resume_from_true_skips_a_checkpoint_whose_save_was_killed_midway(student, tmp_path):
    """`resume_from_checkpoint=True`: the Trainer's pick is the newest checkpoint *folder*; one whose save a kill -9
    cut short has no trainer_state.json, and the resume failed on it (FileNotFoundError) although the checkpoint
    before it was complete."""
    import shutil

    from transformers import TrainerCallback

    first = build(student, tmp_path, max_steps=2, num_train_epochs=1, save_strategy="steps", save_steps=1)
    first.train()
    out = tmp_path / "out"
    torn = out / "checkpoint-3"  # the save of step 3 killed before its state was renamed into place
    shutil.copytree(out / "checkpoint-2", torn)
    (torn / "trainer_state.json").unlink()

    class Steps(TrainerCallback):
        taken = 0

        def on_step_end(self, args, state, control, **kwargs):
            Steps.taken += 1

    resumed = build(student, tmp_path, max_steps=3, num_train_epochs=1, save_strategy="no")
    resumed.add_callback(Steps)
    resumed.train(resume_from_checkpoint=True)
    assert (Steps.taken, resumed.state.global_step) == (1, 3)  # from checkpoint-2: step 3 only

    (out / "checkpoint-1" / "trainer_state.json").unlink()
    (out / "checkpoint-2" / "trainer_state.json").unlink()
    again = build(student, tmp_path, max_steps=3, num_train_epochs=1)
    with pytest.raises(ValueError, match=r"No valid checkpoint found in output directory .*checkpoint-1, "
                                         r"checkpoint-2, checkpoint-3 hold no trainer_state.json"):
        again.train(resume_from_checkpoint=True)
