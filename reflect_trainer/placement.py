"""Where the oracle runs next to the student: its device, and whether recycling the next buffer may overlap training.

Overlap only pays when the oracle does not compete with the student for the same compute (B6: two models sharing two
CPU cores ran 1.43x *slower* overlapped), so ``overlap="auto"`` turns it on for a server or another device only.
"""

from __future__ import annotations

import copy
import logging

import torch

logger = logging.getLogger(__name__)


def same_device(a, b) -> bool:
    """Whether two device names are one device: "cuda" is the current CUDA device, so "cuda" and "cuda:0" are one
    on GPU 0; a name torch does not parse (e.g. a device_map name) is compared as written."""
    return _device(a) == _device(b)


def _device(device) -> tuple[str, int]:
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        return str(device), -1
    if d.index is not None:
        return d.type, d.index
    return d.type, torch.cuda.current_device() if d.type == "cuda" and torch.cuda.is_available() else 0


def oracle_device(configured: str | None, student_device: torch.device) -> str:
    """The configured device, else the student's GPU (one GPU holds both, as in the QLoRA recipe), else the CPU."""
    if configured is None and student_device.type == "cuda":
        return str(student_device)
    return configured or "cpu"


def placed_config(config, student_device: torch.device, local_main_process: bool):
    """The config as one rank runs it: the oracle's device (:func:`oracle_device`), the engine resolved there, one
    progress bar a node."""
    placed = copy.copy(config)
    placed.oracle_device = oracle_device(config.oracle_device, student_device)
    placed.progress_bar = config.progress_bar and local_main_process
    placed, why = placed.with_engine_resolved()
    if config.oracle_engine == "auto":
        logger.info("oracle engine: %s (%s)", placed.oracle_engine, why)
    return placed


def overlap_wanted(overlap: str, engine: str, device: str, student_device, streaming: bool) -> bool:
    """``overlap`` ("auto", "on", "off") for an oracle ``engine`` on ``device`` next to the student."""
    if overlap == "on" and engine == "self":
        raise ValueError("overlap='on' cannot work with oracle_engine='self': the oracle is the student")
    if streaming:  # a stream is recycled by the transform TRL pulls rows through: nothing to overlap with
        return False
    if overlap != "auto":
        return overlap == "on"
    if engine == "openai":
        return True  # a server: its own process, usually its own GPU
    return engine in ("transformers", "llama_cpp") and not same_device(device, student_device)
