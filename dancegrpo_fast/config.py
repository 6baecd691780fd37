"""Training configuration: small dataclasses, one per concern, loadable from YAML and the CLI.

    python -m dancegrpo_fast.train --preset flux --model_path /ckpt/FLUX.1-dev \\
        --prompt_file prompts.txt --rewards hps:1.0 --optim.lr 2e-5

Sections: model, sampler, grpo, rollout, optim, eval, runtime. Each field is set in YAML either
in its section (``optim: {lr: 2e-5}``) or by its flat name (``lr: 2e-5``, how configs were
written before sections; old ``config.yaml`` files in checkpoints load unchanged), and on the
command line as ``--optim.lr`` or ``--lr``.

Precedence: dataclass defaults < preset (``--preset NAME``) < YAML file (``--config FILE``) <
command-line flags. ``--help`` lists every field with the value that will apply.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .sde_window import SCHEDULES, last_start, window_fits, window_steps

PRESET_DIR = Path(__file__).parent / "presets"

FAMILIES = ("flux", "sd3", "sd", "hunyuan_video", "wan", "skyreels_i2v", "wan_i2v", "tiny")
SAMPLERS = ("dance", "flow_grpo", "ddim")
# diffusers' AttentionBackendName values (0.42), so that a config validates without importing
# diffusers; a name only a newer diffusers knows is looked up there (attention_backends()).
ATTENTION_BACKENDS = (
    "flash", "flash_hub", "flash_varlen", "flash_varlen_hub", "flash_4_hub", "_flash_3", "_flash_varlen_3",
    "_flash_3_hub", "_flash_3_varlen_hub", "aiter_fa2_hub", "flex", "native", "_native_cudnn", "_native_efficient",
    "_native_flash", "_native_math", "_native_npu", "_native_xla", "sage", "sage_hub", "sage_blackwell_hub",
    "sage_varlen", "_sage_qk_int8_pv_fp8_cuda", "_sage_qk_int8_pv_fp8_cuda_sm90", "_sage_qk_int8_pv_fp16_cuda",
    "_sage_qk_int8_pv_fp16_triton", "xformers")


def attention_backends(name: str = "") -> Tuple[str, ...]:
    """The accepted attention_backend values: auto and diffusers' backend names. Imports
    diffusers' dispatcher only for a name outside the built-in list."""
    names = ("auto",) + ATTENTION_BACKENDS
    if name and name not in names:
        try:
            from diffusers.models.attention_dispatch import AttentionBackendName
        except ImportError:
            return names
        names += tuple(b.value for b in AttentionBackendName if b.value not in names)
    return names

KL_CONVENTIONS = ("exact", "flow_grpo")
ADVANTAGES = ("group", "global", "ddpo")
# advantage ddpo (the DDPO baseline): DDPO's own settings where they carry over to our samplers,
# applied to the settings the command line / YAML file does not give (parse_config). Independent
# initial noise per sample, every trainable step trained, its clip ranges. Not carried over: its
# learning rate (tuned for SD 1.5; a comparison at the run's own rate isolates the algorithm) and
# its DDIM eta 1 (the sd14 preset already uses it; a flow SDE's eta is another quantity).
DDPO_DEFAULTS: Dict[str, Any] = {"sampler.shared_noise": False, "grpo.timestep_fraction": 1.0,
                                 "grpo.clip_range": 1e-4, "grpo.adv_clip_max": 5.0}
SDE_WINDOW_SCHEDULES = SCHEDULES
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


def _f(default, help: str, flat: Optional[str] = None, path: bool = False):
    """A config field. flat: its flat name when it differs from the field name (the CLI alias and
    the key of pre-section YAML files); path: a file path, resolved against the preset's folder
    when a shipped preset gives it relative."""
    meta = {"help": help, "flat": flat, "path": path}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RewardSpec:
    """One reward: its name (in metrics and advantages), its weight in the combined advantage,
    its constructor keyword arguments (e.g. a local model path), and the registered reward to
    build when that is not the name itself (one reward twice with different settings)."""

    name: str
    weight: float = 1.0
    kwargs: Dict[str, Any] = field(default_factory=dict)
    type: str = ""


