"""Forward-time split of the `tiny` preset, and the parameter count of `osprey-7b`.

    python bench/model_forward.py [--batch 8] [--regions 4] [--repeats 20]

Times are medians over repeats, measured side by side in one run; the share of each part is the
figure to compare between runs (absolute times depend on the machine).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import osprey
from osprey.constants import IMAGE_TOKEN_INDEX
from osprey.model.modeling import pad_ids


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--regions", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = osprey.build_model("tiny", seed=0).eval()
    cfg = model.config
    size = cfg.vision.image_size
    images = torch.randn(args.batch, 3, size, size)
    masks = [torch.rand(args.regions, 256, 256) > 0.5 for _ in range(args.batch)]
    region_ids = [cfg.mask_token_id, cfg.pos_token_id] * args.regions
    ids = [[1, IMAGE_TOKEN_INDEX, *region_ids, *range(3, 3 + args.text_tokens)]] * args.batch
    input_ids, attn = pad_ids(ids, 0, "right")

    with torch.no_grad():
        features = model.vision_tower(images)
        image_embeds, _ = model.encode_images(images)
        mask_tokens, pos_tokens = model.encode_regions(features, masks)
        spliced = model.splice(input_ids, attn, None, image_embeds, mask_tokens, pos_tokens)
        parts = {
            "vision tower": lambda: model.vision_tower(images),
            "projector": lambda: model.model.mm_projector(
                model.vision_tower.image_tokens(features)
            ),
            "mask extractor": lambda: model.encode_regions(features, masks),
            "splice": lambda: model.splice(
                input_ids, attn, None, image_embeds, mask_tokens, pos_tokens
            ),
            "LLM (+ lm_head)": lambda: model.forward_embeds(spliced),
        }
        timings = {name: median_time(fn, args.repeats) for name, fn in parts.items()}
        whole = median_time(lambda: model(input_ids, attn, images, masks), args.repeats)

    total = sum(timings.values())
    print(
        f"tiny preset forward, batch {args.batch}, {args.regions} regions/sample, "
        f"{spliced.inputs_embeds.shape[1]} tokens/sample, {torch.get_num_threads()} threads"
    )
    print(f"{'part':<18}{'ms':>10}{'share':>9}")
    for name, seconds in timings.items():
        print(f"{name:<18}{seconds * 1e3:>10.2f}{seconds / total:>9.1%}")
    print(f"{'sum of parts':<18}{total * 1e3:>10.2f}")
    print(f"{'whole forward':<18}{whole * 1e3:>10.2f}{whole / total:>9.2f}x of the sum")

    big = osprey.build_model("osprey-7b", device="meta")
    llm = sum(
        p.numel()
        for n, p in big.named_parameters()
        if not n.startswith(("model.vision_tower.", "model.mm_projector.", "mask_extractor."))
    )
    print("\nosprey-7b parameters (built on the meta device):")
    rows = {
        "LLM (Vicuna-7B)": llm,
        "vision tower": count(big.model.vision_tower),
        "projector": count(big.model.mm_projector),
        "mask extractor": count(big.mask_extractor),
        "total": count(big),
    }
    for name, n in rows.items():
        print(f"{name:<18}{n / 1e6:>12,.1f} M")


if __name__ == "__main__":
    main()
