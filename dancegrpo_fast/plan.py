"""Will it fit, how long will it take: a projection of one training iteration per GPU, from a dry
run of the real model on the meta device (no GPU, no weights).

    python -m dancegrpo_fast.plan --preset flux --gpus 8 [--gpu h800|h100|h200|a100]
        [--parallel fsdp|ddp] [--lora] [--mfu 0.4] [--architecture NAME | --model_path DIR]
        [--json] [any trainer flag, e.g. --group_size 4 --train_batch_size 2]

The preset's settings are read with the trainer's own parser (config.parse_config); the model is
the preset family's published architecture (dancegrpo_fast/architectures/<name>: configs only),
or --model_path. dry_run.py builds it on the meta device through the policy's loading code and
measures one rollout step, one decode, one prompt encoding and one training step (forward and
backward through ops.fused_step_loss): FLOPs from torch.utils.flop_counter's formulas, bytes of
the tensors each step creates. From those:

- FLOPs per iteration and GPU: rollout = samples / rollout batch x steps x one rollout step
  (classifier-free guidance doubling measured in it); decode, text encoding (one new prompt per
  prompt per iteration: an upper bound, the cache makes repeats free); update = samples / train
  batch x trained timesteps x one training step (forward, backward, and recomputation under
  gradient checkpointing, all measured), plus the trainer's no-grad forward for the old
  log-probs of optimizer steps after the first, plus the reference forward when kl_beta > 0.
- seconds = FLOPs / (the card's dense bf16 peak x --mfu); a stated utilisation, not a measurement.
- memory per GPU: weights as stored (float32 master weights, or the bf16 base plus float32 LoRA),
  AdamW's two float32 moments and the float32 gradients of the trainable parameters (all three
  divided by N under FSDP2, which shards parameters but not buffers; DDP also keeps a bucket copy
  of the gradients), the frozen text encoders (unless offloaded) and VAE, the rollout buffers
  (latents (B, S+1, ...) and log-probs, float32), the FSDP2 working set (two transformer blocks and
  the root's parameters all-gathered in the compute dtype, and two blocks' gradients before their
  reduce-scatter), and the measured step peaks. The peak is the largest of four phases: encoding
  new prompts, a rollout step, decoding, a training step.

Errors are one line naming the argument (exit code 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .config import FIELDS, TrainConfig, parse_config
from .config import build_parser as trainer_parser
from .dry_run import DryRun
from .policies import ModelLoadError

ARCHITECTURES_DIR = Path(__file__).parent / "architectures"
# The architecture planned for each family unless --architecture or --model_path says otherwise.
DEFAULT_ARCHITECTURE = {"flux": "flux1_dev", "hunyuan_video": "hunyuan_video_t2v", "sd": "sd14",
                        "wan": "wan21_t2v_1_3b", "sd3": "sd35_medium", "skyreels_i2v": "skyreels_v1_hunyuan_i2v",
                        "tiny": None}
GIB = 2 ** 30
MIB = 2 ** 20


@dataclass(frozen=True)
class Gpu:
    name: str
    bf16_flops: float  # dense bf16 tensor-core peak, FLOP/s (no sparsity)
    memory_bytes: int  # total memory as nvidia-smi reports it

    @property
    def label(self) -> str:
        return self.name


# Dense BF16 tensor-core peaks from NVIDIA's data sheets: 989 TFLOPS for the H100 SXM, the H800 SXM
# (an H100 with less NVLink bandwidth) and the H200 (the same chip, more memory); 312 for the
# A100. Memory: nvidia-smi's total, 81,559 MiB on the 80 GB H100/H800 SXM, 81,920 MiB on the
# A100 80GB, 143,771 MiB on the H200 (benchmarks/results/gpu_h200/device.txt).
GPUS = {
    "h800": Gpu("H800 SXM 80GB", 989e12, 81559 * MIB),
    "h100": Gpu("H100 SXM 80GB", 989e12, 81559 * MIB),
    "h200": Gpu("H200 141GB", 989e12, 143771 * MIB),
    "a100": Gpu("A100 SXM 80GB", 312e12, 81920 * MIB),
}


class PlanError(ValueError):
    """A plan argument that is wrong; the message names it."""


def setting(config: TrainConfig, name: str):
    """A setting by its flat name (the trainer's flag): "train_batch_size" is config.optim.batch_size."""
    section, field = FIELDS[name]
    return getattr(getattr(config, section), field.name)


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------


@dataclass
class MemoryPlan:
    """Bytes per GPU. held: what stays allocated through the iteration, by holder; gradients:
    the trainable parameters' float32 gradients, during the update only; fsdp_working_set: the
    all-gathered blocks (and their unsharded gradients) of FSDP2, during forwards and backwards;
    phases: peak of each phase; activations: bytes one training micro-batch keeps for its
    backward, with / without gradient checkpointing (measured)."""

    held: Dict[str, int]
    gradients: int
    fsdp_working_set: int
    phases: Dict[str, int]
    activations: Dict[bool, int]
    capacity: int

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def fits(self) -> bool:
        return self.peak <= self.capacity


def sharded(config, gpus: int) -> bool:
    """FSDP2 shards only under torchrun with more than one process (distributed.wrap_model)."""
    return config.runtime.parallel == "fsdp" and gpus > 1


def forward_param_dtype(config, gpus: int) -> Optional[torch.dtype]:
    """The dtype the trainable model's parameters have in its forward when it is not how they are
    stored: FSDP2 with bf16 mixed precision all-gathers bf16 copies (distributed.wrap_model)."""
    return torch.bfloat16 if sharded(config, gpus) and config.model.mixed_precision == "bf16" else None


def memory_plan(dry, run, config, gpus: int, gpu: Gpu) -> MemoryPlan:
    shards = gpus if sharded(config, gpus) else 1
    trainable = run.model.trainable
    fp32 = 4
    text = sum(dry.frozen[name].bytes for name in dry.text_encoders)
    others = sum(size.bytes for name, size in dry.frozen.items() if name not in dry.text_encoders)
    samples = config.samples_per_rank
    steps = config.sampler.num_steps
    latent = math.prod(dry.latent_shape)
    held = {
        "weights": math.ceil((run.model.bytes - run.model.buffer_bytes) / shards) + run.model.buffer_bytes,
        "optimizer": math.ceil(2 * trainable * fp32 / shards),
        "gradient buckets (DDP)": trainable * fp32 if shards == 1 and gpus > 1 else 0,
        "EMA": math.ceil(trainable * fp32 / shards) if config.optim.ema_decay > 0 else 0,
        # model_setup.TrainingSetup: a frozen float32 copy of the model for the KL, made before wrapping
        # (never sharded).
        "reference model (KL)": (run.model.parameters * fp32 if config.grpo.kl_beta > 0 and not config.optim.use_lora
                                 else 0),
        "text encoders": 0 if config.model.offload_text_encoders else text,
        "VAE and other frozen parts": others,
        "rollout buffers": samples * (steps + 1) * latent * fp32 + samples * steps * fp32
                           + samples * config.trained_timesteps() * fp32,
    }
    gradients = math.ceil(trainable * fp32 / shards)
    forward_set = backward_set = 0
    if shards > 1:
        compute = 2 if forward_param_dtype(config, gpus) is not None else fp32
        blocks = dry.block_parameters()
        largest = max(blocks) if blocks else run.model.parameters
        root = run.model.parameters - sum(blocks)
        forward_set = (2 * largest + root) * compute
        backward_set = forward_set + 2 * largest * compute
    base = sum(held.values())
    phases = {
        "encode": base + (text if config.model.offload_text_encoders else 0) + dry.encode.peak_bytes,
        "rollout": base + run.rollout_step.peak_bytes + forward_set,
        "decode": base + dry.decode(config.rollout.batch_size).peak_bytes,
        "update": base + gradients + run.train_steps[config.model.gradient_checkpointing].peak_bytes + backward_set,
    }
    return MemoryPlan(held=held, gradients=gradients, fsdp_working_set=backward_set, phases=phases,
                      activations={k: v.kept_bytes for k, v in run.train_steps.items()}, capacity=gpu.memory_bytes)


# ----------------------------------------------------------------------------------------------
# Time
# ----------------------------------------------------------------------------------------------


@dataclass
class TimePlan:
    """FLOPs per GPU per iteration by part, and seconds at `mfu` of the card's bf16 peak."""

    flops: Dict[str, int]
    rate: float  # FLOP/s assumed
    reference_flops: Dict[str, int]

    def seconds(self, part: Optional[str] = None, reference: bool = False) -> float:
        flops = self.reference_flops if reference else self.flops
        total = sum(flops.values()) if part is None else flops[part]
        return total / self.rate

    @property
    def rollout_seconds(self) -> float:
        return sum(self.flops[k] for k in ("rollout", "decode", "encode")) / self.rate

    @property
    def update_seconds(self) -> float:
        return self.flops["update"] / self.rate


def time_plan(dry, run, config, gpu: Gpu, mfu: float) -> TimePlan:
    samples = config.samples_per_rank
    rollout_calls = samples // config.rollout.batch_size
    trained_samples = config.trained_samples_per_rank  # all, or bestofn of each group
    micro_batches = trained_samples // config.optim.batch_size
    trained = config.trained_timesteps()
    train = run.train_steps[config.model.gradient_checkpointing]
    optimizer_steps = micro_batches // config.optim.gradient_accumulation_steps
    old_log_prob_passes = (optimizer_steps - 1) * config.optim.gradient_accumulation_steps * trained
    reference_passes = micro_batches * trained if config.grpo.kl_beta > 0 else 0
    common = {
        "rollout": rollout_calls * config.sampler.num_steps * run.rollout_step.flops,
        "decode": rollout_calls * dry.decode(config.rollout.batch_size).flops,
        "encode": config.rollout.prompts_per_rank * dry.encode.flops,
    }
    flops = dict(common, update=micro_batches * trained * train.flops
                 + (old_log_prob_passes + reference_passes) * train.flops_forward)
    # The reference code's loop: one sample per call, the rollout's log-probs as the old ones (no
    # extra pass), no KL. The measured FLOPs are per batch; per sample they are the same.
    reference = dict(common, update=trained_samples * trained * train.flops // config.optim.batch_size)
    return TimePlan(flops=flops, rate=gpu.bf16_flops * mfu, reference_flops=reference)


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------


@dataclass
class Plan:
    config: object
    model_path: str
    gpus: int
    gpu: Gpu
    mfu: float
    dry: object
    run: object
    memory: MemoryPlan
    time: TimePlan
    fixes: List[Dict]  # settings that would make it fit, when it does not

    @property
    def parallel_label(self) -> str:
        if self.gpus == 1:
            return "1 GPU"
        return "FSDP2" if sharded(self.config, self.gpus) else "DDP"

    def verdict(self) -> str:
        c, m = self.config, self.memory
        where = f"{self.gpus} x {self.gpu.name}"
        how = [self.parallel_label if self.gpus > 1 else "", "LoRA" if c.optim.use_lora else "",
               "gradient checkpointing" if c.model.gradient_checkpointing else ""]
        how = " and ".join(h for h in how if h)
        time = (f"~{self.time.seconds():.0f} s per iteration at {self.mfu:.0%} MFU "
                f"(rollout and decoding {self.time.rollout_seconds:.0f} s, update {self.time.update_seconds:.0f} s)")
        if m.fits:
            return (f"fits on {where}{' with ' + how if how else ''}: {m.peak / GIB:.1f} GiB/GPU peak "
                    f"({m.peak_phase}), {time}")
        line = (f"does not fit on {where}{' with ' + how if how else ''}: {m.peak / GIB:.1f} GiB/GPU at peak "
                f"({m.peak_phase}) > {m.capacity / GIB:.1f} GiB")
        if self.fixes:
            options = "; ".join(f"{f['setting']} ({f['peak_bytes'] / GIB:.1f} GiB)" for f in self.fixes)
            return f"{line}; fits with {options}"
        return (f"{line}; no setting tried makes it fit (LoRA, gradient checkpointing, offloaded text encoders, "
                f"batch 1, FSDP2 on up to 64 GPUs)")

    def to_dict(self) -> Dict:
        c, m, t = self.config, self.memory, self.time
        return {
            "preset_settings": {k: setting(c, k) for k in (
                "model_family", "height", "width", "num_frames", "num_steps", "group_size", "prompts_per_rank",
                "rollout_batch_size", "train_batch_size", "gradient_accumulation_steps", "timestep_fraction",
                "gradient_checkpointing", "use_lora", "lora_rank", "model_dtype", "mixed_precision", "parallel",
                "offload_text_encoders", "cfg_scale", "sde_window_start", "sde_window_size", "kl_beta")},
            "model_path": self.model_path,
            "trained_timesteps": c.trained_timesteps(),
            "samples_per_gpu": c.samples_per_rank,
            "gpus": self.gpus, "gpu": dataclasses.asdict(self.gpu), "mfu": self.mfu,
            "parallel": self.parallel_label,
            "latent_shape": list(self.dry.latent_shape),
            "parameters": {"trainable_model": dataclasses.asdict(self.run.model),
                           **{name: dataclasses.asdict(size) for name, size in self.dry.frozen.items()}},
            "flops_per_step": {
                "rollout_step": dataclasses.asdict(self.run.rollout_step),
                "decode": dataclasses.asdict(self.dry.decode(c.rollout.batch_size)),
                "encode_one_prompt": dataclasses.asdict(self.dry.encode),
                "train_step": {("checkpointing" if k else "no_checkpointing"): dataclasses.asdict(v)
                               for k, v in self.run.train_steps.items()},
            },
            "flops_per_iteration": t.flops,
            "seconds_per_iteration": {"rollout": t.rollout_seconds, "update": t.update_seconds, "total": t.seconds()},
            "reference_loop": {"flops_per_iteration": t.reference_flops, "seconds": t.seconds(reference=True)},
            "memory_bytes": {"held": m.held, "gradients_during_update": m.gradients,
                             "fsdp_working_set": m.fsdp_working_set, "phases": m.phases, "peak": m.peak,
                             "peak_phase": m.peak_phase,
                             "activations_checkpointing": m.activations.get(True),
                             "activations_no_checkpointing": m.activations.get(False),
                             "capacity": m.capacity, "fits": m.fits},
            "fixes": self.fixes,
            "verdict": self.verdict(),
        }


def _label_setting(changes: Dict, config, gpus: Optional[int]) -> str:
    """The command-line flags of `changes` that differ from config (and --gpus when it changes)."""
    flags = {"use_lora": "--lora", "gradient_checkpointing": "--gradient_checkpointing true",
             "offload_text_encoders": "--offload_text_encoders true", "parallel": "--parallel fsdp",
             "rollout_batch_size": "--rollout_batch_size 1", "train_batch_size": "--train_batch_size 1"}
    parts = [flags[k] for k, v in changes.items() if k in flags and setting(config, k) != v]
    if gpus is not None:
        parts.insert(0, f"--gpus {gpus}")
    return " ".join(parts)


def _candidates(config, gpus: int):
    """Settings to try when the configured run does not fit, as (changes, more GPUs or None): on
    the same GPUs, single changes first, then all of them, then LoRA; then more GPUs, fewest first."""
    singles = []
    if not config.model.gradient_checkpointing:
        singles.append({"gradient_checkpointing": True})
    if not config.model.offload_text_encoders:
        singles.append({"offload_text_encoders": True})
    if gpus > 1 and config.runtime.parallel == "ddp":
        singles.append({"parallel": "fsdp"})
    if config.rollout.batch_size > 1 or config.optim.batch_size > 1:
        singles.append({"rollout_batch_size": 1, "train_batch_size": 1})
    frugal = {"gradient_checkpointing": True, "offload_text_encoders": True, "parallel": "fsdp"}
    same = [dict(changes) for changes in singles]
    if len(singles) > 1:
        same.append(frugal)
    kinds = [{}] if config.optim.use_lora else [{}, {"use_lora": True}]
    if not config.optim.use_lora:
        same += [{"use_lora": True}, {"use_lora": True, **frugal}]
    more = [({**kind, **frugal}, n) for kind in kinds for n in (2, 4, 8, 16, 32, 64) if n > gpus]
    return [(changes, None) for changes in same], more


def find_fixes(dry, config, gpus: int, gpu: Gpu, limit: int = 2) -> List[Dict]:
    """Settings that make the run fit, each {"setting": flags, "gpus", "peak_bytes"}: up to
    `limit` that fit on the same GPUs; when none does, the fewest GPUs that fit (FSDP2, gradient
    checkpointing, offloaded text encoders), for the full fine-tune and, unless it is one, LoRA."""
    same, more = _candidates(config, gpus)

    def evaluate(changes, n):
        variant = TrainConfig.from_dict(changes, config)
        if "train_batch_size" in changes:  # the same optimizer steps per iteration
            o = config.optim
            variant.optim.gradient_accumulation_steps = o.gradient_accumulation_steps * o.batch_size
        run = dry.trainable(variant, forward_param_dtype(variant, n),
                            checkpointing=(variant.model.gradient_checkpointing,))
        return memory_plan(dry, run, variant, n, gpu)

    def effective(changes, n):
        """The changes that change something (FSDP2 needs more than one GPU)."""
        return {k: v for k, v in changes.items() if setting(config, k) != v and not (k == "parallel" and n == 1)}

    fixes, tried = [], set()
    for changes, _ in same:
        changes = effective(changes, gpus)
        label = _label_setting(changes, config, None)
        if not label or label in tried:
            continue
        tried.add(label)
        memory = evaluate(changes, gpus)
        if memory.fits:
            fixes.append({"setting": label, "gpus": gpus, "peak_bytes": memory.peak})
            if len(fixes) >= limit:
                return fixes
    if fixes:
        return fixes
    found = set()
    for changes, n in more:
        lora = changes.get("use_lora", False)
        if lora in found:
            continue
        memory = evaluate(changes, n)
        if memory.fits:
            found.add(lora)
            fixes.append({"setting": _label_setting(changes, config, n), "gpus": n, "peak_bytes": memory.peak})
    return fixes


def make_plan(config, gpus: int, gpu: Gpu, mfu: float, compare_checkpointing: bool = True) -> Plan:
    """Dry-run config's model and project one iteration on `gpus` x `gpu` (see the module docstring).
    compare_checkpointing: also measure the training step with gradient checkpointing the other way."""
    dry = DryRun(config)
    checkpointing = (True, False) if compare_checkpointing else (config.model.gradient_checkpointing,)
    if config.model.gradient_checkpointing not in checkpointing:
        checkpointing += (config.model.gradient_checkpointing,)
    run = dry.trainable(config, forward_param_dtype(config, gpus), checkpointing=checkpointing)
    memory = memory_plan(dry, run, config, gpus, gpu)
    fixes = [] if memory.fits else find_fixes(dry, config, gpus, gpu)
    return Plan(config=config, model_path=config.model.path, gpus=gpus, gpu=gpu, mfu=mfu, dry=dry, run=run,
                memory=memory, time=time_plan(dry, run, config, gpu, mfu), fixes=fixes)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _gib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / GIB:.1f}"


def _model_label(path: str) -> str:
    """A shipped architecture by its place in the package, any other folder as given."""
    folder = Path(path) if path else None
    if folder is not None and folder.resolve().parent == ARCHITECTURES_DIR.resolve():
        return f"dancegrpo_fast/architectures/{folder.name}"
    return path or "the shipped tiny weights"


def _settings_line(c, latent_shape) -> str:
    frames = f", {c.model.num_frames} frames" if c.model.num_frames > 1 else ""
    training = f"LoRA rank {c.optim.lora_rank}" if c.optim.use_lora else "full fine-tune"
    autocast = "bf16 autocast" if c.model.mixed_precision == "bf16" else "no autocast"
    cfg = f", CFG {c.sampler.cfg_scale:g}" if c.sampler.cfg_scale != 1.0 else ""
    return (f"per GPU: {c.samples_per_rank} samples ({c.rollout.prompts_per_rank} prompt(s) x "
            f"G {c.grpo.group_size}), "
            f"{c.model.height}x{c.model.width}{frames}, latents {tuple(latent_shape)}, {c.sampler.num_steps} steps "
            f"({len(c.sampler.sde_steps())} SDE), {c.trained_timesteps()} trained per sample; rollout batch "
            f"{c.rollout.batch_size}, train batch {c.optim.batch_size} x {c.optim.gradient_accumulation_steps} "
            f"accumulation; "
            f"{training}, {autocast}, gradient checkpointing {'on' if c.model.gradient_checkpointing else 'off'}{cfg}")


def format_table(plan: Plan) -> str:
    """The plan for people: parameters, compute, memory, the reference loop, the verdict."""
    c, m, t, run, dry = plan.config, plan.memory, plan.time, plan.run, plan.dry
    shards = plan.gpus if sharded(c, plan.gpus) else 1
    per = f" / {shards}" if shards > 1 else ""
    decode = dry.decode(c.rollout.batch_size)
    train = run.train_steps[c.model.gradient_checkpointing]

    def compute(label, part=None):
        flops = sum(t.flops.values()) if part is None else t.flops[part]
        return f"  {label:38s}{flops / 1e15:8.2f}   {t.seconds(part):8.1f}"

    def memory(label, value, note=""):
        return f"  {label:50s}{_gib(value):>8s}{note}"

    cfg = " (x2 CFG)" if c.sampler.cfg_scale != 1.0 else ""
    recompute = "+recompute" if c.model.gradient_checkpointing else ""
    lines = [
        f"PROJECTION (not a measurement) for {c.model.family} from {_model_label(plan.model_path)}, "
        f"on {plan.gpus} x {plan.gpu.name}, {plan.parallel_label}",
        _settings_line(c, dry.latent_shape),
        "",
        f"  {'parameters':30s}{'total':>10s}   {'trainable':>10s}",
        f"  {'trainable model':30s}{_count(run.model.parameters):>10s}   {_count(run.model.trainable):>10s}",
        *(f"  {name:30s}{_count(size.parameters):>10s}" for name, size in dry.frozen.items()),
        "",
        f"  {'compute per GPU per iteration':38s}{'PFLOP':>8s}   seconds at {plan.mfu:.0%} of "
        f"{plan.gpu.bf16_flops / 1e12:.0f} TFLOPS",
        compute(f"rollout: {c.samples_per_rank} x {c.sampler.num_steps} forwards{cfg}", "rollout"),
        compute(f"decode: {c.samples_per_rank} samples", "decode"),
        compute(f"text encoding: {c.rollout.prompts_per_rank} prompt(s)", "encode"),
        compute(f"update: {c.trained_samples_per_rank} x {c.trained_timesteps()} x (fwd+bwd{recompute})", "update"),
        compute("iteration"),
        f"  one training step ({train.batch} sample(s)): forward {train.flops_forward / 1e12:.1f} TFLOP, backward "
        f"{train.flops_backward / 1e12:.1f} TFLOP; one rollout step ({run.rollout_step.batch}): "
        f"{run.rollout_step.flops / 1e12:.1f} TFLOP; one decode: {decode.flops / 1e12:.1f} TFLOP",
        "",
        f"  {'memory per GPU':50s}{'GiB':>8s}",
        memory(f"trainable weights{per}", m.held["weights"]),
        memory(f"AdamW moments (2 x fp32){per}", m.held["optimizer"]),
        memory(f"gradients (fp32){per}, update only", m.gradients),
    ]
    lines += [memory(key, m.held[key]) for key in ("gradient buckets (DDP)", "EMA", "reference model (KL)")
              if m.held[key]]
    if m.fsdp_working_set:
        lines.append(memory("FSDP2 all-gathered blocks, in use", m.fsdp_working_set))
    text_bytes = sum(dry.frozen[name].bytes for name in dry.text_encoders)
    if c.model.offload_text_encoders:
        lines.append(memory("text encoders (offloaded to CPU)", text_bytes, "  on GPU only to encode new prompts"))
    else:
        lines.append(memory("text encoders (on GPU)", m.held["text encoders"]))
    lines += [
        memory("VAE and other frozen parts", m.held["VAE and other frozen parts"]),
        memory("rollout buffers (latents, log-probs)", m.held["rollout buffers"]),
        memory("activations of one micro-batch, checkpointing on", m.activations.get(True)),
        memory("activations of one micro-batch, checkpointing off", m.activations.get(False)),
        f"  step peaks: rollout {_gib(run.rollout_step.peak_bytes)}, decode {_gib(decode.peak_bytes)}, "
        f"training {_gib(train.peak_bytes)}",
        "  peak by phase: " + ", ".join(f"{k} {_gib(v)}" for k, v in m.phases.items()),
        memory("peak / card", m.peak, f" / {m.capacity / GIB:.1f}  " + ("fits" if m.fits else "DOES NOT FIT")),
        "",
    ]
    if c.rollout.batch_size == 1 and c.optim.batch_size == 1 and t.reference_flops == t.flops:
        lines.append("reference loop shape (batch 1 everywhere): this run has it already; the same projection")
    else:
        same = t.reference_flops == t.flops
        work = ("the same FLOPs, so the same" if same
                else f"{sum(t.reference_flops.values()) / 1e15:.2f} PFLOP,")
        lines.append(f"reference loop shape (batch 1 everywhere, the rollout's log-probs as the old ones): {work} "
                     f"{t.seconds(reference=True):.0f} s at the same MFU; what differs is utilisation: batch-1 calls "
                     f"use a GPU less fully, which a FLOP count does not show")
    lines += ["", "verdict: " + plan.verdict()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def available_architectures() -> List[str]:
    return sorted(p.name for p in ARCHITECTURES_DIR.iterdir() if (p / "model_index.json").is_file())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dancegrpo_fast.plan", allow_abbrev=False,  # the rest go to the trainer's parser
        description="Project memory and time per iteration of a DanceGRPO run from a dry run of the real "
                    "architecture on the meta device. Other flags are the trainer's "
                    "(python -m dancegrpo_fast.train --help).")
    parser.add_argument("--preset", default="flux", help="a trainer preset (dancegrpo_fast/presets)")
    parser.add_argument("--config", default=None, help="a trainer YAML config, applied over the preset")
    parser.add_argument("--gpus", default="8", help="number of GPUs (torchrun processes)")
    parser.add_argument("--gpu", default="h800", help=f"one of {sorted(GPUS)}")
    parser.add_argument("--parallel", default=None, help="fsdp or ddp (default: the preset's)")
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter (the trainer's --use_lora true)")
    parser.add_argument("--mfu", default="0.4", help="assumed fraction of the card's dense bf16 peak, in (0, 1]")
    parser.add_argument("--architecture", default=None,
                        help=f"one of {available_architectures()} (default: the preset family's)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def _positive_int(value: str, name: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise PlanError(f"{name} must be an integer >= 1, got {value!r}") from None
    if number < 1:
        raise PlanError(f"{name} must be an integer >= 1, got {value!r}")
    return number


def parse_plan_args(argv: Optional[Sequence[str]] = None):
    """(config, gpus, gpu, mfu, as_json) from the command line; PlanError or ValueError naming the
    argument when one is wrong."""
    args, trainer_flags = build_parser().parse_known_args(argv)
    unknown = trainer_parser().parse_known_args(trainer_flags)[1]
    if unknown:
        raise PlanError(f"unknown argument(s) {unknown}: the planner's are --preset, --config, --gpus, --gpu, "
                        f"--parallel, --lora, --mfu, --architecture, --json; the rest are the trainer's "
                        f"(python -m dancegrpo_fast.train --help)")
    gpus = _positive_int(args.gpus, "--gpus")
    if args.gpu.lower() not in GPUS:
        raise PlanError(f"--gpu must be one of {sorted(GPUS)}, got {args.gpu!r}")
    try:
        mfu = float(args.mfu)
    except ValueError:
        raise PlanError(f"--mfu must be a number in (0, 1], got {args.mfu!r}") from None
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu must be a number in (0, 1], got {args.mfu!r}")
    if args.parallel is not None and args.parallel not in ("fsdp", "ddp"):
        raise PlanError(f"--parallel must be fsdp or ddp, got {args.parallel!r}")
    if args.architecture and any(flag.split("=")[0] in ("--model_path", "--model.path") for flag in trainer_flags):
        raise PlanError("--architecture and --model_path both name the model: give one")
    argv = ["--preset", args.preset] + (["--config", args.config] if args.config else []) + list(trainer_flags)
    if args.parallel:
        argv += ["--parallel", args.parallel]
    if args.lora:
        argv += ["--use_lora", "true"]
    config = parse_config(argv)
    if args.architecture is not None:
        if args.architecture not in available_architectures():
            raise PlanError(f"--architecture must be one of {available_architectures()}, got {args.architecture!r}")
        config.model.path = str(ARCHITECTURES_DIR / args.architecture)
    elif not config.model.path:
        default = DEFAULT_ARCHITECTURE.get(config.model.family)
        if default is not None:
            config.model.path = str(ARCHITECTURES_DIR / default)
    return config, gpus, GPUS[args.gpu.lower()], mfu, args.json


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        config, gpus, gpu, mfu, as_json = parse_plan_args(argv)
        plan = make_plan(config, gpus, gpu, mfu)
    except (PlanError, ValueError, FileNotFoundError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=2) if as_json else format_table(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