@dataclass
class ModelConfig:
    family: str = _f("flux", f"policy adapter: one of {FAMILIES}", flat="model_family")
    path: str = _f("", "local diffusers-layout folder (model_index.json, transformer/unet, vae, text encoders, tokenizers, scheduler); for tiny, empty = the shipped weights", flat="model_path")
    dtype: str = _f("float32", "dtype of the frozen parts (VAE, text encoders, and the base weights under LoRA): float32, bfloat16 or float16", flat="model_dtype")
    mixed_precision: str = _f("bf16", "bf16: bfloat16 autocast on CUDA (ignored on CPU); no: full precision")
    attention_backend: str = _f("auto", "attention backend of every attention layer of the model: auto (FlashAttention when installed on CUDA, FA3 on Hopper; else PyTorch SDPA), native (PyTorch SDPA), flash (flash-attn 2), _flash_3 (FA3), xformers, or another diffusers AttentionBackendName")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass")
    compile: bool = _f(False, "torch.compile the model's forward for rollout, training and evaluation (the first calls of each kind pay the compile time)")
    compile_mode: str = _f("default", "torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune, max-autotune-no-cudagraphs")
    compile_scope: str = _f("blocks", "blocks: compile each repeated transformer/UNet block (compiled once per block type; sharding stays between blocks under fsdp); model: the whole forward as one graph")
    compile_backend: str = _f("inductor", "torch.compile backend: inductor (generated kernels; on the CPU it needs a C++ compiler), or aot_eager / eager (graph capture without code generation, for debugging)")
    offload_text_encoders: bool = _f(False, "keep the text encoders on the CPU and move them to the GPU only to encode prompts not yet cached (saves e.g. HunyuanVideo's 16 GB Llama per GPU)")
    max_sequence_length: int = _f(256, "text encoder sequence length (T5/UMT5/Llama)")
    height: int = _f(720, "image/video height in pixels")
    width: int = _f(720, "image/video width in pixels")
    num_frames: int = _f(1, "video frames (HunyuanVideo, Wan); 1 for images")


@dataclass
class SamplerConfig:
    name: str = _f("dance", f"one of {SAMPLERS}; SD 1.x needs ddim, flows dance or flow_grpo", flat="sampler")
    num_steps: int = _f(16, "sampling steps S")
    shift: float = _f(3.0, "rectified-flow sigma shift")
    eta: float = _f(0.3, "SDE noise (dance, ddim) / noise_level (flow_grpo)")
    guidance_scale: float = _f(3.5, "FLUX/HunyuanVideo guidance embedding value")
    cfg_scale: float = _f(1.0, "classifier-free guidance (SD 1.x 5.0, Wan 5.0) in rollout and training; 1 disables")
    negative_prompt: str = _f("", "negative prompt used with classifier-free guidance")
    sde_window_start: int = _f(0, "first SDE step (MixGRPO-style window)")
    sde_window_size: int = _f(0, "SDE steps in the window; 0 = every step is SDE. Steps outside are ODE steps, not trained")
    sde_window_schedule: str = _f("fixed", f"how the SDE window moves over iterations (MixGRPO): one of {SDE_WINDOW_SCHEDULES}; fixed = stays at sde_window_start")
    sde_window_stride: int = _f(1, "steps the sliding window moves toward low noise each time it moves")
    sde_window_every: int = _f(25, "iterations between window moves (progressive); the first, longest interval of decay and exp_decay")
    sde_window_every_min: int = _f(1, "decay: the interval at the last window position (it shrinks linearly from sde_window_every)")
    sde_window_roll_back: bool = _f(True, "a sliding window that passes the last trainable step goes back to sde_window_start; false: it stays at the end")
    ode_order: int = _f(1, "order of the deterministic steps outside the SDE window: 1 (Euler / DDIM) or 2 (DPM-Solver++(2M) multistep)")
    ode_steps_fraction: float = _f(1.0, "fraction of the steps kept in each ODE stretch before and after the SDE window (fewer, larger steps; MixGRPO-Flash uses 0.4 after it); 1 = every step")
    shared_noise: bool = _f(True, "the G samples of a prompt start from the same x_T")

    def sde_steps(self, iteration: int = 0) -> List[int]:
        """Indices of the SDE (stochastic, trainable) steps among 0..num_steps-1 at `iteration`
        (the window slides when sde_window_schedule is not fixed: dancegrpo_fast.sde_window)."""
        return window_steps(iteration, self.num_steps, self.sde_window_start, self.sde_window_size,
                            stride=self.sde_window_stride, every=self.sde_window_every,
                            every_min=self.sde_window_every_min, schedule=self.sde_window_schedule,
                            roll_back=self.sde_window_roll_back)

    def trainable_steps(self, iteration: int = 0) -> List[int]:
        """SDE steps minus the last transition (SPEC 2)."""
        return [i for i in self.sde_steps(iteration) if i < self.num_steps - 1]

    @property
    def window_slides(self) -> bool:
        return self.sde_window_schedule != "fixed" and self.sde_window_size > 0


