"""The reference code's way of captioning: one region per call, each call re-running the vision
tower and the whole prompt (its demo's `osprey_predict`). Kept as the yardstick the engine is
tested against (same greedy outputs) and benchmarked against (bench/caption.py)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from osprey.infer.engine import CATEGORY, SHORT, ImageInput, MaskInput, Task, _as_mask
from osprey.model.image_processing import preprocess_image
from osprey.model.modeling import OspreyForCausalLM
from osprey.prompts import TEMPLATES, build_generation_ids


@torch.no_grad()
def caption_one_at_a_time(
    model: OspreyForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    images: Sequence[ImageInput],
    masks: Sequence[MaskInput],
    tasks: Sequence[Task] = (CATEGORY, SHORT),
    *,
    template: str = "osprey_v1",
    eos_token_id: int | None = None,
) -> list[list[dict[str, list[int]]]]:
    """Per image, per region: {task name: generated ids}, one `model.generate` call each."""
    model.eval()
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    prompts = {
        t.name: build_generation_ids(
            tokenizer, t.question, template=TEMPLATES[template], bare_index=0
        ).input_ids
        for t in tasks
    }
    out: list[list[dict[str, list[int]]]] = []
    for image, image_masks in zip(images, masks, strict=True):
        regions = []
        for mask in image_masks:
            answers = {}
            for task in tasks:
                pixels = preprocess_image(image, model.config.vision)[None].to(model.device)
                region = _as_mask(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
                answers[task.name] = model.generate(
                    [prompts[task.name]],
                    pixels,
                    [region[None].to(model.device)],
                    max_new_tokens=task.max_new_tokens,
                    eos_token_id=eos,
                )[0]
            regions.append(answers)
        out.append(regions)
    return out
