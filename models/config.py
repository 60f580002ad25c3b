"""Typed configs for the parts of the pipeline that live in models/ (shared with serving).

Each stage gets one pydantic model; validators name the bad value so a bad preset or
override is refused before any work starts.
"""
from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Device = Literal["auto", "cpu", "cuda"]
# The one list of quantization methods. It stays a written-out Literal so pydantic validates it and
# Prefect's form offers the choices; models/quant's BACKENDS registry is checked against it at import.
QuantMethod = Literal["none", "bf16", "gptq-int4", "gptq-int8", "torchao-int8-dyn", "torchao-int8-wo", "torchao-int4-wo",
                      "bnb-int8", "bnb-nf4"]
QUANT_METHODS: tuple[str, ...] = get_args(QuantMethod)
DecodeStrategy = Literal["plain", "draft", "prompt-lookup"]


class StrictModel(BaseModel):
    # Unknown keys are errors: a typo in a preset must not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyLlamaSpec(StrictModel):
    """Shape of a locally built Llama-architecture model (the embedded default)."""

    hidden_size: int = Field(192, ge=16, description="Model width.")
    num_layers: int = Field(4, ge=1, description="Decoder layers.")
    num_heads: int = Field(4, ge=1, description="Attention heads (hidden_size must divide evenly).")
    intermediate_size: int = Field(512, ge=16, description="MLP width.")
    max_position: int = Field(512, ge=64, description="Longest sequence the model accepts.")

    @field_validator("num_heads")
    @classmethod
    def _heads_divide(cls, v: int, info) -> int:
        hidden = info.data.get("hidden_size")
        if hidden and hidden % v:
            raise ValueError(f"hidden_size {hidden} is not divisible by num_heads {v}")
        return v


class CurriculumMix(StrictModel):
    """Shares of each kind of pretraining block (normalised; a zero share turns that kind off)."""

    text: float = Field(0.4, ge=0, description="Plain text windows (the docstring corpus).")
    copy_spans: float = Field(0.3, ge=0, description="Runs of random words repeated after a varied stretch of text.")
    records: float = Field(0.3, ge=0, description="key: value fields restated as JSON in another order.")


class EmbeddedBuildConfig(StrictModel):
    """How the offline default makes its own tokenizer, base and draft (no hub needed)."""

    vocab_size: int = Field(4096, ge=300, le=65536, description="BPE vocabulary size.")
    base: TinyLlamaSpec = Field(default_factory=TinyLlamaSpec)
    draft: TinyLlamaSpec = Field(
        default_factory=lambda: TinyLlamaSpec(hidden_size=96, num_layers=2, num_heads=2, intermediate_size=256)
    )
    pretrain_steps: int = Field(600, ge=1, description="Optimizer steps of base pretraining on stdlib docstrings.")
    pretrain_batch_size: int = Field(16, ge=1)
    pretrain_seq_len: int = Field(128, ge=16)
    pretrain_lr: float = Field(3e-3, gt=0)
    pretrain_mix: CurriculumMix = Field(default_factory=CurriculumMix, description="What pretraining blocks teach "
                                        "(models/curriculum.py): text, copying by content, lookup by key.")
    pretrain_bf16: bool = Field(False, description="Pretrain under bfloat16 autocast (fast with AMX / AVX-512 bf16; "
                                                   "slow where the CPU emulates it).")
    corpus_max_chars: int = Field(4_000_000, ge=10_000, description="Cap on docstring text gathered.")
    tokenizer_extra_files: list[str] = Field(
        default_factory=lambda: ["data/orders.jsonl"],
        description="Text files added to the tokenizer's training corpus only (not to pretraining), so the task's "
        "words become single tokens; paths relative to the repo root.",
    )
    seed_model: TinyLlamaSpec | None = Field(
        None, description="Grow the base from this smaller model (same head size): it is first trained on copy blocks "
        "alone, where a narrow model learns to copy by content in a few hundred steps and a wide one did not in "
        "thousands, then widened and deepened to `base` with its function kept (models/embedded.py grow_llama) "
        "and pretrained on the curriculum. None: pretrain `base` from random init.")
    seed_steps: int = Field(700, ge=1, description="Optimizer steps of the seed model on back-to-back copy blocks.")
    seed_lr: float = Field(1e-3, gt=0, description="The seed model's learning rate (constant after a short warmup).")
    seed: int = 0
    shipped: str | None = Field(
        None, description="Folder (relative to the repo root) of weights built once by `smelt embedded build` and "
        "committed; they are loaded, hash-checked, instead of pretraining. Its manifest's config must equal this one.")

    @model_validator(mode="after")
    def _seed_fits_in_base(self) -> "EmbeddedBuildConfig":
        small, big = self.seed_model, self.base
        if small is None:
            return self
        if small.hidden_size // small.num_heads != big.hidden_size // big.num_heads:
            raise ValueError(f"seed_model's head size ({small.hidden_size // small.num_heads}) must equal base's "
                             f"({big.hidden_size // big.num_heads}): growing adds heads, it does not reshape them")
        for field in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(small, field) > getattr(big, field):
                raise ValueError(f"seed_model.{field} ({getattr(small, field)}) is larger than base.{field} "
                                 f"({getattr(big, field)}): the seed grows into the base, it cannot shrink")
        return self