@dataclass
class GRPOConfig:
    group_size: int = _f(12, "G samples per prompt")
    timestep_fraction: float = _f(0.6, "fraction of the S-1 trainable steps trained per sample")
    clip_range: float = _f(1e-4, "PPO ratio clip epsilon")
    adv_clip_max: float = _f(5.0, "advantage clamp")
    advantage: str = _f("group", f"one of {ADVANTAGES}: group (per prompt group), global (all ranks' rewards), ddpo (the DDPO baseline: per-prompt running statistics; also applies DDPO's defaults to the settings not given, see docs/training.md)")
    ddpo_buffer_size: int = _f(16, "advantage ddpo: rewards kept per prompt (the newest) for its statistics")
    ddpo_min_count: int = _f(16, "advantage ddpo: a prompt with fewer rewards in its buffer is normalised by the whole batch's mean and std instead")
    kl_beta: float = _f(0.0, "KL weight to the reference policy (base model / LoRA disabled); 0 = off")
    kl_convention: str = _f("exact", "the KL term weighted by kl_beta: exact (the KL between the two step Gaussians) or flow_grpo (that KL times the step's |dsigma|, Flow-GRPO's kl_loss, so its beta values carry over; rectified flows only)")
    bestofn: int = _f(0, "train only k samples of each group, the k/2 with the highest and the k/2 with the lowest advantage (the reference's HunyuanVideo run keeps 8 of 24); k even, 2..group_size; 0 = every sample")
    max_skipped_group_fraction: float = _f(1.0, "stop the run with an error when at least this fraction of an iteration's groups (over all ranks) has a NaN/inf reward; fewer are skipped and counted. 1.0 = only when every group is unusable")


@dataclass
class RolloutConfig:
    prompt_file: str = _f("", "text file, one prompt per line (blank lines ignored); or a .jsonl file, one {prompt, image} object per line (image-to-video)", path=True)
    prompts_per_rank: int = _f(1, "prompts per rank per iteration")
    batch_size: int = _f(4, "samples per forward pass in rollout", flat="rollout_batch_size")
    rewards: List[RewardSpec] = _f(list, "rewards as name:weight,name:weight (kwargs via YAML)")
    reward_modules: List[str] = _f(list, "Python modules imported before the rewards are built; each registers its rewards with dancegrpo_fast.rewards.register_reward (how a task of your own brings its reward)")
    reward_overlap: bool = _f(True, "score each rollout batch in a background thread while the next one samples")


@dataclass
class OptimConfig:
    lr: float = _f(1e-5, "AdamW learning rate")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient-norm clip; 0 disables")
    lr_scheduler: str = _f("constant", "constant, constant_with_warmup, linear, cosine")
    lr_warmup_steps: int = _f(0, "warm-up optimizer steps")
    batch_size: int = _f(1, "samples per forward pass in training", flat="train_batch_size")
    gradient_accumulation_steps: int = _f(12, "training batches per optimizer step (per rank)")
    use_lora: bool = _f(False, "train a LoRA adapter (peft) instead of the full model")
    lora_rank: int = _f(32, "LoRA rank")
    lora_alpha: float = _f(32.0, "LoRA alpha")
    lora_target_modules: List[str] = _f(lambda: ["to_q", "to_k", "to_v", "to_out.0"], "module names the LoRA adapts")
    ema_decay: float = _f(0.0, "EMA of the trainable weights (e.g. 0.995); 0 = off")


@dataclass
class EvalConfig:
    prompt_file: str = _f("", "held-out prompts for evaluation, one per line (or .jsonl, as prompt_file); empty = no evaluation", flat="eval_prompt_file", path=True)
    every: int = _f(0, "evaluate on the held-out prompts every K iterations, before the first and after the last; 0 = never", flat="eval_every")
    num_prompts: int = _f(0, "evaluate on the first N held-out prompts; 0 = all", flat="eval_num_prompts")
    samples_per_prompt: int = _f(1, "samples per held-out prompt at each evaluation", flat="eval_samples_per_prompt")
    seed: int = _f(0, "seed of the evaluation noise: the same prompts and noise at every evaluation, so the curve compares models, not noise", flat="eval_seed")
    use_ema: bool = _f(False, "evaluate the EMA weights (needs ema_decay > 0): swapped in for the evaluation, the trained weights restored after it", flat="eval_ema")
    sde_steps: str = _f("rollout", "steps the evaluation samples with the SDE: rollout (the rollout's window at the first iteration; first-order ODE steps elsewhere) or all (every step, DanceGRPO's sampler: the same evaluation whatever the window settings)", flat="eval_sde_steps")


