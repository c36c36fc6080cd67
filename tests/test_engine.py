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


# ---- requests: chat, free questions, streaming ------------------------------------------------


def generate_alone(model, tokenizer, image, masks, turns, max_new_tokens, eos=None):
    """One conversation through the model's plain `generate`, prompt built here from the
    template's parts (regions listed first, as Osprey-724K's conversations open)."""
    from osprey.prompts import TEMPLATES, build_generation_ids, regions_overview

    turns = [dict(t) for t in turns]
    if len(masks):
        turns[0]["value"] = regions_overview(len(masks)) + turns[0]["value"]
    sample = build_generation_ids(
        tokenizer, turns[-1]["value"], template=TEMPLATES["osprey_v1"], history=turns[:-1],
        num_regions=len(masks),
    )  # fmt: skip
    pixels = preprocess(image, model)
    region = None
    if sample.region_indices:
        region = [torch.from_numpy(np.stack([masks[i] for i in sample.region_indices]))]
    ids = model.generate(
        [sample.input_ids], pixels, region, max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id if eos is None else eos,
    )[0]  # fmt: skip
    return sample.input_ids, ids


def preprocess(image, model):
    from osprey.model.image_processing import preprocess_image

    return preprocess_image(image, model.config.vision)[None]


def chat_requests(scenes, params):
    from osprey.infer.engine import ChatRequest

    s0, s1, s2 = scenes
    return [
        ChatRequest(s0.image, [{"from": "human", "value": "What is <region1>?"}], s0.masks[:1],
                    params),
        ChatRequest(s1.image, [{"from": "human", "value": "What is <region2> near <region1>?"}],
                    s1.masks[:2], params),
        ChatRequest(s2.image, [{"from": "human", "value": "What is <region1>?"},
                               {"from": "gpt", "value": "a shape"},
                               {"from": "human", "value": "And <region1> again?"}],
                    s2.masks[:1], params),
        ChatRequest(s0.image, [{"from": "human", "value": "describe the picture"}], (), params),
    ]  # fmt: skip


def test_chat_batch_equals_each_conversation_alone(trained, tokenizer, scenes):
    from osprey.infer.engine import SamplingParams

    engine = RegionCaptioner(trained, tokenizer)
    requests = chat_requests(scenes, SamplingParams(max_new_tokens=10))
    done = engine.chat(requests)
    for request, completion in zip(requests, done, strict=True):
        prompt, ids = generate_alone(
            trained, tokenizer, request.image, request.masks, request.turns, 10
        )
        assert completion.token_ids == ids
        assert completion.text == tokenizer.decode(ids, skip_special_tokens=True).strip()
        assert completion.prompt_tokens == len(prompt) - 1 + trained.config.vision.num_image_tokens
        assert completion.finish_reason == ("length" if len(ids) == 10 else "stop")
    assert any(c.text for c in done)


def test_stream_deltas_add_up_to_the_answer_as_it_decodes(tokenizer, scenes):
    from osprey.infer.engine import SamplingParams

    # Random weights, no end token: every request decodes all its tokens, text arrives in steps.
    model = osprey.build_model("tiny", seed=3).eval()
    engine = RegionCaptioner(model, tokenizer, EngineConfig(eos_token_id=-1))
    requests = chat_requests(scenes, SamplingParams(max_new_tokens=12))
    texts, finals, steps_with_text = [""] * 4, [None] * 4, [0] * 4
    for events in engine.stream(requests):
        for i, event in enumerate(events):
            if event is None:
                continue
            texts[i] += event.delta
            steps_with_text[i] += bool(event.delta)
            if event.completion is not None:
                finals[i] = event.completion
    assert texts == [c.text for c in finals]
    assert all(c.finish_reason == "length" and len(c.token_ids) == 12 for c in finals)
    assert max(steps_with_text) > 3, "text arrives token by token, not at the end"
    assert [c.text for c in engine.chat(requests)] == texts