class ModelConfig(StrictModel):
    """Which base and draft to use. `embedded` builds them locally; anything else is a hub id or path."""

    name: str = Field("tiny-embedded", description="Short name used for the registered model.")
    base: str = Field("embedded", description="'embedded' or a Hugging Face id / local path of the base model.")
    draft: str = Field("embedded", description="'embedded', a hub id / path of a smaller same-tokenizer model, or 'none'.")
    embedded: EmbeddedBuildConfig = Field(default_factory=EmbeddedBuildConfig)
    chat_template: str | None = Field(None, description="Jinja chat template; None keeps the tokenizer's own.")
    trust_remote_code: Literal[False] = Field(False, description="Never run code shipped with weights.")


TrainMethod = Literal["lora", "qlora", "full"]


class LoraConfig(StrictModel):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules that get adapters; all-linear: every linear layer of the architecture except "
                                  "the output head (peft's per-architecture default), or a list such as [q_proj, v_proj].")
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full beside the adapters, e.g. [embed_tokens] when the tokenizer has tokens "
        "the base never saw in pretraining (tied output head kept tied).",
    )


class QLoraConfig(StrictModel):
    """QLoRA: the frozen base loaded in 4 bits by bitsandbytes under the LoRA adapter (train.method=qlora)."""

    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (about 0.4 bit per weight less).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of the 4-bit matmuls; auto: bfloat16 on a GPU, float32 on the CPU.")


class PreferenceConfig(StrictModel):
    """Preference tuning after SFT on the dataset's preference pairs (rows with a rejected answer), with
    TRL's trainers over a LoRA adapter on the fine-tuned model; the adapter is then merged. DPO's
    reference is the fine-tuned model itself (the adapter switched off); ORPO needs none."""

    method: Literal["none", "dpo", "orpo"] = Field("none", description="none: SFT only; dpo: Direct Preference "
                                                                       "Optimization; orpo: odds-ratio preference "
                                                                       "optimization (an SFT term plus the odds ratio).")
    beta: float = Field(0.1, gt=0, description="DPO: how far the policy may move from the reference (higher: less); "
                                                "ORPO: the weight of the odds-ratio term (lambda).")
    steps: int = Field(60, ge=1, description="Optimizer steps of preference tuning.")
    batch_size: int = Field(8, ge=1, description="Pairs per optimizer step.")
    learning_rate: float = Field(5e-4, gt=0, lt=1)
    lora: LoraConfig = Field(default_factory=LoraConfig, description="The preference adapter (a new one, on the merged SFT model).")
    eval_pairs: int = Field(64, ge=1, description="Eval-split pairs the reward accuracy and margin are measured on at the end.")
    start: Literal["sft", "base"] = Field("sft", description="sft: tune the fine-tuned model (SFT runs first); base: tune "
                                                             "the base model itself and skip SFT (ORPO's loss has an SFT "
                                                             "term of its own; DPO's reference is then the base).")

    @model_validator(mode="after")
    def _start_needs_a_method(self) -> "PreferenceConfig":
        if self.start == "base" and self.method == "none":
            raise ValueError("start=base skips SFT, so it needs a preference method (dpo or orpo)")
        return self