@dataclass
class RuntimeConfig:
    num_iterations: int = _f(300, "iterations (rollout + update) to run")
    seed: int = _f(42, "base seed of prompts order, noise and timestep subsets")
    output_dir: str = _f("outputs/run", "checkpoints, metrics.jsonl, sample grids")
    parallel: str = _f("ddp", "ddp or fsdp (FSDP2 fully_shard) under torchrun")
    checkpoint_every: int = _f(10, "write a checkpoint every K iterations (and at exit)")
    keep_checkpoints: int = _f(2, "checkpoints kept on disk (newest)")
    export: bool = _f(True, "when the run has done all its iterations, export the last checkpoint to output_dir/export as diffusers folders (the EMA too, in export/ema, when ema_decay > 0)")
    overwrite: bool = _f(False, "a fresh run into an output_dir that holds an earlier run's files (metrics, checkpoints, pictures) first removes them; without it such a run stops")
    resume: str = _f("", "'latest' (newest in output_dir; a fresh start when there is none), a checkpoint folder, or empty")
    sample_every: int = _f(0, "save a sample grid every K iterations; 0 = never")
    tensorboard: bool = _f(True, "also log to TensorBoard when it is installed (the train extra installs it)")
    wandb: bool = _f(False, "also log to Weights & Biases (the wandb extra): scalars, sample and evaluation grids, the reward curve; WANDB_MODE=offline logs without an account")
    wandb_project: str = _f("dancegrpo_fast", "wandb project")
    wandb_run_name: str = _f("", "wandb run name; empty = the output folder's name")
    progress_bar: bool = _f(True, "show a tqdm progress bar (rank 0)")
    threads: int = _f(0, "torch intra-op threads, set when the trainer starts (tiny runs are fastest on 1); 0 = leave torch's default")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    # --- derived -----------------------------------------------------------------------------
    @property
    def samples_per_rank(self) -> int:
        return self.rollout.prompts_per_rank * self.grpo.group_size

    def trained_timesteps(self) -> int:
        """T: timesteps trained per sample, int(trainable steps * timestep_fraction) (SPEC 2)."""
        return int(len(self.sampler.trainable_steps()) * self.grpo.timestep_fraction)

    @property
    def trained_samples_per_rank(self) -> int:
        """The samples the update trains: all of them, or bestofn of each group."""
        return self.rollout.prompts_per_rank * (self.grpo.bestofn or self.grpo.group_size)

    @property
    def optimizer_steps_per_iteration(self) -> int:
        return self.trained_samples_per_rank // self.optim.batch_size // self.optim.gradient_accumulation_steps

    # --- checks ------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the field (by its flat name, the CLI flag) for any inconsistent
        setting."""
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)

        m, sa, g, r, o, e, rt = self.model, self.sampler, self.grpo, self.rollout, self.optim, self.eval, self.runtime
        need(m.family in FAMILIES, f"model_family must be one of {FAMILIES}, got {m.family!r}")
        need(sa.name in SAMPLERS, f"sampler must be one of {SAMPLERS}, got {sa.name!r}")
        if m.family == "sd":
            need(sa.name == "ddim", f"model_family 'sd' (SD 1.x, epsilon prediction) needs sampler 'ddim', got {sa.name!r}")
        else:
            need(sa.name != "ddim", f"sampler 'ddim' is for model_family 'sd'; {m.family} is a rectified flow: use dance or flow_grpo")
        need(isinstance(g.group_size, int) and g.group_size >= 2,
             f"group_size must be an integer >= 2 (GRPO compares samples of one prompt), got {g.group_size!r}")
        for section, name in ((r, "prompts_per_rank"), (r, "batch_size"), (o, "batch_size"),
                              (o, "gradient_accumulation_steps"), (sa, "num_steps"), (rt, "num_iterations"),
                              (m, "height"), (m, "width"), (m, "num_frames")):
            value = getattr(section, name)
            need(isinstance(value, int) and value >= 1,
                 f"{flat_name(section, name)} must be an integer >= 1, got {value!r}")
        n = self.samples_per_rank
        need(n % r.batch_size == 0,
             f"rollout_batch_size={r.batch_size} must divide the {n} samples per rank (prompts_per_rank * group_size)")
        need(isinstance(g.bestofn, int) and not isinstance(g.bestofn, bool)
             and (g.bestofn == 0 or (g.bestofn >= 2 and g.bestofn % 2 == 0 and g.bestofn <= g.group_size)),
             f"bestofn must be 0 (train every sample) or an even number of samples kept per group in "
             f"[2, group_size={g.group_size}], got {g.bestofn!r}")
        # With bestofn the update trains only the kept samples: the micro-batches and gradient
        # accumulation are counted over those.
        trained = self.trained_samples_per_rank
        what = "samples per rank (prompts_per_rank * group_size)" if not g.bestofn else \
            "trained samples per rank (prompts_per_rank * bestofn)"
        need(trained % o.batch_size == 0,
             f"train_batch_size={o.batch_size} must divide the {trained} {what}")
        batches = trained // o.batch_size
        need(batches % o.gradient_accumulation_steps == 0,
             f"gradient_accumulation_steps={o.gradient_accumulation_steps} must divide the {batches} training batches per rank "
             f"({trained} {'trained ' if g.bestofn else ''}samples / train_batch_size {o.batch_size})")
        need(0 < g.timestep_fraction <= 1, f"timestep_fraction must lie in (0, 1], got {g.timestep_fraction!r}")
        need(window_fits(sa.num_steps, sa.sde_window_start, sa.sde_window_size),
             f"the SDE window [{sa.sde_window_start}, {sa.sde_window_start + sa.sde_window_size}) must lie in [0, num_steps={sa.num_steps}]: "
             f"lower sde_window_start, or set sde_window_size 0 (every step SDE)")
        need(sa.sde_window_schedule in SDE_WINDOW_SCHEDULES,
             f"sde_window_schedule must be one of {SDE_WINDOW_SCHEDULES}, got {sa.sde_window_schedule!r}")
        for name in ("sde_window_stride", "sde_window_every", "sde_window_every_min"):
            value = getattr(sa, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{name} must be an integer >= 1, got {value!r}")
        if sa.sde_window_schedule != "fixed":
            need(sa.sde_window_size >= 1,
                 f"sde_window_schedule={sa.sde_window_schedule!r} slides a window: set sde_window_size >= 1 (0 = every step is SDE)")
            need(sa.sde_window_start <= last_start(sa.num_steps, sa.sde_window_size),
                 f"a sliding SDE window [{sa.sde_window_start}, {sa.sde_window_start + sa.sde_window_size}) must lie among the "
                 f"trainable steps [0, num_steps - 1 = {sa.num_steps - 1}): lower sde_window_start or sde_window_size")
        need(sa.sde_window_every_min <= sa.sde_window_every,
             f"sde_window_every_min={sa.sde_window_every_min} must be <= sde_window_every={sa.sde_window_every}")
        need(sa.ode_order in (1, 2), f"ode_order must be 1 or 2, got {sa.ode_order!r}")
        need(isinstance(sa.ode_steps_fraction, (int, float)) and 0 < sa.ode_steps_fraction <= 1,
             f"ode_steps_fraction must lie in (0, 1], got {sa.ode_steps_fraction!r}")
        need(self.trained_timesteps() >= 1,
             f"no timestep would be trained: {len(sa.trainable_steps())} trainable SDE steps (the last transition is dropped) "
             f"x timestep_fraction {g.timestep_fraction} < 1; raise num_steps, the SDE window or timestep_fraction")
        need(g.advantage in ADVANTAGES, f"advantage must be one of {ADVANTAGES}, got {g.advantage!r}")
        need(isinstance(g.ddpo_buffer_size, int) and g.ddpo_buffer_size >= 1,
             f"ddpo_buffer_size must be an integer >= 1, got {g.ddpo_buffer_size!r}")
        need(isinstance(g.ddpo_min_count, int) and 1 <= g.ddpo_min_count <= g.ddpo_buffer_size,
             f"ddpo_min_count must be an integer in [1, ddpo_buffer_size={g.ddpo_buffer_size}] (a buffer never holds "
             f"more than ddpo_buffer_size rewards), got {g.ddpo_min_count!r}")
        need(rt.parallel in ("ddp", "fsdp"), f"parallel must be 'ddp' or 'fsdp', got {rt.parallel!r}")
        need(m.mixed_precision in ("bf16", "no"), f"mixed_precision must be 'bf16' or 'no', got {m.mixed_precision!r}")
        need(m.dtype in ("float32", "bfloat16", "float16"), f"model_dtype must be float32, bfloat16 or float16, got {m.dtype!r}")
        backends = attention_backends(m.attention_backend)
        need(m.attention_backend in backends,
             f"attention_backend must be auto or one of diffusers' attention backends ({', '.join(backends[1:])}), "
             f"got {m.attention_backend!r}")
        need(m.compile_mode in COMPILE_MODES, f"compile_mode must be one of {COMPILE_MODES}, got {m.compile_mode!r}")
        need(m.compile_scope in ("blocks", "model"), f"compile_scope must be 'blocks' or 'model', got {m.compile_scope!r}")
        need(m.compile_backend in COMPILE_BACKENDS, f"compile_backend must be one of {COMPILE_BACKENDS}, got {m.compile_backend!r}")
        need(m.compile_mode == "default" or m.compile_backend == "inductor",
             f"compile_mode {m.compile_mode!r} is an Inductor mode: it needs compile_backend 'inductor', got {m.compile_backend!r}")
        need(o.lr_scheduler in ("constant", "constant_with_warmup", "linear", "cosine"),
             f"lr_scheduler must be constant, constant_with_warmup, linear or cosine, got {o.lr_scheduler!r}")
        need(o.lr > 0 and math.isfinite(o.lr), f"lr must be > 0, got {o.lr!r}")
        need(sa.eta >= 0, f"eta must be >= 0, got {sa.eta!r}")
        need(g.kl_beta >= 0, f"kl_beta must be >= 0, got {g.kl_beta!r}")
        need(g.kl_convention in KL_CONVENTIONS, f"kl_convention must be one of {KL_CONVENTIONS}, got {g.kl_convention!r}")
        need(g.kl_convention != "flow_grpo" or sa.name != "ddim",
             "kl_convention 'flow_grpo' scales the KL by a rectified flow's |dsigma|; sampler 'ddim' has none: use 'exact'")
        need(0 < g.max_skipped_group_fraction <= 1,
             f"max_skipped_group_fraction must lie in (0, 1] (the fraction of an iteration's groups with NaN/inf "
             f"rewards that stops the run), got {g.max_skipped_group_fraction!r}")
        need(0 <= o.ema_decay < 1, f"ema_decay must lie in [0, 1), got {o.ema_decay!r}")
        need(rt.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {rt.checkpoint_every!r}")
        need(not e.use_ema or o.ema_decay > 0,
             f"eval_ema evaluates the EMA weights, which need ema_decay > 0 (e.g. 0.995), got ema_decay={o.ema_decay!r}")
        for section, name in ((e, "every"), (e, "num_prompts"), (rt, "threads")):
            value = getattr(section, name)
            need(isinstance(value, int) and value >= 0,
                 f"{flat_name(section, name)} must be an integer >= 0, got {value!r}")
        need(isinstance(e.samples_per_prompt, int) and e.samples_per_prompt >= 1,
             f"eval_samples_per_prompt must be an integer >= 1, got {e.samples_per_prompt!r}")
        need(isinstance(e.seed, int), f"eval_seed must be an integer, got {e.seed!r}")
        need(e.sde_steps in ("rollout", "all"), f"eval_sde_steps must be 'rollout' or 'all', got {e.sde_steps!r}")
        for spec in r.rewards:
            need(isinstance(spec, RewardSpec) and spec.name, f"each reward needs a name, got {spec!r}")
            need(math.isfinite(spec.weight), f"reward {spec.name!r} has a non-finite weight {spec.weight!r}")
        # Scores, weights and advantages are keyed by name: a repeated name would silently keep
        # only one of them.
        names = [spec.name for spec in r.rewards]
        repeated = sorted({n for n in names if names.count(n) > 1})
        need(not repeated, f"rewards: each name may appear once, {repeated} appear more than once "
                           "(combine them into one weight, or register the variant under its own name)")
        return self

    # --- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """{section: {field: value}}, plain data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any], base: Optional["TrainConfig"] = None,
                  relative_to: Optional[Path] = None) -> "TrainConfig":
        """A config with `values` applied over `base` (or the defaults). Keys: a section name
        with a mapping, "section.field", or a flat name (module docstring); unknown keys are
        errors. relative_to: the folder that relative file paths in `values` are resolved
        against (a shipped preset's folder); None keeps them as given."""
        config = copy_config(base) if base is not None else cls()
        for key, value in _flatten(values):
            section, f = _lookup(key)
            value = _coerce(f, value)
            if f.metadata.get("path") and value and relative_to is not None and not Path(value).is_absolute():
                value = str((relative_to / value).resolve())
            setattr(getattr(config, section), f.name, value)
        return config


