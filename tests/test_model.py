"""The Osprey architecture: mask pooling, released key names, splicing and batching."""

import json

import pytest
import torch

import osprey
from osprey.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from osprey.model.checkpoint import CheckpointKeyError, load_strict
from osprey.model.config import LEVELS, OspreyConfig, get_config, tiny
from osprey.model.mask_extractor import mask_pool

MASK, POS = tiny().mask_token_id, tiny().pos_token_id


@pytest.fixture(scope="module")
def model():
    return osprey.build_model("tiny", seed=0).eval()


def brute_force_pool(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Resize, binarise, then average the feature vectors pixel by pixel."""
    resized = torch.nn.functional.interpolate(
        mask[None, None].float(), size=features.shape[-2:], mode="bilinear", align_corners=False
    )[0, 0]
    total = torch.zeros(features.shape[0])
    count = 0
    for y in range(features.shape[1]):
        for x in range(features.shape[2]):
            if resized[y, x] > 0:
                total += features[:, y, x]
                count += 1
    return total / (count + 1e-8)


def test_mask_pooling_matches_brute_force_at_every_level(model):
    torch.manual_seed(0)
    images = torch.randn(1, 3, 128, 128)
    features = model.vision_tower(images)
    assert [features[k].shape[1] for k in LEVELS] == list(model.config.vision.channels)
    masks = torch.rand(3, 97, 131) > 0.6
    masks[2] = False  # an empty mask pools to zeros, not NaN
    for level in LEVELS:
        pooled = mask_pool(features[level][0], masks.float())
        for r in range(masks.shape[0]):
            expected = brute_force_pool(features[level][0], masks[r])
            torch.testing.assert_close(pooled[r], expected, rtol=1e-5, atol=1e-6)
    assert torch.all(pooled[2] == 0)


def released_key_names(config: OspreyConfig) -> set[str]:
    """The released Osprey-7B layout (OSPREY.md), generated from the layer counts alone."""
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(config.llm.num_hidden_layers):
        p = f"model.layers.{i}."
        keys |= {p + f"self_attn.{n}_proj.weight" for n in "qkvo"}
        keys |= {p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
        keys |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
    for part in ("0", "2"):
        keys |= {f"model.mm_projector.{part}.weight", f"model.mm_projector.{part}.bias"}
    for name in ("feat_linear", *LEVELS, *(f"mask_linear.layers.{i}" for i in range(3))):
        keys |= {f"mask_extractor.{name}.weight", f"mask_extractor.{name}.bias"}
    return keys


def test_state_dict_uses_released_names(model):
    keys = set(model.state_dict())
    non_vision = {k for k in keys if not k.startswith("model.vision_tower.")}
    assert non_vision == released_key_names(model.config)
    vision = keys - non_vision
    prefix = "model.vision_tower.vision_tower.visual."
    assert all(k.startswith(prefix) for k in vision)
    assert {prefix + "head.mlp.fc1.weight", prefix + "head.mlp.fc2.weight"} <= vision
    assert prefix + "trunk.stages.0.blocks.0.gamma" in vision
    assert prefix + "trunk.stages.3.downsample.1.weight" in vision


def test_7b_names_equal_tiny_names_and_count_params():
    big = osprey.build_model("osprey-7b", device="meta")
    small = osprey.build_model("tiny", device="meta")
    strip = lambda k: k.split(".blocks.")[0]  # noqa: E731 (block counts differ by size)
    assert {strip(k) for k in big.state_dict() if ".layers." not in k} == {
        strip(k) for k in small.state_dict() if ".layers." not in k
    }
    assert len(big.state_dict()) == 656  # 688 released tensors less 32 rotary buffers
    assert big.lm_head.weight.shape == (32000, 4096)
    assert big.mask_extractor.mask_linear.layers[0].weight.shape == (1024, 112 * 112)
    assert big.model.mm_projector[0].weight.shape == (4096, 768)
    total = sum(p.numel() for p in big.parameters())
    assert 6.9e9 < total < 7.3e9


def test_strict_loading_names_missing_and_unexpected_keys(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # Legacy rotary buffers of the release are accepted and dropped.
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    fresh = osprey.build_model("tiny", seed=1)
    load_strict(fresh, state)
    torch.testing.assert_close(fresh.lm_head.weight, model.lm_head.weight)

    missing = dict(state)
    del missing["mask_extractor.res3.bias"]
    with pytest.raises(CheckpointKeyError, match="missing keys: mask_extractor.res3.bias"):
        load_strict(fresh, missing)
    extra = dict(state, **{"model.mm_projector.4.weight": torch.zeros(1)})
    with pytest.raises(CheckpointKeyError, match="unexpected keys: model.mm_projector.4.weight"):
        load_strict(fresh, extra)


def sample(n_text: int, n_regions: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(3, 1000, (n_text,), generator=g).tolist()
    ids = [1, IMAGE_TOKEN_INDEX, *words[: n_text // 2]]
    for _ in range(n_regions):
        ids += [MASK, POS, int(torch.randint(3, 1000, (1,), generator=g))]
    ids += [*words[n_text // 2 :], 2]
    masks = torch.rand(n_regions, 60 + seed, 80, generator=g) > 0.5
    image = torch.randn(3, 128, 128, generator=g)
    return ids, image, masks


def test_batched_forward_matches_per_sample(model):
    samples = [sample(7, 1, 0), sample(15, 3, 1), sample(4, 0, 2)]
    ids, attn = osprey.model.modeling.pad_ids([s[0] for s in samples], 0, "right")
    labels = ids.masked_fill(attn == 0, IGNORE_INDEX)
    images = torch.stack([s[1] for s in samples])
    masks = [s[2] for s in samples]
    with torch.no_grad():
        batched = model(ids, attn, images, masks, labels)
        for b, (one_ids, image, one_masks) in enumerate(samples):
            alone = model(torch.tensor([one_ids]), None, image[None], [one_masks])
            n = alone.logits.shape[1]
            torch.testing.assert_close(batched.logits[b, :n], alone.logits[0], atol=1e-4, rtol=0)
            assert bool((batched.labels[b, n:] == IGNORE_INDEX).all())
    # Image and region positions never carry labels.
    image_tokens = model.config.vision.num_image_tokens
    assert bool((batched.labels[:, 1 : 1 + image_tokens] == IGNORE_INDEX).all())
    assert torch.isfinite(batched.loss)


def test_region_count_mismatch_is_a_clear_error(model):
    ids, image, masks = sample(5, 2, 3)
    with pytest.raises(ValueError, match=r"sample 0: 2 <mask> and 2 <pos> tokens but 1 masks"):
        model(torch.tensor([ids]), None, image[None], [masks[:1]])


def test_left_padded_generation_matches_single(model):
    prompts = [sample(6, 1, 4), sample(11, 2, 5)]
    images = torch.stack([p[1] for p in prompts])
    batch = model.generate(
        [p[0][:-1] for p in prompts], images, [p[2] for p in prompts], max_new_tokens=6
    )
    for b, (ids, image, masks) in enumerate(prompts):
        alone = model.generate([ids[:-1]], image[None], [masks], max_new_tokens=6)
        assert batch[b] == alone[0]
        assert len(alone[0]) == 6  # random weights never emit eos in 6 steps here


def test_checkpoint_round_trip(model, tmp_path):
    osprey.model.checkpoint.save_checkpoint(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["hidden_size"] == 128 and config["osprey"]["name"] == "tiny"
    loaded = osprey.load_model(tmp_path / "ckpt")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ids, image, masks = sample(8, 2, 6)
    with torch.no_grad():
        a = model(torch.tensor([ids]), None, image[None], [masks]).logits
        b = loaded(torch.tensor([ids]), None, image[None], [masks]).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_presets_validate_options():
    assert get_config("tiny").vision.num_image_tokens == 64
    assert get_config("osprey-7b").vision.num_image_tokens == 1024
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        get_config("huge")
    with pytest.raises(ValueError, match="image_size must be a multiple of 32"):
        osprey.VisionConfig(image_size=500) if hasattr(osprey, "VisionConfig") else (
            osprey.model.VisionConfig(image_size=500)
        )
