"""Export recycled data in a shape that ``ReflectionSFTTrainer`` and a plain ``trl.SFTTrainer`` train on directly.

The exported rows carry conversational ``prompt``/``completion`` columns (so SFTTrainer computes completion-only
loss) next to the original fields, the recycled fields, the oracle's raw texts and the fallback reasons. Original
columns whose names SFTTrainer would read as a format (``messages``, ``prompt``, ``completion``) are renamed
``original_<name>``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .formats import CONVERSATIONS, MESSAGES, PROMPT_COMPLETION, TOKENIZED, row_format, row_to_pair
from .schema import DROPPED_BY_SELECTION, OUTPUT_PREFIXES, PASSED_THROUGH  # noqa: F401 (DROPPED_BY_SELECTION: public)
from .text import request_text

logger = logging.getLogger(__name__)

_FORMAT_COLUMNS = ("messages", "prompt", "completion", "conversations")


def recycled_conversation(row: dict, fmt: str) -> tuple[list[dict], list[dict]]:
    """``(prompt messages, completion messages)`` of a recycled row, history kept."""
    history: list[dict] = []
    if fmt in (MESSAGES, PROMPT_COMPLETION, CONVERSATIONS):
        history = row_to_pair(row, fmt, "export", max_chars=10**9).history
    user = request_text(row["recycled_instruction"], row["recycled_input"])
    return [*history, {"role": "user", "content": user}], [{"role": "assistant", "content": row["recycled_output"]}]


def to_sft_dataset(recycled, keep_dropped: bool = False):
    """Add ``prompt``/``completion`` columns to a recycled ``datasets.Dataset``; drop rows skipped as bad input, and
    rows the selection rule dropped unless ``keep_dropped`` (they keep their scores and original text).

    A pre-tokenized data set is exported as it is (TRL trains its ``input_ids``). In other formats, rows passed
    through (a conversation with no final user → assistant exchange) have no pair for the ``prompt``/``completion``
    shape and are left out, counted in the log; the recycled data (``recycle_dataset``) keeps them untouched."""
    fmt = row_format([c for c in recycled.column_names if not c.startswith(OUTPUT_PREFIXES)])
    if fmt == TOKENIZED:
        return recycled.filter(lambda r: r["skip_reason"] in (None, PASSED_THROUGH))
    before = len(recycled)
    kept = (None, DROPPED_BY_SELECTION) if keep_dropped else (None,)
    recycled = recycled.filter(lambda r: r["skip_reason"] in kept)
    if len(recycled) < before:
        logger.warning("export: left out %d rows (bad input, no user→assistant exchange to recycle, or dropped by the "
                       "selection rule)", before - len(recycled))
    renames = {c: f"original_{c}" for c in _FORMAT_COLUMNS if c in recycled.column_names}
    conversations = [recycled_conversation(row, fmt) for row in recycled]
    out = recycled.rename_columns(renames) if renames else recycled
    out = out.add_column("prompt", [p for p, _ in conversations])
    return out.add_column("completion", [c for _, c in conversations])


def save_recycled(dataset, path: str | Path) -> Path:
    """Write to ``.jsonl``/``.json`` or ``.parquet`` (by suffix), or to a ``datasets`` folder otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".jsonl", ".json"):
        dataset.to_json(str(path), lines=True, force_ascii=False)
    elif path.suffix == ".parquet":
        dataset.to_parquet(str(path))
    else:
        dataset.save_to_disk(str(path))
    return path


def load_data(path: str | Path, limit: int | None = None, max_answer_words: int | None = None):
    """Load a JSON/JSONL/Parquet file, a ``datasets`` folder, or ``"alpaca-eval"`` (the embedded real pairs) as a
    map-style ``datasets.Dataset``, keeping the first ``limit`` rows if given (for ``alpaca-eval``, of those whose
    answer has at most ``max_answer_words`` words)."""
    data = _load_data(path, max_answer_words)
    return data.select(range(min(limit, len(data)))) if limit is not None else data


def _load_data(path: str | Path, max_answer_words: int | None = None):
    from datasets import Dataset, load_from_disk

    if str(path) == "alpaca-eval":
        from .embedded import load_alpaca_eval

        return load_alpaca_eval(max_answer_words=max_answer_words)
    path = Path(path)
    if path.is_dir():
        return load_from_disk(str(path))
    if path.suffix in (".jsonl", ".json"):
        try:
            return Dataset.from_json(str(path))
        except StopIteration:  # what `datasets` raises for a file without a row
            from .preflight import no_rows

            raise no_rows(f"the data set {path}") from None
    if path.suffix == ".parquet":
        return Dataset.from_parquet(str(path))
    raise ValueError(f"{path}: expected a .json, .jsonl or .parquet file, or a datasets folder")