SECTIONS: Dict[str, type] = {f.name: f.default_factory for f in fields(TrainConfig)}


def copy_config(config: TrainConfig) -> TrainConfig:
    """A copy whose sections (and lists) can be changed without touching `config`."""
    return TrainConfig(**{name: dataclasses.replace(getattr(config, name)) for name in SECTIONS})


def flat_name(section_or_config, name: str) -> str:
    """The flat name (CLI alias) of a section's field, e.g. EvalConfig.every -> eval_every."""
    f = {f.name: f for f in fields(section_or_config)}[name]
    return f.metadata.get("flat") or f.name


def _field_table() -> Dict[str, Tuple[str, dataclasses.Field]]:
    """{"section.field" and flat name: (section, Field)}."""
    table = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            table[f"{section}.{f.name}"] = (section, f)
            table[f.metadata.get("flat") or f.name] = (section, f)
    return table


FIELDS = _field_table()


def _lookup(key: str) -> Tuple[str, dataclasses.Field]:
    if key not in FIELDS:
        close = difflib.get_close_matches(key, list(FIELDS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown config key {key!r}; {hint}known keys: the sections {sorted(SECTIONS)} with their "
                         f"fields (python -m dancegrpo_fast.train --help lists them)")
    return FIELDS[key]


def _flatten(values: Dict[str, Any]):
    """(key, value) pairs: a section given as a mapping becomes "section.field" keys. "sampler"
    is both a section and the flat name of the sampler's name: a mapping is the section."""
    for key, value in values.items():
        if key in SECTIONS and key != "sampler" and not isinstance(value, dict):
            raise ValueError(f"config section {key!r} must be a mapping of field: value, got {value!r}")
        if key in SECTIONS and isinstance(value, dict):
            for sub, sub_value in value.items():
                yield f"{key}.{sub}", sub_value
        else:
            yield key, value


def parse_rewards(value) -> List[RewardSpec]:
    """'name:weight,name' or a YAML list of {name, weight, kwargs} -> [RewardSpec]."""
    if isinstance(value, str):
        specs = []
        for item in filter(None, (part.strip() for part in value.split(","))):
            name, _, weight = item.partition(":")
            try:
                specs.append(RewardSpec(name.strip(), float(weight) if weight else 1.0))
            except ValueError:
                raise ValueError(f"rewards: the weight of {name.strip()!r} must be a number, got {weight!r}") from None
        return specs
    specs = []
    for item in value or []:
        if isinstance(item, RewardSpec):
            specs.append(item)
        elif isinstance(item, str):
            specs.extend(parse_rewards(item))
        elif isinstance(item, dict):
            unknown = sorted(set(item) - {"name", "weight", "kwargs", "type"})
            if "name" not in item or unknown:
                raise ValueError(f"rewards: each entry needs a name and may have weight, kwargs and type; got {item!r}")
            try:
                weight = float(item.get("weight", 1.0))
            except (TypeError, ValueError):
                raise ValueError(f"rewards: the weight of {item['name']!r} must be a number, "
                                 f"got {item.get('weight')!r}") from None
            if not isinstance(item.get("kwargs") or {}, dict):
                raise ValueError(f"rewards: the kwargs of {item['name']!r} must be a mapping, got {item['kwargs']!r}")
            specs.append(RewardSpec(item["name"], weight, dict(item.get("kwargs") or {}), str(item.get("type") or "")))
        else:
            raise ValueError(f"a reward must be 'name:weight' or {{name, weight, kwargs, type}}, got {item!r}")
    return specs


def _parse_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {value!r}")


def _coerce(f: dataclasses.Field, value):
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    name = f.metadata.get("flat") or f.name
    if f.name == "rewards":
        return parse_rewards(value)
    if kind == "List[str]":
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
    try:
        if kind == "bool":
            return _parse_bool(value)
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "str":
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        raise ValueError(f"config field {name!r} expects {kind}, got {value!r}") from None
    return value


# ----------------------------------------------------------------------------------------------
# Presets, YAML files and the command line
# ----------------------------------------------------------------------------------------------


def available_presets() -> List[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _load_yaml(path) -> Dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of field: value")
    return data


def load_preset(name: str) -> Dict[str, Any]:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; available: {available_presets()}")
    return _load_yaml(path)


def apply_preset(name: str, base: Optional[TrainConfig] = None) -> TrainConfig:
    """`base` (or the defaults) with the shipped preset applied; its relative file paths (a
    task's prompt lists) point into the package."""
    return TrainConfig.from_dict(load_preset(name), base, relative_to=PRESET_DIR)


def _shown(value) -> str:
    if isinstance(value, list):
        if value and isinstance(value[0], RewardSpec):
            return ",".join(f"{r.name}:{r.weight:g}" for r in value)
        return ",".join(map(str, value)) or "(none)"
    return repr(value) if value == "" else str(value)


_METAVARS = {"int": "INT", "float": "FLOAT", "str": "STR", "bool": "BOOL", "List[str]": "A,B,...",
             "List[RewardSpec]": "NAME:W,..."}


def build_parser(shown: Optional[TrainConfig] = None, shown_from: str = "defaults",
                 add_help: bool = True) -> argparse.ArgumentParser:
    """The CLI: every field as --section.field and its flat name. `shown`: the config whose
    values --help prints (the defaults, or the preset / YAML the command names)."""
    parser = argparse.ArgumentParser(
        prog="python -m dancegrpo_fast.train", allow_abbrev=False, add_help=add_help,
        usage="%(prog)s [--preset NAME] [--config FILE.yaml] [--FIELD VALUE | --SECTION.FIELD VALUE ...]",
        description="DanceGRPO training. Precedence: defaults < --preset < --config < flags. With no "
                    "--preset, --config, --model_family or --model_path: the built-in tiny task "
                    f"(--preset tiny), which trains on a CPU in minutes. Values shown: {shown_from}.")
    parser.add_argument("--config", default=None, help="YAML file of field: value (or section: {field: value})")
    parser.add_argument("--preset", default=None, help=f"one of {available_presets()}")
    shown = shown or TrainConfig()
    for section in SECTIONS:
        group = parser.add_argument_group(f"{section} (YAML section '{section}:')")
        values = getattr(shown, section)
        for f in fields(values):
            flat = f.metadata.get("flat") or f.name
            # argparse.SUPPRESS: a flag not given does not override the preset / YAML value.
            group.add_argument(f"--{flat}", f"--{section}.{f.name}", dest=f"{section}.{f.name}",
                               default=argparse.SUPPRESS, metavar=_METAVARS.get(str(f.type), "VALUE"),
                               help=f"{f.metadata['help']} (value: {_shown(getattr(values, f.name))})")
    return parser


def _is_tiny_folder(path: str) -> bool:
    """A weights folder written by TinyFlowPipeline.save_pretrained (model_index.json says so)."""
    index = Path(path) / "model_index.json"
    try:
        return json.loads(index.read_text()).get("_class_name") == "TinyFlowPipeline"
    except (OSError, ValueError, AttributeError):
        return False


def _base_config(preset: Optional[str], config_file: Optional[str], flags: Dict[str, Any]) -> Tuple[TrainConfig, str]:
    """defaults < preset < YAML file, and what that is (for --help)."""
    given = set(flags)
    if not preset and not config_file and not given & {"model.family"} and (
            "model.path" not in given or _is_tiny_folder(flags["model.path"])):
        # No model named at all, or only a tiny-model folder (pretrain_tiny's output or a
        # snapshot of it): the built-in tiny task that trains on a CPU.
        preset = "tiny"
    config, source = TrainConfig(), ["defaults"]
    if preset:
        config = apply_preset(preset, config)
        source.append(f"preset {preset}")
    if config_file:
        config = TrainConfig.from_dict(_load_yaml(config_file), config)
        source.append(f"config {config_file}")
    return config, " < ".join(source)


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """defaults < --preset < --config < command-line flags; validated."""
    # First pass without --help: which preset / YAML / model the command names.
    args, _ = build_parser(add_help=False).parse_known_args(argv)
    values = vars(args)
    preset, config_file = values.pop("preset"), values.pop("config")
    base, source = _base_config(preset, config_file, values)
    # Parsed again with the values that apply, so that --help shows them.
    values = vars(build_parser(base, source).parse_args(argv))
    values.pop("preset")
    values.pop("config")
    config = TrainConfig.from_dict(values, base)
    return apply_advantage_defaults(config, given_keys(argv)).validate()


def apply_advantage_defaults(config: TrainConfig, given: Sequence[str] = ()) -> TrainConfig:
    """advantage ddpo: DDPO_DEFAULTS for each setting not in `given` ("section.field" keys the
    user set: command-line flags, --config file keys). They override the preset's values, not the
    user's. Other advantages: the config unchanged."""
    if config.grpo.advantage != "ddpo":
        return config
    for key, value in DDPO_DEFAULTS.items():
        if key not in given:
            section, name = key.split(".")
            setattr(getattr(config, section), name, value)
    return config


def given_keys(argv: Sequence[str]) -> List[str]:
    """The config keys ("section.field") a command line sets: its flags and the keys of its
    --config file (not its preset)."""
    values = vars(build_parser(add_help=False).parse_known_args(list(argv))[0])
    config_file = values.pop("config")
    values.pop("preset")
    keys = [f"{FIELDS[key][0]}.{FIELDS[key][1].name}" for key, _ in _flatten(_load_yaml(config_file))] if config_file else []
    return list(dict.fromkeys(keys + list(values)))


def resumed_config(saved: Dict[str, Any], parsed: TrainConfig, argv: Sequence[str],
                   checkpoint) -> Tuple[TrainConfig, str]:
    """A resumed run: its saved configuration (`saved`: (plain data, iteration) of the checkpoint)
    with only the settings this command line gives taken from `parsed`. Returns the config and
    what to tell the user: which settings changed, or, when the run has already done all of its
    iterations, "nothing to do: ..." with how to extend it."""
    data, iteration = saved
    config = TrainConfig.from_dict(data)
    changed = []
    for key in given_keys(argv):
        section, name = key.split(".")
        old, new = getattr(getattr(config, section), name), getattr(getattr(parsed, section), name)
        setattr(getattr(config, section), name, new)
        if old != new and key != "runtime.resume":
            changed.append(f"{flat_name(getattr(config, section), name)} {_shown(old)} -> {_shown(new)}")
    config.validate()
    total = config.runtime.num_iterations
    if iteration >= total:
        return config, (f"nothing to do: the run in {config.runtime.output_dir} has done all of its {total} "
                        f"iterations (checkpoint {checkpoint}); to train further, resume with "
                        f"--num_iterations {total + max(total // 2, 1)} (or more)")
    what = "; changed on the command line: " + ", ".join(changed) if changed else " (nothing changed on the command line)"
    return config, f"resuming {checkpoint} at iteration {iteration} of {total} with the run's saved settings{what}"


def config_to_yaml(config: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(config.to_dict())), sort_keys=False)