class TrainConfig(StrictModel):
    """Fine-tuning of the base (LoRA, QLoRA or full) and distillation of the draft.

    `batch_size` is the global batch: sequences per optimizer step over all processes and
    accumulation steps together, so changing `num_processes` or `grad_accum` changes speed and
    memory, not the result.
    """

    method: TrainMethod = Field("lora", description="lora: adapters on a frozen base; qlora: the same on a 4-bit base "
                                                    "(bitsandbytes); full: every weight trained (small models).")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    qlora: QLoraConfig = Field(default_factory=QLoraConfig)
    steps: int = Field(300, ge=1, description="Optimizer steps of fine-tuning (ignored when epochs is set).")
    epochs: float | None = Field(None, gt=0, description="Passes over the training split; when set, decides the steps.")
    batch_size: int = Field(16, ge=1, description="Global batch: sequences per optimizer step, all processes together.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches each process accumulates per optimizer step.")
    learning_rate: float = Field(2e-3, gt=0, lt=1)
    lr_schedule: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup (transformers' get_scheduler names).")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of the steps spent warming the learning rate up.")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0, description="Gradients are clipped to this global norm.")
    max_seq_len: int = Field(160, ge=16)
    packing: bool = Field(False, description="Pack several rows into each max_seq_len sequence (attention kept within "
                                             "each row) instead of padding every row of a batch to the longest.")
    log_every: int = Field(10, ge=1, description="Steps between progress/MLflow points (loss, learning rate, grad norm, tokens/s).")
    checkpoint_every: int = Field(100, ge=0, description="Steps between checkpoints (weights being trained, optimizer, "
                                                         "scheduler, RNG, data position); a rerun resumes from the last; 0 = none.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept; older ones are deleted.")
    eval_rows: int = Field(256, ge=1, description="Eval-split rows the eval loss is measured on.")
    eval_every: int = Field(0, ge=0, description="Steps between eval-loss measurements; 0 = only at the end.")
    early_stopping_patience: int = Field(0, ge=0, description="Stop after this many eval-loss measurements without "
                                                              "improvement and keep the best weights; 0 = off.")
    early_stopping_min_delta: float = Field(0.0, ge=0, description="Smallest eval-loss drop that counts as improvement.")
    num_processes: int = Field(1, ge=1, description="Training processes; >1 launches the same code with torchrun (CPU, gloo) "
                                                    "or accelerate launch (GPU, DDP; FSDP through accelerate_config).")
    accelerate_config: str | None = Field(None, description="accelerate config file for multi-GPU runs (FSDP, mixed precision).")
    draft_steps: int = Field(300, ge=0, description="Steps to train the draft on the target's own completions (0 = skip).")
    draft_learning_rate: float = Field(3e-3, gt=0, lt=1)
    distill_prompts: int = Field(512, ge=1, description="Training prompts the target completes to teach the draft.")
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    seed: int = 0
    device: Device = "auto"

    def stages(self) -> tuple[str, ...]:
        """The training stages this config runs, each with its own MLflow run."""
        if self.preference.method == "none":
            return ("train", "draft")
        return ("preference", "draft") if self.preference.start == "base" else ("train", "preference", "draft")

    def skips_sft(self) -> bool:
        return self.preference.method != "none" and self.preference.start == "base"

    @model_validator(mode="after")
    def _batch_splits(self) -> "TrainConfig":
        share = self.num_processes * self.grad_accum
        if self.batch_size % share:
            raise ValueError(f"batch_size {self.batch_size} does not split evenly over num_processes x grad_accum = {share}")
        if self.early_stopping_patience and not self.eval_every:
            raise ValueError("early_stopping_patience needs eval_every > 0 (how often eval loss is measured)")
        return self


class QuantConfig(StrictModel):
    methods: list[QuantMethod] = Field(
        default_factory=lambda: ["none", "torchao-int8-dyn"],
        description="Quantization methods to build candidates with; 'none' is the full-precision reference.",
    )
    calibration_rows: int = Field(32, ge=1, description="Training rows kept as calibration data with each artifact "
                                                        "(GPTQ calibrates on them).")
    group_size: int = Field(128, ge=16, description="Weights sharing one scale in GPTQ and int4 weight-only; must divide "
                                                    "the layers' input width (the tiny presets use 32).")
    bnb_double_quant: bool = Field(True, description="bnb-nf4: quantize the quantization constants too (saves ~0.4 bit/weight).")

    @field_validator("methods")
    @classmethod
    def _non_empty_unique(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("methods must name at least one quantization method")
        if len(set(v)) != len(v):
            raise ValueError(f"methods has duplicates: {v}")
        return v


class DecodeConfig(StrictModel):
    """How a candidate generates: the serving recipe evaluated and shipped together."""

    strategies: list[DecodeStrategy] = Field(
        default_factory=lambda: ["plain", "draft"],
        description="Decoding strategies to build candidates with.",
    )
    max_new_tokens: int = Field(64, ge=1, le=4096)
    num_draft_tokens: int = Field(4, ge=1, le=16, description="Tokens the draft proposes per step.")
    prompt_lookup_tokens: int = Field(5, ge=1, le=32)
    compile: bool = Field(False, description="Decode greedy requests of plain and draft candidates with smelt's static-cache "
                                             "loop, each step under torch.compile (models/fastgen.py); sampling, stop strings "
                                             "and prompt-lookup go through transformers' generate.")
