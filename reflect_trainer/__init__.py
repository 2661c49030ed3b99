"""reflect_trainer: Reflection-Tuning (Li et al., 2023) inside TRL: recycle instruction data through a local
quantized oracle the first time each pair is drawn, cache it, and train on the recycled stream."""

from .cache import RecycleCache
from .config import ReflectionConfig
from .export import load_data, save_recycled, to_sft_dataset
from .formats import BadRowError, Pair, validate_rows
from .oracles import ENGINES, GenerationSettings, Oracle, load_oracle
from .preflight import InputError
from .recycler import RECYCLED_COLUMNS, SELECTION_COLUMNS, Recycler
from .selection import StudentScorer, score_pairs, select_version
from .structured import SectionFormat
from .templates import ReflectionStep, ReflectionTemplate

__all__ = [
    "BadRowError",
    "InputError",
    "ENGINES",
    "GenerationSettings",
    "Oracle",
    "Pair",
    "RECYCLED_COLUMNS",
    "RecycleCache",
    "ReflectionSFTTrainer",
    "Recycler",
    "ReflectionConfig",
    "ReflectionStep",
    "ReflectionTemplate",
    "SELECTION_COLUMNS",
    "SectionFormat",
    "StudentScorer",
    "load_data",
    "load_oracle",
    "save_recycled",
    "score_pairs",
    "select_version",
    "to_sft_dataset",
    "validate_rows",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The trainer imports TRL (seconds); load it only when asked, so the CLI and the transform start fast.
    if name == "ReflectionSFTTrainer":
        from .trainer import ReflectionSFTTrainer

        return ReflectionSFTTrainer
    raise AttributeError(f"module 'reflect_trainer' has no attribute {name!r}")
