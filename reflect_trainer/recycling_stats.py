"""What recycling counts and shows: the counters (:class:`RecycleStats`), the progress bar, the summary in the log.

The counters are read by :meth:`Recycler.stats <reflect_trainer.recycler.Recycler.stats>` (the Trainer's log, the
offline ``.stats.json``, the report); their derived rates are computed here once.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from .schema import RESPONSE_REFLECTION_OF_ORIGINAL, oracle_tokens_per_s
from .templates import INSTRUCTION_REFLECTION, RESPONSE_REFLECTION

logger = logging.getLogger(__name__)


@dataclass
class RecycleStats:
    """Counters, exposed by :meth:`Recycler.stats` as a flat dict (ready for the Trainer's log)."""

    rows_seen: int = 0
    rows_recycled: int = 0
    rows_skipped: int = 0
    rows_passed_through: int = 0  # rows with no exchange to recycle (pre-tokenized, a conversation ending elsewhere)
    skip_reasons: Counter = field(default_factory=Counter)
    marker_like_rows: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    waited_for_other_writer: int = 0
    claims_taken_over: int = 0  # keys whose owner died or went silent, generated here instead
    oracle_calls: int = 0
    oracle_prompts: int = 0
    oracle_tokens: int = 0
    oracle_seconds: float = 0.0
    phase_counts: Counter = field(default_factory=Counter)  # (phase, "parsed"|"accepted"|"total"|reason)
    scores_computed: int = 0
    scores_cached: int = 0
    selected: Counter = field(default_factory=Counter)  # version -> rows ("dropped" for None)

    def as_dict(self) -> dict[str, float]:
        # list(...) snapshots: the Trainer's log reads these while a background prefetch may add keys.
        out: dict[str, float] = {
            k: v for k, v in list(self.__dict__.items()) if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        out["oracle_tokens_per_s"] = oracle_tokens_per_s(out)
        for reason, n in list(self.skip_reasons.items()):
            out[f"skipped/{reason}"] = n
        for (phase, what), n in list(self.phase_counts.items()):
            out[f"{phase}/{what}"] = n
        for version, n in list(self.selected.items()):
            out[f"selected/{version}"] = n
        for phase in (INSTRUCTION_REFLECTION, RESPONSE_REFLECTION, RESPONSE_REFLECTION_OF_ORIGINAL):
            total = self.phase_counts.get((phase, "total"), 0)
            if total:
                out[f"{phase}/parse_rate"] = self.phase_counts[(phase, "parsed")] / total
                out[f"{phase}/accept_rate"] = self.phase_counts[(phase, "accepted")] / total
        return out


class RecycleProgress:
    """The progress bar. It counts pair-steps (one pair through one template step), so it moves after every oracle
    call of a buffer, not once per buffer (minutes apart on a CPU), and tqdm's ETA is there from the first call.

    Args:
        total: pair-steps expected (``None``: unknown, no ETA).
        stats: the counters shown beside the bar.
    """

    def __init__(self, total: int | None, stats: RecycleStats):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc="recycling", unit="step", dynamic_ncols=True)
        self._stats = stats

    def tick(self, pair_steps: int) -> None:
        if not pair_steps:
            return
        self._bar.update(pair_steps)
        s = self._stats
        self._bar.set_postfix(pairs=s.rows_recycled, hits=s.cache_hits, oracle_tok=s.oracle_tokens, refresh=False)

    def close(self) -> None:
        self._bar.close()


def log_summary(stats: dict[str, float], phases, seconds: float | None = None, log: logging.Logger = logger) -> None:
    """Log accept rates per phase, fallback reasons, oracle throughput (and pairs/s over ``seconds``) to ``log`` (the
    recycler passes its own: users filter recycling logs by one name)."""
    s = stats
    if seconds:
        log.info("recycled %d pairs in %.0f s: %.3f pairs/s", s["rows_recycled"], seconds, s["rows_recycled"] / seconds)
    for phase in phases:
        if f"{phase}/parse_rate" in s:
            log.info(
                "%s: parsed %.0f%%, accepted %.0f%% of %d; fallbacks: %s",
                phase,
                100 * s[f"{phase}/parse_rate"],
                100 * s[f"{phase}/accept_rate"],
                s[f"{phase}/total"],
                {k.split("/", 2)[2]: v for k, v in s.items() if k.startswith(f"{phase}/fallback/")},
            )
    log.info(
        "oracle: %d calls, %d prompts, %d tokens, %.1f tok/s; cache hits %d",
        s["oracle_calls"], s["oracle_prompts"], s["oracle_tokens"], s["oracle_tokens_per_s"], s["cache_hits"],
    )
