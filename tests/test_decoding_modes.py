"""Decoding modes (issue 16 §3): greedy by default, `reference` as the released code samples
(temperature 0.2, top-p/top-k from generation_config.json, up to 1024 new tokens, seeded), on
`osprey caption`, `osprey eval` and the engine; the demo's answer clean-up in that mode."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from osprey.infer.config import EngineConfig, GenerationOptions
from osprey.infer.postprocess import demo_answer


def reference_demo_cleanup(outputs: str) -> str:
    """demo/osprey_inference.py (CircleRadon/Osprey deb0e57, lines 139-157) as it is written:
    the piece after the first ':', then '.'-separated pieces until one repeats."""
    outputs = outputs.strip()
    if ":" in outputs:
        outputs = outputs.split(":")[1]
    outputs_list = outputs.split(".")
    outputs_list_final = []
    outputs_str = ""
    for output in outputs_list:
        if output not in outputs_list_final:
            if output == "":
                continue
            outputs_list_final.append(output)
            outputs_str += output + "."
        else:
            break
    return outputs_str


@pytest.mark.parametrize(
    "text",
    [
        "A red circle.",
        "region1: a red circle. It is small.",
        "A dog. A dog. A dog.",  # the repeats keep their leading space: all three are kept
        "A dog.A dog.A dog",
        "The dog.. sits: on a mat. The dog.",
        "  no full stop at all  ",
        "a: b: c.",
        "",
        "...",
    ],
)
def test_demo_cleanup_is_the_references(text):
    assert demo_answer(text) == reference_demo_cleanup(text)


def test_reference_mode_reads_the_checkpoints_generation_config(tmp_path):
    greedy = EngineConfig()
    assert greedy.for_model(tmp_path) is greedy
    defaults = EngineConfig(decoding="reference").for_model(None)
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.seed) == (
        0.2,
        1.0,
        50,
        0,
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 0.9, "top_k": 0}))
    config = EngineConfig(decoding="reference", seed=7, temperature=1.5).for_model(tmp_path)
    assert (config.temperature, config.top_p, config.top_k, config.seed) == (0.2, 0.9, 0, 7)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="generation_config.json"):
        EngineConfig(decoding="reference").for_model(tmp_path)
    with pytest.raises(ValueError, match="decoding mode"):
        EngineConfig(decoding="beam")


@pytest.mark.parametrize("command", ["caption", "eval"])
def test_both_jobs_take_the_same_generation_flags(command):
    from osprey.eval.job import add_eval_arguments
    from osprey.eval.job import config_from_args as eval_config
    from osprey.infer.job import add_caption_arguments
    from osprey.infer.job import config_from_args as caption_config

    parser = argparse.ArgumentParser()
    if command == "caption":
        add_caption_arguments(parser)
        base = ["images/", "--out", "out/", "--model", "m"]
    else:
        add_eval_arguments(parser)
        base = ["--benchmark", "shapes", "--model", "m", "--data", "d", "--no-mlflow"]
    greedy = parser.parse_args(base)
    reference = parser.parse_args([*base, "--decoding", "reference", "--seed", "3"])
    if command == "caption":
        config = caption_config(greedy)
        assert config.engine.decoding == "greedy" and config.short_tokens == 48
        config = caption_config(reference)
        assert config.engine.decoding == "reference" and config.engine.seed == 3
        # The reference's 1024 new tokens unless a cap is given.
        assert config.short_tokens == config.detailed_tokens == 1024
    else:
        config = eval_config(greedy)
        assert config.engine().decoding == "greedy" and config.tokens() == 8  # the benchmark's
        config = eval_config(reference)
        assert config.engine().decoding == "reference" and config.tokens() == 1024
        assert config.generation.sampling_record() == {"decoding": "reference", "seed": 3}
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--decoding", "beam"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from osprey.infer.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("model"))


def test_reference_mode_cleans_sampled_descriptions(tiny):
    """The same seeded sampling with and without the mode: the reference mode's short answers
    are the other's run through the demo's clean-up; categories are left as they are."""
    from osprey.infer.engine import CATEGORY, SHORT, RegionCaptioner

    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    masks = [np.zeros((2, 48, 64), dtype=bool)]
    masks[0][0, 5:20, 5:30] = True
    masks[0][1, 25:40, 30:60] = True
    reference = RegionCaptioner.from_pretrained(tiny, EngineConfig(decoding="reference", seed=5))
    assert reference.config.temperature == 0.2
    same_sampling = EngineConfig(
        temperature=0.2, top_p=reference.config.top_p, top_k=reference.config.top_k, seed=5
    )
    plain = RegionCaptioner.from_pretrained(tiny, same_sampling)
    cleaned = reference.caption([image], masks, [CATEGORY, SHORT])[0]
    raw = plain.caption([image], masks, [CATEGORY, SHORT])[0]
    # Otherwise an engine that skipped the clean-up would pass too.
    assert any(reference_demo_cleanup(r["short"]) != r["short"] for r in raw), raw
    for ours, theirs in zip(cleaned, raw, strict=True):
        assert ours["category"] == theirs["category"]
        assert ours["short"] == reference_demo_cleanup(theirs["short"])


def test_eval_records_the_decoding_mode(tiny, tmp_path):
    """`osprey eval --decoding reference --seed 0` on shapes: metrics.json and the MLflow run's
    params say how the numbers were decoded."""
    from mlflow.tracking import MlflowClient

    from osprey.data.shapes import write_shapes_dataset
    from osprey.eval.benchmarks import BenchmarkData
    from osprey.eval.job import EvalConfig, run_eval

    write_shapes_dataset(str(tmp_path / "shapes"), n=10, seed=3, progress=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = EvalConfig(
        benchmark="shapes", model=str(tiny), data=BenchmarkData(root=str(tmp_path / "shapes")),
        out=str(tmp_path / "out"), limit=2, max_new_tokens=4, tracking_uri=uri,
        generation=GenerationOptions(decoding="reference", seed=0),
    )  # fmt: skip
    result = run_eval(config, local=True)
    written = json.loads(Path(tmp_path / "out" / "metrics.json").read_text())
    assert written["decoding"] == "reference" and written["seed"] == 0
    assert written["regions"] == result.metrics["regions"] > 0
    run = MlflowClient(uri).get_run(result.run_id)
    assert run.data.params["decoding"] == "reference" and run.data.params["seed"] == "0"
