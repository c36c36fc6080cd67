"""The batched, shared-prefix engine gives the one-region-at-a-time outputs, faster."""

import numpy as np
import pytest
import torch

import osprey
from osprey.data.shapes import POSITIONS, render_sample, shapes_corpus
from osprey.infer.baseline import caption_one_at_a_time
from osprey.infer.engine import (
    CATEGORY,
    SHORT,
    EngineConfig,
    RegionCaptioner,
    Task,
    question_task,
)
from osprey.infer.regions import Region, RleMasks
from osprey.model.modeling import pad_ids
from osprey.model.vision import VisionTower
from osprey.prompts import (
    CATEGORY_PROMPT,
    OSPREY_V1,
    SHORT_CAPTION_PROMPT,
    tokenize_conversation,
    train_tokenizer,
)

TASKS = (Task("category", CATEGORY_PROMPT, 8), Task("short", SHORT_CAPTION_PROMPT, 12))


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(shapes_corpus(), vocab_size=osprey.get_config("tiny").llm.vocab_size)


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(1)
    return [render_sample(rng) for _ in range(3)]


def overfit(model, tokenizer, scenes, max_steps=150):
    """Teach the tiny model each region's category and "size category where" so that regions
    get different answers of different lengths (a random model says the same for every region)."""
    cfg = model.config
    samples, image_index, masks = [], [], []
    for k, scene in enumerate(scenes):
        for r, label in enumerate(scene.labels):
            for question, answer in (
                (CATEGORY_PROMPT, label.category),
                (SHORT_CAPTION_PROMPT, f"{label.size} {label.category} {where(label, scene)}"),
            ):
                turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
                samples.append(
                    tokenize_conversation(
                        tokenizer,
                        turns,
                        template=OSPREY_V1,
                        num_image_tokens=cfg.vision.num_image_tokens,
                        bare_index=0,
                    )
                )
                image_index.append(k)
                masks.append(torch.from_numpy(scene.masks[r : r + 1]))
    ids, attn = pad_ids([s.input_ids for s in samples], 0, "right")
    labels, _ = pad_ids([s.labels for s in samples], -100, "right")
    pixels = torch.stack(
        [osprey.model.image_processing.preprocess_image(s.image, cfg.vision) for s in scenes]
    )
    # The tower is frozen: its features are computed once, not every step.
    features = model.vision_tower(pixels)
    features = {name: f[image_index] for name, f in features.items()}
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0
    )
    model.train()
    for _ in range(max_steps):
        image_embeds = model.model.mm_projector(VisionTower.image_tokens(features))
        mask_tokens, pos_tokens = model.encode_regions(features, masks)
        inputs = model.splice(ids, attn, labels, image_embeds, mask_tokens, pos_tokens)
        loss = model.forward_embeds(inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.03:
            break
    return model.eval()


def where(label, scene):
    x, y = label.centroid
    size = scene.image.shape[0]
    return POSITIONS[(min(int(3 * y / size), 2), min(int(3 * x / size), 2))]


@pytest.fixture(scope="module")
def trained(tokenizer, scenes):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier than 2 threads on a shared 2-core machine
    try:
        yield overfit(osprey.build_model("tiny", seed=0), tokenizer, scenes)
    finally:
        # Module scope outlives conftest's per-test restore: later modules must not inherit 1.
        torch.set_num_threads(threads)


def inputs(scenes):
    return [s.image for s in scenes], [s.masks for s in scenes]


@pytest.mark.parametrize(
    "config",
    [
        EngineConfig(),
        # Regions of one image split over batches, batches mixing images.
        EngineConfig(max_batch_images=2, max_batch_regions=3),
        EngineConfig(max_batch_images=1, max_batch_regions=1),
    ],
    ids=["one-batch", "mixed-batches", "one-row"],
)
def test_batched_shared_prefix_equals_one_region_at_a_time(trained, tokenizer, scenes, config):
    images, masks = inputs(scenes)
    engine = RegionCaptioner(trained, tokenizer, config)
    batched = engine.generate_ids(images, masks, TASKS)
    alone = caption_one_at_a_time(trained, tokenizer, images, masks, TASKS)
    assert batched == alone
    # Non-trivial: regions get different answers, of different lengths.
    answers = [r["short"] for image in batched for r in image]
    assert len({tuple(a) for a in answers}) > len(answers) // 2
    assert len({len(a) for a in answers}) > 1
    assert engine.stats.regions == sum(len(m) for m in masks)


def test_engine_answers_what_the_model_learned(trained, tokenizer, scenes):
    images, masks = inputs(scenes)
    out = RegionCaptioner(trained, tokenizer).caption(images, masks, TASKS)
    expected = [[label.category for label in s.labels] for s in scenes]
    got = [[r["category"] for r in image] for image in out]
    right = sum(
        g == e for gs, es in zip(got, expected, strict=True) for g, e in zip(gs, es, strict=True)
    )
    assert right >= 0.8 * sum(len(e) for e in expected), got


def test_random_weights_long_decode_matches(tokenizer, scenes):
    # No end token is ever produced (-1), so every row decodes all 12 tokens.
    model = osprey.build_model("tiny", seed=3).eval()
    images, masks = inputs(scenes[:2])
    tasks = (Task("category", CATEGORY.question, 12), Task("short", SHORT.question, 12))
    engine = RegionCaptioner(model, tokenizer, EngineConfig(eos_token_id=-1, max_batch_regions=4))
    batched = engine.generate_ids(images, masks, tasks)
    alone = caption_one_at_a_time(model, tokenizer, images, masks, tasks, eos_token_id=-1)
    assert batched == alone
    assert all(len(ids) == 12 for image in batched for r in image for ids in r.values())


def test_rle_masks_and_images_without_regions(trained, tokenizer, scenes):
    images, masks = inputs(scenes[:2])
    lazy = [RleMasks([Region.from_mask(m) for m in image_masks]) for image_masks in masks]
    engine = RegionCaptioner(trained, tokenizer)
    empty = np.zeros((0, *masks[0].shape[1:]), dtype=bool)
    out = engine.generate_ids([images[0], images[0], images[1]], [lazy[0], empty, lazy[1]], TASKS)
    ref = engine.generate_ids(images, masks, TASKS)
    assert out[1] == []
    assert [out[0], out[2]] == ref


def test_sampling_is_seeded(trained, tokenizer, scenes):
    images, masks = inputs(scenes[:1])
    config = EngineConfig(temperature=1.5, top_p=0.9, seed=7)
    first = RegionCaptioner(trained, tokenizer, config).generate_ids(images, masks, TASKS)
    again = RegionCaptioner(trained, tokenizer, config).generate_ids(images, masks, TASKS)
    assert first == again


def test_shared_prefix_holds_the_image_and_stops_before_the_region(trained, tokenizer):
    engine = RegionCaptioner(trained, tokenizer)
    tasks = (*TASKS, question_task("What colour is <region>?"))
    prompts = engine._prompts(tasks)
    assert osprey.constants.IMAGE_TOKEN_INDEX in prompts.prefix
    for task in tasks:
        whole = engine.prompt_ids(task.question)
        assert whole == prompts.prefix + prompts.suffixes[task.name]
        assert trained.config.mask_token_id in prompts.suffixes[task.name]


def test_bad_inputs_raise_value_errors(trained, tokenizer, scenes):
    engine = RegionCaptioner(trained, tokenizer)
    image = scenes[0].image
    with pytest.raises(ValueError, match="exactly once"):
        question_task("What is this?")
    with pytest.raises(ValueError, match="image 0"):
        engine.generate_ids([image], [np.zeros((1, 10, 10), dtype=bool)], TASKS)
    with pytest.raises(ValueError, match="mask sets"):
        engine.generate_ids([image], [], TASKS)
    with pytest.raises(ValueError, match="template"):
        EngineConfig(template="chatml")
    other = train_tokenizer(["a b c"], vocab_size=512)
    with pytest.raises(ValueError, match="mask_token_id"):
        RegionCaptioner(trained, other)
