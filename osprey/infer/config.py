"""The engine's typed options and tasks, importable without torch (the CLI parser reads them).

The standard tasks themselves (CATEGORY, SHORT, DETAILED: the released demo's and evaluation's
prompts) are in osprey.infer.engine, since the prompts package loads transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(kw_only=True)
class EngineConfig:
    # Conversation template of the prompts (osprey.prompts.TEMPLATES); the released demo uses
    # osprey_v1, training uses vicuna_v1.
    template: str = "osprey_v1"
    # Rows of one decode batch; each holds a copy of its image's prefix cache.
    max_batch_regions: int = 64
    # Images whose vision tower and prefix run as one batch.
    max_batch_images: int = 8
    # 0 is greedy; otherwise temperature and nucleus (top-p) sampling.
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
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
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}"
            )
