"""Vicuna-v1 conversation templates and their rendering to a prompt string.

Turns use the LLaVA/Osprey JSON form: ``{"from": "human" | "gpt", "value": str}``, alternating and
starting with the human. Rendering is split into segments so that the tokeniser can tell which
characters belong to an assistant answer (the only text the model learns) and which exchange a
segment belongs to (truncation drops whole exchanges).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

HUMAN = "human"
GPT = "gpt"


@dataclass(frozen=True, slots=True)
class ConversationTemplate:
    """A separator-style-two chat template: ``system sep ROLE0: q sep ROLE1: a sep2 ...``."""

    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str

    def __post_init__(self) -> None:
        if len(self.roles) != 2:
            raise ValueError(f"roles must be (user role, assistant role), got {self.roles!r}")

    @property
    def generation_prompt(self) -> str:
        """The text after which the model writes its answer (``"ASSISTANT:"``)."""
        return self.roles[1] + ":"


# Training template of every Osprey stage.
VICUNA_V1 = ConversationTemplate(
    system=(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    roles=("USER", "ASSISTANT"),
    sep=" ",
    sep2="</s>",
)

# Inference template of the released demo and evaluation scripts: the system line says "human"
# where VICUNA_V1 says "user"; the role strings stay USER/ASSISTANT.
OSPREY_V1 = ConversationTemplate(
    system=(
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    ),
    roles=("USER", "ASSISTANT"),
    sep=" ",
    sep2="</s>",
)

TEMPLATES: dict[str, ConversationTemplate] = {"vicuna_v1": VICUNA_V1, "osprey_v1": OSPREY_V1}


@dataclass(frozen=True, slots=True)
class Segment:
    """A piece of a rendered conversation.

    ``answer`` marks assistant text and the closing ``sep2``: the tokens the model is trained on.
    ``exchange`` is the 0-based index of the human/assistant pair the piece belongs to (the system
    line belongs to exchange 0).
    """

    text: str
    answer: bool
    exchange: int


def check_turns(turns: Sequence[dict], *, complete: bool) -> None:
    """Raise ValueError unless ``turns`` alternate human/gpt starting with the human.

    ``complete`` requires the last turn to be an assistant answer (training samples); without it
    the conversation may also end on a human turn (a question awaiting generation).
    """
    if not turns:
        raise ValueError("a conversation needs at least one turn, got none")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {i} must be a dict with a str 'value', got {turn!r}")
        expected = HUMAN if i % 2 == 0 else GPT
        if turn.get("from") != expected:
            raise ValueError(
                f"turn {i} must come from {expected!r} (turns alternate human/gpt starting with "
                f"the human), got from={turn.get('from')!r}"
            )
    if complete and len(turns) % 2:
        raise ValueError(
            f"the last turn must be the assistant's answer, got a human turn: {turns[-1]['value']!r}"
        )


def segments(
    turns: Sequence[dict],
    template: ConversationTemplate = VICUNA_V1,
    add_generation_prompt: bool = False,
) -> list[Segment]:
    """The rendered conversation as segments; ``"".join`` of their texts is :func:`render`."""
    check_turns(turns, complete=not add_generation_prompt)
    user, assistant = template.roles
    out = [Segment(template.system + template.sep, answer=False, exchange=0)]
    for i, turn in enumerate(turns):
        exchange = i // 2
        if turn["from"] == HUMAN:
            out.append(Segment(f"{user}: {turn['value']}{template.sep}", False, exchange))
        else:
            out.append(Segment(f"{assistant}:", False, exchange))
            # The space after the colon is answer text: a SentencePiece tokeniser folds it into the
            # answer's first token ("▁cat"), so it must stay with the answer.
            out.append(Segment(" " + turn["value"], True, exchange))
            out.append(Segment(template.sep2, True, exchange))
    if add_generation_prompt:
        if len(turns) % 2 == 0:
            raise ValueError("add_generation_prompt needs the conversation to end on a human turn")
        out.append(Segment(template.generation_prompt, False, len(turns) // 2))
    return out


def render(
    turns: Sequence[dict],
    template: ConversationTemplate = VICUNA_V1,
    add_generation_prompt: bool = False,
) -> str:
    """The prompt string, e.g. ``SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT:``."""
    return "".join(s.text for s in segments(turns, template, add_generation_prompt))
