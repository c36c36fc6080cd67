"""A real learning test: the tiny model overfits a batch of region questions, then answers them."""

import random

import numpy as np
import pytest
import torch

import osprey
from osprey.data.shapes import render_sample, shapes_corpus
from osprey.model.image_processing import preprocess_image
from osprey.model.modeling import pad_ids
from osprey.prompts import VICUNA_V1, build_generation_ids, tokenize_conversation, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(shapes_corpus(), vocab_size=osprey.get_config("tiny").llm.vocab_size)


def region_questions(n_images: int, seed: int):
    """(image tensor, masks, question, answer) for the first region of each synthetic image."""
    rng = np.random.default_rng(seed)
    config = osprey.get_config("tiny").vision
    items = []
    for _ in range(n_images):
        scene = render_sample(rng)
        r = int(rng.integers(len(scene.labels)))
        question = (
            "What is the category of <region1>? Answer the question using a single word or phrase."
        )
        items.append(
            (
                preprocess_image(scene.image, config),
                torch.from_numpy(scene.masks[r : r + 1]),
                question,
                scene.labels[r].category,
            )
        )
    return items


def test_tiny_model_overfits_then_generates_the_answers(tokenizer):
    torch.manual_seed(0)
    random.seed(0)
    model = osprey.build_model("tiny", seed=0)
    assert tokenizer.convert_tokens_to_ids("<mask>") == model.config.mask_token_id
    items = region_questions(6, seed=1)
    samples = [
        tokenize_conversation(
            tokenizer,
            [{"from": "human", "value": q}, {"from": "gpt", "value": a}],
            template=VICUNA_V1,
            num_image_tokens=model.config.vision.num_image_tokens,
        )
        for _, _, q, a in items
    ]
    ids, attn = pad_ids([s.input_ids for s in samples], 0, "right")
    labels, _ = pad_ids([s.labels for s in samples], -100, "right")
    images = torch.stack([it[0] for it in items])
    masks = [it[1] for it in items]

    trainable = [p for p in model.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    vision_before = {k: v.clone() for k, v in model.vision_tower.state_dict().items()}
    optimizer = torch.optim.AdamW(trainable, lr=2e-3, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(300):
        loss = model(ids, attn, images, masks, labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if loss.item() < 0.02:
            break
    assert losses[-1] < 0.05, f"loss only fell from {losses[0]:.3f} to {losses[-1]:.3f}"
    assert not model.vision_tower.training  # frozen tower stays in eval mode
    for k, v in model.vision_tower.state_dict().items():
        assert torch.equal(v, vision_before[k]), k

    model.eval()
    prompts = [
        build_generation_ids(tokenizer, q, template=VICUNA_V1, bare_index=0).input_ids
        for _, _, q, _ in items
    ]
    outputs = model.generate(prompts, images, masks, max_new_tokens=8)
    answers = [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outputs]
    assert answers == [a for _, _, _, a in items]
