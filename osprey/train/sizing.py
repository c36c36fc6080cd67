"""`--dry-run`: size a stage for a cluster before launching it.

The model is built on the meta device (nothing allocated), the stage's parts are marked
trainable as training would, and the plan reports parameter counts, the batch arithmetic, the
steps per epoch for the data given, and the per-GPU memory under ZeRO-2 and ZeRO-3:

- model states: DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs`,
  `estimate_zero3_model_states_mem_needs`, no offload) for the trainable parameters, plus the
  frozen ones held in bf16 (whole on every GPU under ZeRO-2, partitioned under ZeRO-3);
- activations of one micro-batch at the stage's max_length, bf16, per LLaMA decoder layer
  (what autograd keeps; attention by SDPA, so no seq x seq scores):
  RMSNorm inputs and outputs 4sh, q/k/v 3sh, attention output 1sh, o_proj input 1sh
  (9 sh values) and gate, up, SiLU(gate), their product (4 si values), times 2 bytes;
  with gradient checkpointing only each layer's input (1 sh) is kept, plus one layer's full
  set while it is recomputed; plus fp32 logits and their gradient (2 x 4 s V bytes);
- a fixed allowance for the CUDA context and allocator (CUDA_OVERHEAD_GIB).

Frozen parts run under no_grad and keep nothing for backward. A plan is an estimate to decide
on a cluster shape, not a promise: the verdict keeps 10% of the GPU free for fragmentation.
The model knows nothing of this: a finetune plan (LoRA) passes its own meta model.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from osprey.train.config import StageConfig

GIB = 2**30
CUDA_OVERHEAD_GIB = 1.5
USABLE_FRACTION = 0.9  # of GPU memory a plan may fill
BF16 = 2


@dataclass(kw_only=True)
class ClusterShape:
    """The GPUs a stage would run on."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError("--nodes and --gpus-per-node must be >= 1")
        if self.gpu_memory_gib <= 0:
            raise ValueError("--gpu-memory must be > 0 (GiB per GPU)")

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(kw_only=True)
class MemoryPlan:
    """Per-GPU bytes of one ZeRO stage."""

    zero_stage: int
    model_states: int
    activations: int  # with the stage's gradient-checkpointing setting
    activations_checkpointed: int
    activations_full: int

    @property
    def total(self) -> int:
        return self.model_states + self.activations + int(CUDA_OVERHEAD_GIB * GIB)


@dataclass(kw_only=True)
class StagePlan:
    stage: str
    model: str
    cluster: ClusterShape
    trainable: int
    frozen: int
    global_batch: int
    micro_batch: int
    accumulation: int | None
    rows: int | None
    steps_per_epoch: int | None
    planned_steps: int | None
    max_length: int
    gradient_checkpointing: bool
    zero_stage: int
    memory: dict[int, MemoryPlan]
    problems: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def verdict(self) -> str:
        return "fits" if self.fits else "does not fit"

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage, "model": self.model, "nodes": self.cluster.nodes,
            "gpus_per_node": self.cluster.gpus_per_node,
            "gpu_memory_gib": self.cluster.gpu_memory_gib, "trainable": self.trainable,
            "frozen": self.frozen, "global_batch": self.global_batch,
            "micro_batch": self.micro_batch, "accumulation": self.accumulation,
            "rows": self.rows, "steps_per_epoch": self.steps_per_epoch,
            "planned_steps": self.planned_steps, "verdict": self.verdict,
            "memory_gib": {
                f"zero{z}": round(m.total / GIB, 2) for z, m in sorted(self.memory.items())
            },
            "problems": self.problems, "advice": self.advice,
        }  # fmt: skip

    def report(self) -> str:
        c = self.cluster
        lines = [
            f"{self.stage} ({self.model}) on {c.nodes} node(s) x {c.gpus_per_node} GPU(s) of "
            f"{c.gpu_memory_gib:g} GiB",
            f"  parameters: {self.trainable:,} trainable, {self.frozen:,} frozen "
            f"({self.trainable + self.frozen:,} in all)",
            f"  batch: global {self.global_batch} = micro {self.micro_batch} x {c.gpus} GPUs x "
            f"{self.accumulation if self.accumulation is not None else '?'} accumulation",
        ]
        if self.rows is None:
            lines.append("  steps: unknown (no data found; give --rows N)")
        else:
            lines.append(
                f"  steps: {self.steps_per_epoch} per epoch over {self.rows:,} rows, "
                f"{self.planned_steps} planned"
            )
        checkpointing = "on" if self.gradient_checkpointing else "off"
        lines.append(
            f"  per-GPU memory at max_length {self.max_length} (gradient checkpointing "
            f"{checkpointing}; GiB):"
        )
        for zero, m in sorted(self.memory.items()):
            mark = " <- this stage" if zero == self.zero_stage else ""
            lines.append(
                f"    ZeRO-{zero}: model states {m.model_states / GIB:6.1f} + activations "
                f"{m.activations / GIB:5.1f} (checkpointed {m.activations_checkpointed / GIB:.1f}"
                f", full {m.activations_full / GIB:.1f}) + {CUDA_OVERHEAD_GIB:g} CUDA = "
                f"{m.total / GIB:6.1f}{mark}"
            )
        lines.append(f"  verdict: {self.verdict}")
        lines += [f"    - {p}" for p in self.problems]
        lines += [f"    try: {a}" for a in self.advice]
        return "\n".join(lines)


