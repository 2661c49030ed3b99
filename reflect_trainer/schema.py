"""The output schema: the columns the recycler adds to a row, the values they take, and the derived counters.

Written by :mod:`reflect_trainer.recycler`; read by the trainer, :mod:`.export`, :mod:`.report` and the CLI, all
through these names, so a column cannot be renamed in one place and read by its old name in another.
"""

from __future__ import annotations

from .templates import INSTRUCTION_REFLECTION, RESPONSE_REFLECTION  # the phases' names, owned by the templates

#: Stats label (and selective-mode phase) of response reflection applied to the original pair (``a``).
RESPONSE_REFLECTION_OF_ORIGINAL = "response_reflection_of_original"

#: The four versions of a row that selective mode scores, in the paper's names and order.
VERSIONS = ("original", "q", "a", "qa")
#: Score kinds: columns are ``<kind>_<version>``.
SCORE_KINDS = ("ifd", "rifd")

# ---- the recycled pair -----------------------------------------------------------------------------------------
RECYCLED_INSTRUCTION = "recycled_instruction"
RECYCLED_INPUT = "recycled_input"
RECYCLED_OUTPUT = "recycled_output"
REFLECTED_INSTRUCTION = "reflected_instruction"  # after instruction reflection (the ``q`` version)
REFLECTED_OUTPUT = "reflected_output"
SKIP_REASON = "skip_reason"
SELECTED_VERSION = "selected_version"

#: ``skip_reason`` of a row the selection rule dropped.
DROPPED_BY_SELECTION = "dropped_by_selection"
#: ``skip_reason`` of a row with no exchange to recycle (pre-tokenized, a conversation that does not end user →
#: assistant): kept untouched in the recycled data, counted as ``rows_passed_through``.
PASSED_THROUGH = "passed_through"


def raw_column(phase: str) -> str:
    """The oracle's raw texts of ``phase`` (``a_raw`` for the response reflection of the original)."""
    return "a_raw" if phase == RESPONSE_REFLECTION_OF_ORIGINAL else f"{phase}_raw"


def fallback_column(phase: str) -> str:
    """Why ``phase`` fell back (``None``: its rewrite was accepted)."""
    return "a_fallback" if phase == RESPONSE_REFLECTION_OF_ORIGINAL else f"{phase}_fallback"


def finish_column(phase: str) -> str:
    """Why the oracle stopped, per step of ``phase`` (``stop``, ``length``, ...), comma-separated."""
    return "a_finish" if phase == RESPONSE_REFLECTION_OF_ORIGINAL else f"{phase}_finish"


def score_column(kind: str, version: str) -> str:
    return f"{kind}_{version}"


#: Columns the transform adds to each row.
RECYCLED_COLUMNS = (
    RECYCLED_INSTRUCTION,
    RECYCLED_INPUT,
    RECYCLED_OUTPUT,
    REFLECTED_INSTRUCTION,
    REFLECTED_OUTPUT,
    raw_column(INSTRUCTION_REFLECTION),
    raw_column(RESPONSE_REFLECTION),
    fallback_column(INSTRUCTION_REFLECTION),
    fallback_column(RESPONSE_REFLECTION),
    finish_column(INSTRUCTION_REFLECTION),
    finish_column(RESPONSE_REFLECTION),
    SKIP_REASON,
)
#: Columns added in ``selective`` mode: the ``a`` version (response reflection of the original), the ``qa`` answer
#: (``reflected_instruction`` is its instruction), the student's scores of every version, and the version trained
#: on (``None``: dropped, with ``selection_drop``).
SELECTION_COLUMNS = (
    "a_output",
    raw_column(RESPONSE_REFLECTION_OF_ORIGINAL),
    fallback_column(RESPONSE_REFLECTION_OF_ORIGINAL),
    finish_column(RESPONSE_REFLECTION_OF_ORIGINAL),
    "qa_output",
    *(score_column(kind, version) for kind in SCORE_KINDS for version in VERSIONS),
    SELECTED_VERSION,
)
#: Columns a recycled data set has on top of the input's: left out when its format is detected again.
OUTPUT_PREFIXES = ("recycled_", "reflected_")


def oracle_tokens_per_s(stats: dict) -> float:
    """The ``oracle_tokens_per_s`` counter: ``oracle_tokens`` over ``oracle_seconds`` (0 before any oracle call)."""
    seconds = stats.get("oracle_seconds", 0)
    return stats.get("oracle_tokens", 0) / seconds if seconds else 0.0


# Counters summed over ranks for the Trainer's log (duplicates stay per rank, in the stats).
LOGGED_COUNTERS = (
    "rows_recycled", "rows_skipped", "rows_passed_through", "rows_fully_masked_fallback", "rows_dropped_by_trl",
    "cache_hits", "cache_misses", "claims_taken_over", "cache_leases_lost",
    "oracle_calls", "oracle_prompts", "oracle_tokens", "oracle_seconds",
    "instruction_reflection/total", "instruction_reflection/parsed", "instruction_reflection/accepted",
    "response_reflection/total", "response_reflection/parsed", "response_reflection/accepted", "scores_computed",
    "selected/original", "selected/q", "selected/a", "selected/qa", "selected/dropped",
)


def logged_counters(summed: list[float]) -> dict[str, float]:
    """The ``recycle/*`` entries of the Trainer's log from :data:`LOGGED_COUNTERS` summed over ranks, with the
    rates derived from them."""
    logs = dict(zip(LOGGED_COUNTERS, summed))
    for phase in (INSTRUCTION_REFLECTION, RESPONSE_REFLECTION):
        if logs[f"{phase}/total"]:
            logs[f"{phase}/accept_rate"] = logs[f"{phase}/accepted"] / logs[f"{phase}/total"]
    logs["oracle_tokens_per_s"] = oracle_tokens_per_s(logs)
    return {f"recycle/{k}": v for k, v in logs.items()}