def test_stop_strings_length_and_cancellation(tokenizer, scenes):
    from osprey.infer.engine import SamplingParams

    model = osprey.build_model("tiny", seed=3).eval()
    engine = RegionCaptioner(model, tokenizer, EngineConfig(eos_token_id=-1))
    [full] = engine.chat(chat_requests(scenes, SamplingParams(max_new_tokens=12))[:1])
    words = full.text.split()
    assert len(words) > 2, full.text
    stop = words[1]
    cut = full.text[: full.text.find(stop)].strip()
    [stopped] = engine.chat(
        chat_requests(scenes, SamplingParams(max_new_tokens=12, stop=(stop,)))[:1]
    )
    assert (stopped.text, stopped.finish_reason) == (cut, "stop")
    assert len(stopped.token_ids) < len(full.token_ids)

    requests = chat_requests(scenes, SamplingParams(max_new_tokens=12))
    steps, finals = [0], {}
    for events in engine.stream(requests, cancelled=lambda i: i == 1 and steps[0] >= 2):
        steps[0] += 1
        for i, event in enumerate(events):
            # None only once a request is done: never before its last event.
            assert (event is None) == (i in finals), (i, event)
            if event is not None and event.completion is not None:
                finals[i] = event.completion
    assert finals[1].finish_reason == "cancelled" and len(finals[1].token_ids) == 2
    assert [len(finals[i].token_ids) for i in (0, 2, 3)] == [12, 12, 12]
    alone = engine.chat([requests[0]])[0]
    assert finals[0].token_ids == alone.token_ids, "the others decode on as before"


def test_sampled_request_depends_on_its_seed_not_its_batch(trained, tokenizer, scenes):
    from osprey.infer.engine import SamplingParams

    engine = RegionCaptioner(trained, tokenizer)
    hot = SamplingParams(temperature=1.5, top_p=0.95, seed=11, max_new_tokens=10)
    requests = chat_requests(scenes, SamplingParams(max_new_tokens=10))
    requests[2].params = hot
    batched = engine.chat(requests)[2]
    alone = engine.chat([requests[2]])[0]
    again = engine.chat([requests[2]])[0]
    assert batched.token_ids == alone.token_ids == again.token_ids


def test_answer_and_ask(trained, tokenizer, scenes):
    images, masks = inputs(scenes[:2])
    engine = RegionCaptioner(trained, tokenizer)
    answers = engine.answer(images, masks, CATEGORY_PROMPT, max_new_tokens=8)
    ref = engine.caption(images, masks, [Task("answer", CATEGORY_PROMPT, 8)])
    assert answers == [[r["answer"] for r in image] for image in ref]
    # Image-level questions, prompted as the reference's POPE: "<image>\n" + question.
    asked = engine.ask(images, ["Is there a red circle?", "Is there a cat?"])
    for image, question, text in zip(images, ["Is there a red circle?", "Is there a cat?"], asked,
                                     strict=True):  # fmt: skip
        from osprey.prompts import TEMPLATES, build_generation_ids

        ids = build_generation_ids(
            tokenizer, f"<image>\n{question}", template=TEMPLATES["osprey_v1"]
        )
        out = trained.generate(
            [ids.input_ids], preprocess(image, trained), None, max_new_tokens=128
        )[0]
        assert text == tokenizer.decode(out, skip_special_tokens=True).strip()


def test_decoding_logs_no_transformers_deprecation(tokenizer, scenes, caplog):
    """The KV cache goes in and comes out under the installed transformers' name: its
    once-per-process deprecation message would otherwise reach every user's first answer."""
    import logging

    from osprey.infer.engine import SamplingParams

    logging.Logger.warning_once.cache_clear()  # transformers logs it once per process
    model = osprey.build_model("tiny", seed=3).eval()
    engine = RegionCaptioner(model, tokenizer, EngineConfig(eos_token_id=-1))
    with caplog.at_level(logging.WARNING, logger="transformers"):
        engine.chat(chat_requests(scenes, SamplingParams(max_new_tokens=3)))
        engine.caption([scenes[0].image], [scenes[0].masks[:1]], TASKS[:1])
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]
