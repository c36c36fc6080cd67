"""The engine's typed options and tasks, importable without torch (the CLI parser reads them).

The standard tasks themselves (CATEGORY, SHORT, DETAILED: the released demo's and evaluation's
prompts) are in osprey.infer.engine, since the prompts package loads transformers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

# New tokens allowed per answer of each standard task, and of a free question.
CATEGORY_TOKENS = 16
SHORT_TOKENS = 48
DETAILED_TOKENS = 512
ANSWER_TOKENS = 128


@dataclass(frozen=True, slots=True)
class Task:
    """A question asked of every region; `question` holds one `<region>` placeholder."""

    name: str
    question: str
    max_new_tokens: int

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"task {self.name!r}: max_new_tokens must be >= 1")


def question_task(question: str, max_new_tokens: int = ANSWER_TOKENS, name: str = "answer") -> Task:
    """A free question about each region, e.g. "What colour is <region>?"."""
    if question.count("<region>") + question.count("<mask><pos>") != 1:
        raise ValueError(f"question {question!r} must name the region exactly once, as <region>")
    return Task(name, question, max_new_tokens)


@dataclass(frozen=True, kw_only=True, slots=True)
class SamplingParams:
    """How one request decodes: greedy when temperature is 0, else sampled after transformers'
    temperature, top-k and top-p warpers (applied in that order, as `generate` does)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    # Seeds this request's own generator, so its sample does not depend on its batch mates.
    seed: int | None = None
    max_new_tokens: int = ANSWER_TOKENS
    # Decoding stops before the first of these texts; it is not part of the answer.
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop: empty stop strings are not allowed")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


DecodingMode = Literal["greedy", "reference"]
DECODING_MODES: tuple[str, ...] = ("greedy", "reference")
# The reference's evaluation and demo call generate(do_sample=True, temperature=0.2,
# max_new_tokens=1024); top_p and top_k then come from the checkpoint's generation config,
# whose defaults in transformers are top_p 1.0 and top_k 50.
REFERENCE_TEMPERATURE = 0.2
REFERENCE_MAX_NEW_TOKENS = 1024
GENERATION_CONFIG_DEFAULTS = {"top_p": 1.0, "top_k": 50}


@dataclass(frozen=True, kw_only=True, slots=True)
class DecodingConfig:
    """A named decoding mode: `greedy` (the default: deterministic, what the tests pin) or
    `reference` (the released code's sampled decoding, seeded)."""

    mode: DecodingMode = "greedy"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in DECODING_MODES:
            raise ValueError(f"decoding mode {self.mode!r}: choose one of {DECODING_MODES}")

    def params(
        self, model_dir: str | os.PathLike | None = None, max_new_tokens: int | None = None
    ) -> SamplingParams:
        """The mode's sampling parameters; `reference` reads top_p/top_k from the model
        directory's generation_config.json when there is one. `max_new_tokens` overrides the
        mode's own cap (greedy: ANSWER_TOKENS, reference: 1024)."""
        if self.mode == "greedy":
            return SamplingParams(max_new_tokens=max_new_tokens or ANSWER_TOKENS)
        generation = dict(GENERATION_CONFIG_DEFAULTS)
        if model_dir is not None:
            generation.update(_generation_config(Path(model_dir)))
        return SamplingParams(
            temperature=REFERENCE_TEMPERATURE,
            top_p=float(generation["top_p"]),
            top_k=int(generation["top_k"]),
            seed=self.seed,
            max_new_tokens=max_new_tokens or REFERENCE_MAX_NEW_TOKENS,
        )


def _generation_config(model_dir: Path) -> dict:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    return {k: data[k] for k in ("top_p", "top_k") if data.get(k) is not None}


@dataclass(kw_only=True)
class EngineConfig:
    # Conversation template of the prompts (osprey.prompts.TEMPLATES); the released demo uses
    # osprey_v1, training uses vicuna_v1.
    template: str = "osprey_v1"
    # Rows of one decode batch; each holds a copy of its image's prefix cache.
    max_batch_regions: int = 64
    # Images whose vision tower and prefix run as one batch.
    max_batch_images: int = 8
    # 0 is greedy; otherwise temperature, top-k and nucleus (top-p) sampling.
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    # `reference` replaces the three above by the released code's sampling (DecodingConfig);
    # `for_model` applies it once the model directory (its generation_config.json) is known.
    decoding: DecodingMode = "greedy"
    # End token; None means the tokenizer's.
    eos_token_id: int | None = None
    # Masks are turned into float tensors a chunk at a time within this many bytes.
    mask_budget_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        from osprey.prompts.conversation import TEMPLATES

        if self.template not in TEMPLATES:
            raise ValueError(f"template {self.template!r}: choose one of {sorted(TEMPLATES)}")
        if self.max_batch_regions < 1 or self.max_batch_images < 1:
            raise ValueError("max_batch_regions and max_batch_images must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(
                f"temperature must be >= 0, top_p in (0, 1] and top_k >= 0, got "
                f"{self.temperature}, {self.top_p}, {self.top_k}"
            )
        if self.decoding not in DECODING_MODES:
            raise ValueError(f"decoding mode {self.decoding!r}: choose one of {DECODING_MODES}")

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        """The engine-wide sampling options as one request's parameters."""
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            max_new_tokens=max_new_tokens,
        )

    def for_model(self, model_dir: str | os.PathLike | None) -> EngineConfig:
        """This config with the `reference` mode's sampling filled in from `model_dir`'s
        generation_config.json (None: transformers' defaults); greedy configs as they are."""
        if self.decoding == "greedy":
            return self
        params = DecodingConfig(mode=self.decoding, seed=self.seed or 0).params(model_dir)
        return replace(
            self,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed,
        )


@dataclass(kw_only=True)
class GenerationOptions:
    """How a batch job (`osprey caption`, `osprey eval`) decodes; one argument group
    (osprey.infer.generation_args) fills it for both."""

    decoding: DecodingMode = "greedy"
    template: str | None = None  # None: the job's default
    temperature: float = 0.0  # greedy; ignored by the `reference` mode
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_batch_regions: int = 64
    dtype: str | None = None  # model weights' dtype; None keeps the checkpoint's

    def __post_init__(self) -> None:
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype {self.dtype!r}: choose float32, bfloat16 or float16")
        self.engine(default_template="osprey_v1", max_batch_images=1)  # checks the rest

    def engine(self, *, default_template: str, max_batch_images: int) -> EngineConfig:
        return EngineConfig(
            template=self.template or default_template,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            decoding=self.decoding,
            max_batch_regions=self.max_batch_regions,
            max_batch_images=max_batch_images,
        )

    def max_new_tokens(self, default: int) -> int:
        """A task's token cap: the reference mode's 1024, else the task's own."""
        return REFERENCE_MAX_NEW_TOKENS if self.decoding == "reference" else default

    def sampling_record(self) -> dict[str, object]:
        """What a job records of its decoding (metrics.json, MLflow params, resume identity)."""
        if self.decoding == "reference":
            return {"decoding": "reference", "seed": self.seed or 0}
        return {
            "decoding": "greedy" if self.temperature == 0 else "sampled",
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
        }
