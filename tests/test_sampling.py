"""Sampling goes through transformers' own logits warpers; the decoding modes are typed presets.

The expected distributions are computed here from the definitions (softmax of logits / T; the
smallest most-probable set whose mass reaches top_p), not from our code."""

import json
import math

import numpy as np
import pytest
import torch

from osprey.infer.config import DecodingConfig, SamplingParams
from osprey.model.modeling import sample_next, warp_logits

LOGITS = torch.tensor([[2.0, 1.5, 0.3, -0.4, -1.0, -2.5, 0.9, -0.1]])


def expected_probs(logits: torch.Tensor, temperature: float, top_p: float) -> np.ndarray:
    z = logits[0].double().numpy() / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += p[i]
        if mass >= top_p:
            break
    q = np.zeros_like(p)
    q[kept] = p[kept]
    return q / q.sum()


def draw(temperature: float, top_p: float, n: int = 20000) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    logits = LOGITS.repeat(n, 1)
    tokens = sample_next(logits, temperature, top_p, generator)
    return np.bincount(tokens.numpy(), minlength=LOGITS.shape[1]) / n


def test_greedy_is_argmax():
    assert sample_next(LOGITS, 0.0, 0.5).tolist() == [0]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.8), (0.7, 0.6)])
def test_warped_distribution_matches_the_definition(temperature, top_p):
    want = expected_probs(LOGITS, temperature, top_p)
    got = torch.softmax(warp_logits(LOGITS, temperature, top_p), -1)[0].double().numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)
    freq = draw(temperature, top_p)
    # The tail top-p excludes is never drawn; the rest within sampling noise (5 sigma).
    assert (freq[want == 0] == 0).all()
    sigma = np.sqrt(want * (1 - want) / 20000)
    assert (np.abs(freq - want) <= 5 * sigma + 1e-9).all(), (freq, want)


def test_top_p_excludes_the_tail_and_temperature_sharpens():
    full = expected_probs(LOGITS, 1.0, 1.0)
    nucleus = torch.softmax(warp_logits(LOGITS, 1.0, 0.8), -1)[0].numpy()
    assert (nucleus > 0).sum() < (full > 0).sum()
    assert set(np.flatnonzero(nucleus == 0)) == set(np.argsort(full)[: (nucleus == 0).sum()])
    cold = torch.softmax(warp_logits(LOGITS, 0.2, 1.0), -1)[0].numpy()
    assert cold.max() > full.max() and cold[0] > 0.9
    entropy = lambda p: -sum(x * math.log(x) for x in p if x > 0)  # noqa: E731
    assert entropy(cold) < entropy(full)


def test_top_k_keeps_the_k_most_likely():
    kept = torch.isfinite(warp_logits(LOGITS, 1.0, 1.0, top_k=3))[0].numpy()
    assert set(np.flatnonzero(kept)) == set(np.argsort(-LOGITS[0].numpy())[:3])


def test_decoding_modes(tmp_path):
    assert DecodingConfig().params() == SamplingParams()
    assert DecodingConfig().params(max_new_tokens=7).greedy
    ref = DecodingConfig(mode="reference", seed=3).params(tmp_path)
    # No generation_config.json: transformers' defaults, as the reference's generate saw them.
    assert (ref.temperature, ref.top_p, ref.top_k, ref.max_new_tokens, ref.seed) == (
        0.2, 1.0, 50, 1024, 3)  # fmt: skip
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 0.6, "temperature": 0.9}))
    ref = DecodingConfig(mode="reference").params(tmp_path, max_new_tokens=16)
    assert (ref.temperature, ref.top_p, ref.top_k, ref.max_new_tokens) == (0.2, 0.6, 50, 16)
    with pytest.raises(ValueError, match="decoding mode"):
        DecodingConfig(mode="beam")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=("",))