# ---- the figures -----------------------------------------------------------------------


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters()) - trainable


def largest_layer(model: nn.Module) -> int:
    """Trainable parameters of the largest module (its own, not its children's): what ZeRO-3
    gathers at once."""
    return max(
        (
            sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad)
            for m in model.modules()
        ),
        default=0,
    )


def model_state_bytes(
    trainable: int, frozen: int, largest: int, zero_stage: int, cluster: ClusterShape
) -> int:
    """DeepSpeed's estimate for the trainable parameters plus the frozen ones in bf16."""
    if zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            trainable, largest, num_gpus_per_node=cluster.gpus_per_node,
            num_nodes=cluster.nodes, cpu_offload=False, cpu_offload_params=False,
        )  # fmt: skip
        return gpu + BF16 * frozen // cluster.gpus
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    _, gpu = estimate_zero2_model_states_mem_needs(
        trainable, num_gpus_per_node=cluster.gpus_per_node, num_nodes=cluster.nodes,
        cpu_offload=False,
    )  # fmt: skip
    return gpu + BF16 * frozen


def activation_bytes(
    hidden: int,
    intermediate: int,
    layers: int,
    vocab: int,
    seq: int,
    micro_batch: int,
    checkpointing: bool,
) -> int:
    """One micro-batch's activations kept for backward (see the module docstring)."""
    tokens = seq * micro_batch
    per_layer = BF16 * tokens * (9 * hidden + 4 * intermediate)
    if checkpointing:
        kept = BF16 * tokens * hidden * layers + per_layer
    else:
        kept = per_layer * layers
    logits = 2 * 4 * tokens * vocab
    return kept + logits


def plan_stage(
    stage: StageConfig,
    cluster: ClusterShape,
    *,
    model: nn.Module | None = None,
    rows: int | None = None,
    llm_trains: bool | None = None,
) -> StagePlan:
    """The dry-run plan of `stage` on `cluster`. `model` (meta, with requires_grad set as it
    will train) defaults to the stage's model with `stage.trains` unfrozen; `llm_trains`
    (default: the LLM has trainable parameters) says whether backward runs through the LLM
    (with LoRA it does, though its own weights are frozen)."""
    if model is None:
        model = stage_model(stage)
    config = model.config
    llm = config.llm
    trainable, frozen = count_parameters(model)
    largest = largest_layer(model)
    if llm_trains is None:
        llm_trains = any(p.requires_grad for p in model.model.layers.parameters())
    # Backward runs through the LLM whenever anything before or in it trains: every stage here.
    through_llm = llm_trains or trainable > 0
    world = cluster.gpus
    problems: list[str] = []
    try:
        accumulation = stage.accumulation_steps(world)
    except ValueError as exc:
        accumulation = None
        problems.append(str(exc))

    def acts(checkpointing: bool) -> int:
        if not through_llm:
            return 0
        return activation_bytes(
            llm.hidden_size, llm.intermediate_size, llm.num_hidden_layers, llm.vocab_size,
            stage.max_length, stage.micro_batch_size, checkpointing,
        )  # fmt: skip

    memory = {}
    for zero in (2, 3):
        full, ckpt = acts(False), acts(True)
        memory[zero] = MemoryPlan(
            zero_stage=zero,
            model_states=model_state_bytes(trainable, frozen, largest, zero, cluster),
            activations=ckpt if stage.gradient_checkpointing else full,
            activations_checkpointed=ckpt,
            activations_full=full,
        )
    budget = cluster.gpu_memory_gib * GIB * USABLE_FRACTION
    chosen = memory[3 if stage.zero_stage == 3 else 2]
    if chosen.total > budget:
        problems.append(
            f"ZeRO-{chosen.zero_stage} needs {chosen.total / GIB:.1f} GiB per GPU, more than "
            f"{USABLE_FRACTION:.0%} of {cluster.gpu_memory_gib:g} GiB"
        )
    steps_per_epoch = total = None
    if rows is not None and accumulation is not None:
        per_worker = rows // world
        steps_per_epoch = math.ceil(per_worker / stage.micro_batch_size) // accumulation
        total = steps_per_epoch * stage.epochs
        if stage.max_steps is not None:
            total = min(total, stage.max_steps)
        if steps_per_epoch < 1:
            problems.append(
                f"{rows} rows give no full optimizer step at global batch "
                f"{stage.global_batch_size} on {world} GPUs"
            )
    plan = StagePlan(
        stage=stage.name, model=config.name, cluster=cluster, trainable=trainable,
        frozen=frozen, global_batch=stage.global_batch_size,
        micro_batch=stage.micro_batch_size, accumulation=accumulation, rows=rows,
        steps_per_epoch=steps_per_epoch, planned_steps=total, max_length=stage.max_length,
        gradient_checkpointing=stage.gradient_checkpointing, zero_stage=stage.zero_stage,
        memory=memory, problems=problems,
    )  # fmt: skip
    if not plan.fits:
        plan.advice = _advice(plan, budget)
    return plan


