"""LoRA against full fine-tuning (stage 3's trainable parts): step time, peak memory and
trainable parameters, side by side on one device.

    python bench/finetune.py                                   # tiny preset on the CPU
    python bench/finetune.py --preset osprey-7b --device cuda  # 7B-shaped, random weights, bf16

Each method runs in its own process (so its peak memory is its own): the model with random
weights, the method's trainable parts (full: projector, mask extractor, LLM; LoRA: adapters of
--rank on every LLM projection plus projector and mask extractor), AdamW, and --steps
forward/backward/optimizer steps on a synthetic batch of --batch sequences of --length tokens
with one image and two regions each (gradient checkpointing on, as stage 3). Printed: median
step time, peak memory (CUDA max allocated; CPU peak RSS), trainable parameters, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_method(args: argparse.Namespace) -> dict:
    import resource

    import torch

    import osprey
    from osprey.constants import IMAGE_TOKEN_INDEX
    from osprey.model.adapter import LoraConfig, add_lora
    from osprey.train.freeze import apply_trainable

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = osprey.build_model(args.preset, device=device, dtype=dtype)
    parts = ["projector", "mask_extractor"]
    if args.method == "lora":
        add_lora(model, LoraConfig(rank=args.rank, dropout=0.0))
    else:
        parts.append("llm")
    counts = apply_trainable(model, parts)
    model.gradient_checkpointing_enable()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    cfg = model.config
    size = cfg.vision.image_size
    text = args.length - cfg.vision.num_image_tokens
    if text < 8:
        raise ValueError(f"--length {args.length} leaves no room beside the image tokens")
    ids = torch.randint(3, 1000, (args.batch, text), device=device)
    ids[:, 1] = IMAGE_TOKEN_INDEX
    ids[:, 3], ids[:, 4] = cfg.mask_token_id, cfg.pos_token_id
    ids[:, 6], ids[:, 7] = cfg.mask_token_id, cfg.pos_token_id
    labels = ids.clone()
    images = torch.randn(args.batch, 3, size, size, device=device, dtype=dtype)
    masks = [(torch.rand(2, size, size, device=device) > 0.5).to(torch.uint8)] * args.batch
    times = []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = model(ids, images=images, masks=masks, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    times = sorted(times[1:] or times)  # the first step pays for allocation
    return {
        "method": args.method,
        "step_s": times[len(times) // 2],
        "peak_gib": peak,
        "trainable": counts["trainable"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=None, help="tokens (default: image + 64)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--method", choices=("full", "lora"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_method(args)))
        return
    import osprey

    if args.length is None:
        args.length = osprey.get_config(args.preset).vision.num_image_tokens + 64
    results = {}
    for method in ("full", "lora"):
        command = [sys.executable, __file__, "--method", method, "--preset", args.preset,
                   "--device", args.device, "--rank", str(args.rank), "--batch", str(args.batch),
                   "--length", str(args.length), "--steps", str(args.steps)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[method] = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"{args.preset} on {args.device}, batch {args.batch} x {args.length} tokens, rank {args.rank}"
    )
    print(f"{'method':<6} {'step s':>9} {'peak GiB':>9} {'trainable':>14}")
    for r in results.values():
        print(f"{r['method']:<6} {r['step_s']:>9.3f} {r['peak_gib']:>9.2f} {r['trainable']:>14,}")
    full, lora = results["full"], results["lora"]
    print(
        f"LoRA / full: step time {lora['step_s'] / full['step_s']:.2f}x, peak memory "
        f"{lora['peak_gib'] / full['peak_gib']:.2f}x, trainable {lora['trainable'] / full['trainable']:.3f}x"
    )


if __name__ == "__main__":
    main()
