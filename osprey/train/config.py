"""Typed configuration of one training stage, with presets and YAML files a user edits.

A stage says what it trains and freezes, which data it mixes, its optimisation schedule and
where it starts from. `osprey-7b` values are the paper's (OSPREY.md); `tiny` ones are sized for
the offline quickstart on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from osprey.model.adapter import LoraConfig

# Parts of the model a stage can train; the vision tower is always frozen.
PARTS = ("projector", "mask_extractor", "llm")
CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(kw_only=True)
class StageConfig:
    name: str  # "stage1", "stage2", "stage3"
    preset: str = "tiny"  # model preset, used when init is not a model directory
    trains: tuple[str, ...] = ()
    data: tuple[str, ...] = ()  # shard folders (local or s3://), mixed in one stream
    tasks: tuple[str, ...] = ()  # keep only rows of these task kinds (all when empty)
    # A model directory to start from (the previous stage's export); None = build `preset`
    # with the base weights below.
    init: str | None = None
    tokenizer: str | None = None  # tokenizer directory (default: init's, or the bases')
    vision_weights: str | None = None  # open_clip_pytorch_model.bin
    llm_weights: str | None = None  # Vicuna HF directory
    projector_weights: str | None = None  # stage-1 mm_projector.bin
    lr: float = 1e-3
    global_batch_size: int = 128
    micro_batch_size: int = 8
    epochs: int = 1
    max_steps: int | None = None  # cap on optimizer steps (None = epochs over the data)
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    # Positions per sample (image counted in full); longer samples lose trailing exchanges.
    # null: never truncate, as the reference (docs/fidelity.md).
    max_length: int | None = 2048
    # "vicuna_v1" (stages 2-3, and our stage 1 default) or "plain" (LLaVA-1.5's pretraining
    # format, which the released stage-1 projector was trained with).
    template: str = "vicuna_v1"
    # Clip the global gradient norm to this; 0 = no clipping (the reference's DeepSpeed config
    # sets none; DeepSpeed's own default is now 1.0, so it is always written out).
    gradient_clipping: float = 1.0
    # Rows each worker shuffles locally, reseeded every epoch (0: stream order). Rows are held
    # preprocessed (images as pixel tensors), so this costs memory per worker.
    shuffle_buffer: int = 0
    zero_stage: int = 2
    gradient_checkpointing: bool = False
    precision: str = "auto"  # "auto" = bf16 on GPU, fp32 on CPU
    checkpoint_every: int = 50  # optimizer steps between checkpoints
    log_every: int = 1
    seed: int = 0
    region_caps: dict[str, int] = field(default_factory=dict)  # per-source overrides
    # LoRA adapters on the LLM (None: no adapters). The LLM's own weights then stay frozen;
    # `trains` names the parts trained fully beside the adapters.
    lora: LoraConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            from osprey.model.adapter import LoraConfig

            self.lora = LoraConfig.from_dict(self.lora)
        self.trains = tuple(self.trains)
        self.data = tuple(self.data)
        self.tasks = tuple(self.tasks)
        unknown = set(self.trains) - set(PARTS)
        if unknown:
            raise ValueError(f"trains: unknown parts {sorted(unknown)}; choose from {PARTS}")
        if not self.trains and self.lora is None:
            raise ValueError("trains: a stage must train at least one part (or set lora)")
        if self.lora is not None and "llm" in self.trains:
            raise ValueError(
                "trains: with lora the LLM learns through its adapters and its own weights stay "
                "frozen; remove 'llm' (keep projector / mask_extractor to train them fully)"
            )
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0-3, got {self.zero_stage}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.global_batch_size < self.micro_batch_size:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} < micro_batch_size "
                f"{self.micro_batch_size}"
            )
        if self.shuffle_buffer < 0:
            raise ValueError(
                f"shuffle_buffer must be >= 0 (0: no shuffle), got {self.shuffle_buffer}"
            )
        if self.template not in ("vicuna_v1", "plain"):
            raise ValueError(f"template must be vicuna_v1 or plain, got {self.template!r}")
        if self.gradient_clipping < 0:
            raise ValueError(
                f"gradient_clipping must be >= 0 (0: no clipping), got {self.gradient_clipping}"
            )
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be >= 1 or null, got {self.max_length}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each worker to reach the global batch."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of "
                f"micro_batch_size {self.micro_batch_size} x {world_size} workers"
            )
        return self.global_batch_size // per_step

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["trains"], data["data"] = list(self.trains), list(self.data)
        data["tasks"] = list(self.tasks)
        data["lora"] = self.lora.to_dict() if self.lora is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown stage config keys: {sorted(unknown)}")
        return cls(**data)


def load_stage_config(
    path: str | Path, overrides: list[str] = (), output_dir: str | None = None
) -> StageConfig:
    """A YAML stage file (or a shipped one by name, e.g. "tiny/stage2") plus `key=value`
    overrides (values parsed as YAML: `lr=2e-5`, `data=[a,b]`, `lora.rank=16`). `{output_dir}`
    in string values is replaced by `output_dir`, so shipped files can name the previous stage's
    export."""
    path = Path(path)
    if not path.exists():
        shipped = CONFIG_DIR / f"{path}.yaml" if path.suffix == "" else CONFIG_DIR / path
        if not shipped.exists():
            raise FileNotFoundError(f"{path}: no such stage config (shipped: {shipped_configs()})")
        path = shipped
    data = yaml.safe_load(path.read_text()) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        section, dot, leaf = key.strip().partition(".")
        if dot:
            # One nested level: the `lora` block.
            data[section] = {**(data.get(section) or {}), leaf: yaml.safe_load(value)}
        else:
            data[section] = yaml.safe_load(value)
    if output_dir is not None:
        data = {k: _substitute(v, output_dir) for k, v in data.items()}
    return StageConfig.from_dict(data)


def _substitute(value: Any, output_dir: str) -> Any:
    if isinstance(value, str):
        return value.replace("{output_dir}", output_dir)
    if isinstance(value, list):
        return [_substitute(v, output_dir) for v in value]
    return value


def shipped_configs() -> list[str]:
    return sorted(
        str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml")
    )


@dataclass(kw_only=True)
class BasesConfig:
    """How long the tiny preset's stand-in bases pretrain (osprey.train.bases); the defaults
    reach >= 90% held-out accuracy in the quickstart."""

    vision_steps: int = 600
    llm_steps: int = 400  # on every task, after the reading phase
    llm_reading_steps: int = 800  # at most, on category questions alone (pretrain_llm)
    seed: int = 0
    # Vision tower and LLM side by side, in two processes (osprey.train.bases.prepare_bases).
    parallel: bool = True


def add_bases_arguments(parser: argparse.ArgumentParser) -> None:
    """The BasesConfig step counts as flags (`osprey demo`, jobs.pretrain_bases)."""
    defaults = BasesConfig()
    group = parser.add_argument_group("tiny bases pretraining")
    group.add_argument("--vision-steps", type=int, default=defaults.vision_steps)
    group.add_argument("--llm-steps", type=int, default=defaults.llm_steps)
    group.add_argument(
        "--llm-reading-steps",
        type=int,
        default=defaults.llm_reading_steps,
        help="most steps of the LLM's first phase, on category questions alone (0: none)",
    )
    group.add_argument(
        "--sequential-bases",
        action="store_true",
        help="pretrain the tower, then the LLM, in one process (default: side by side)",
    )


def bases_from_args(args: argparse.Namespace, seed: int = 0) -> BasesConfig:
    return BasesConfig(
        vision_steps=args.vision_steps,
        llm_steps=args.llm_steps,
        llm_reading_steps=args.llm_reading_steps,
        seed=seed,
        parallel=not args.sequential_bases,
    )