def _advice(plan: StagePlan, budget: float) -> list[str]:
    """Changes that would make the plan fit, cheapest first."""
    advice = []
    c = plan.cluster
    if plan.accumulation is None:
        per_step = plan.micro_batch * c.gpus
        advice.append(
            f"a global batch that is a multiple of micro {plan.micro_batch} x {c.gpus} GPUs "
            f"(--set global_batch_size={per_step * max(1, plan.global_batch // per_step)}), "
            "or fewer GPUs"
        )
    for zero in (2, 3):
        m = plan.memory[zero]
        overhead = m.model_states + int(CUDA_OVERHEAD_GIB * GIB)
        if not plan.gradient_checkpointing and overhead + m.activations_checkpointed <= budget:
            if zero == plan.zero_stage:
                advice.append("--set gradient_checkpointing=true")
            else:
                advice.append(f"--set zero_stage={zero} --set gradient_checkpointing=true")
        elif zero != plan.zero_stage and m.total <= budget:
            advice.append(f"--set zero_stage={zero}")
    if not any("zero_stage" in a or "checkpointing" in a for a in advice):
        # ZeRO-3 shares the model states over every GPU: find how many would do.
        trainable_states = plan.memory[3].model_states
        for gpus in (c.gpus * k for k in (2, 4, 8, 16)):
            nodes = math.ceil(gpus / c.gpus_per_node)
            bigger = ClusterShape(
                nodes=nodes, gpus_per_node=c.gpus_per_node, gpu_memory_gib=c.gpu_memory_gib
            )
            scale = c.gpus / bigger.gpus
            need = trainable_states * scale + plan.memory[3].activations_checkpointed
            if need + CUDA_OVERHEAD_GIB * GIB <= budget:
                advice.append(
                    f"--set zero_stage=3 --set gradient_checkpointing=true on about "
                    f"{bigger.nodes} node(s) x {c.gpus_per_node} GPUs"
                )
                break
        else:
            advice.append("GPUs with more memory, or LoRA (osprey finetune) on this cluster")
    return advice


def stage_model(stage: StageConfig) -> nn.Module:
    """The stage's model on the meta device with its parts marked trainable, and its LoRA
    adapters when the stage has them (a QLoRA base is counted at bf16: an overestimate)."""
    from dataclasses import replace

    import osprey
    from osprey.train.freeze import apply_trainable

    model = osprey.build_model(stage_model_config(stage), device="meta")
    if stage.lora is not None:
        from osprey.model.adapter import add_lora

        add_lora(model, replace(stage.lora, quantize_4bit=False))
    apply_trainable(model, stage.trains)
    return model


def stage_model_config(stage: StageConfig):
    """`init`'s config when it is a local model directory already, else the preset's (a dry
    run reads no remote weights; a later stage's `init` may not exist yet)."""
    from pathlib import Path

    from osprey.model.checkpoint import read_config
    from osprey.model.config import get_config

    if stage.init and Path(stage.init, "config.json").exists():
        config = read_config(stage.init)
    else:
        config = get_config(stage.preset)
    config.vision.weights = config.llm.weights = config.projector_weights = None
    return config


def data_rows(stage: StageConfig) -> int | None:
    """Rows of the stage's data when every folder is there; None otherwise."""
    from pathlib import Path

    from osprey.data.pipeline import count_rows

    if not stage.data or not all(d.startswith("s3://") or Path(d).exists() for d in stage.data):
        return None
    return count_rows(list(stage.data), stage.tasks)


# ---- command line ------------------------------------------------------------------------


def add_dry_run_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dry run: size the stage for a cluster, train nothing")
    group.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    group.add_argument("--nodes", type=int, default=1)
    group.add_argument("--gpus-per-node", type=int, default=8)
    group.add_argument(
        "--gpu-memory", type=float, default=80.0, help="GiB per GPU (default %(default)s)"
    )
    group.add_argument("--rows", type=int, help="rows of data (default: counted from `data`)")


def cluster_from_args(args: argparse.Namespace) -> ClusterShape:
    return ClusterShape(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_memory_gib=args.gpu_memory
    )


def run_dry_run(stage: StageConfig, args: argparse.Namespace, model: nn.Module | None = None):
    """Print the plan; exit status 0 when it fits, 1 when it does not."""
    rows = args.rows if args.rows is not None else data_rows(stage)
    plan = plan_stage(stage, cluster_from_args(args), model=model, rows=rows)
    print(plan.report())
    return 0 if plan.fits else 1
