"""Training configuration in one place: one dataclass, loadable from YAML, overridable on the CLI.

    python -m dancegrpo_fast.train --preset flux --model_path /ckpt/FLUX.1-dev \\
        --prompt_file prompts.txt --rewards hpsv2:1.0 --lr 2e-5

Precedence: dataclass defaults < preset (``--preset NAME``) < YAML file (``--config FILE``) <
command-line flags. ``--help`` lists every field with its default.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

PRESET_DIR = Path(__file__).parent / "presets"

FAMILIES = ("flux", "sd3", "sd", "hunyuan_video", "wan", "tiny")
SAMPLERS = ("dance", "flow_grpo", "ddim")


@dataclass
class RewardSpec:
    """One reward: its registry name, its weight in the combined advantage, its constructor
    keyword arguments (e.g. a local model path)."""

    name: str
    weight: float = 1.0
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    # --- model -------------------------------------------------------------------------------
    model_family: str = field(default="flux", metadata={"help": f"policy adapter: one of {FAMILIES}"})
    model_path: str = field(default="", metadata={"help": "local diffusers-layout folder (model_index.json, transformer/unet, vae, text encoders, tokenizers, scheduler); for tiny, empty = the shipped weights"})
    model_dtype: str = field(default="float32", metadata={"help": "dtype of the frozen parts (VAE, text encoders, and the base weights under LoRA): float32, bfloat16 or float16"})
    mixed_precision: str = field(default="bf16", metadata={"help": "bf16: bfloat16 autocast on CUDA (ignored on CPU); no: full precision"})
    attention_backend: str = field(default="native", metadata={"help": "diffusers attention backend: native (PyTorch SDPA), flash (flash-attn), xformers, ..."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward pass"})
    offload_text_encoders: bool = field(default=False, metadata={"help": "keep the text encoders on the CPU and move them to the GPU only to encode prompts not yet cached (saves e.g. HunyuanVideo's 16 GB Llama per GPU)"})
    max_sequence_length: int = field(default=256, metadata={"help": "text encoder sequence length (T5/UMT5/Llama)"})
    # --- data --------------------------------------------------------------------------------
    prompt_file: str = field(default="", metadata={"help": "text file, one prompt per line (blank lines ignored)"})
    output_dir: str = field(default="outputs/run", metadata={"help": "checkpoints, metrics.jsonl, sample grids"})
    seed: int = field(default=42, metadata={"help": "base seed of prompts order, noise and timestep subsets"})
    # --- resolution --------------------------------------------------------------------------
    height: int = field(default=720, metadata={"help": "image/video height in pixels"})
    width: int = field(default=720, metadata={"help": "image/video width in pixels"})
    num_frames: int = field(default=1, metadata={"help": "video frames (HunyuanVideo, Wan); 1 for images"})
    # --- sampler (SPEC 1) --------------------------------------------------------------------
    sampler: str = field(default="dance", metadata={"help": f"one of {SAMPLERS}; SD 1.x needs ddim, flows dance or flow_grpo"})
    num_steps: int = field(default=16, metadata={"help": "sampling steps S"})
    shift: float = field(default=3.0, metadata={"help": "rectified-flow sigma shift"})
    eta: float = field(default=0.3, metadata={"help": "SDE noise (dance, ddim) / noise_level (flow_grpo)"})
    guidance_scale: float = field(default=3.5, metadata={"help": "FLUX/HunyuanVideo guidance embedding value"})
    cfg_scale: float = field(default=1.0, metadata={"help": "classifier-free guidance (SD 1.x 5.0, Wan 5.0) in rollout and training; 1 disables"})
    negative_prompt: str = field(default="", metadata={"help": "negative prompt used with classifier-free guidance"})
    sde_window_start: int = field(default=0, metadata={"help": "first SDE step (MixGRPO-style window)"})
    sde_window_size: int = field(default=0, metadata={"help": "SDE steps in the window; 0 = every step is SDE. Steps outside are ODE steps, not trained"})
    shared_noise: bool = field(default=True, metadata={"help": "the G samples of a prompt start from the same x_T"})
    # --- GRPO (SPEC 2) -----------------------------------------------------------------------
    prompts_per_rank: int = field(default=1, metadata={"help": "prompts per rank per iteration"})
    group_size: int = field(default=12, metadata={"help": "G samples per prompt"})
    rollout_batch_size: int = field(default=4, metadata={"help": "samples per forward pass in rollout"})
    reward_overlap: bool = field(default=True, metadata={
        "help": "score each rollout batch in a background thread while the next one samples"})
    train_batch_size: int = field(default=1, metadata={"help": "samples per forward pass in training"})
    gradient_accumulation_steps: int = field(default=12, metadata={"help": "training batches per optimizer step (per rank)"})
    timestep_fraction: float = field(default=0.6, metadata={"help": "fraction of the S-1 trainable steps trained per sample"})
    clip_range: float = field(default=1e-4, metadata={"help": "PPO ratio clip epsilon"})
    adv_clip_max: float = field(default=5.0, metadata={"help": "advantage clamp"})
    advantage: str = field(default="group", metadata={"help": "group (per prompt) or global (all ranks' rewards)"})
    kl_beta: float = field(default=0.0, metadata={"help": "KL weight to the reference policy (base model / LoRA disabled); 0 = off"})
    rewards: List[RewardSpec] = field(default_factory=list, metadata={"help": "rewards as name:weight,name:weight (kwargs via YAML)"})
    max_skipped_group_fraction: float = field(default=1.0, metadata={"help": "stop the run with an error when at least this fraction of an iteration's groups (over all ranks) has a NaN/inf reward; fewer are skipped and counted. 1.0 = only when every group is unusable"})
    # --- optimisation ------------------------------------------------------------------------
    num_iterations: int = field(default=300, metadata={"help": "iterations (rollout + update) to run"})
    lr: float = field(default=1e-5, metadata={"help": "AdamW learning rate"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient-norm clip; 0 disables"})
    lr_scheduler: str = field(default="constant", metadata={"help": "constant, constant_with_warmup, linear, cosine"})
    lr_warmup_steps: int = field(default=0, metadata={"help": "warm-up optimizer steps"})
    use_lora: bool = field(default=False, metadata={"help": "train a LoRA adapter (peft) instead of the full model"})
    lora_rank: int = field(default=32, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha"})
    lora_target_modules: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], metadata={"help": "module names the LoRA adapts"})
    ema_decay: float = field(default=0.0, metadata={"help": "EMA of the trainable weights (e.g. 0.995); 0 = off"})
    # --- distributed -------------------------------------------------------------------------
    parallel: str = field(default="ddp", metadata={"help": "ddp or fsdp (FSDP2 fully_shard) under torchrun"})
    # --- checkpoints and logging -------------------------------------------------------------
    checkpoint_every: int = field(default=10, metadata={"help": "write a checkpoint every K iterations (and at exit)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept on disk (newest)"})
    overwrite: bool = field(default=False, metadata={"help": "a fresh run into an output_dir that holds an earlier run's files (metrics, checkpoints, pictures) first removes them; without it such a run stops"})
    resume: str = field(default="", metadata={"help": "'latest' (newest in output_dir; a fresh start when there is none), a checkpoint folder, or empty"})
    sample_every: int = field(default=0, metadata={"help": "save a sample grid every K iterations; 0 = never"})
    tensorboard: bool = field(default=True, metadata={"help": "also log to TensorBoard when it is installed"})
    progress_bar: bool = field(default=True, metadata={"help": "show a tqdm progress bar (rank 0)"})
    threads: int = field(default=0, metadata={"help": "torch intra-op threads, set when the trainer starts (tiny runs are fastest on 1); 0 = leave torch's default"})
    # --- held-out evaluation -----------------------------------------------------------------
    eval_prompt_file: str = field(default="", metadata={"help": "held-out prompts for evaluation, one per line; empty = for model_family tiny its shipped held-out list, for other families no evaluation"})
    eval_every: int = field(default=0, metadata={"help": "evaluate on the held-out prompts every K iterations, before the first and after the last; 0 = never"})
    eval_num_prompts: int = field(default=0, metadata={"help": "evaluate on the first N held-out prompts; 0 = all"})
    eval_samples_per_prompt: int = field(default=1, metadata={"help": "samples per held-out prompt at each evaluation"})
    eval_seed: int = field(default=0, metadata={"help": "seed of the evaluation noise: the same prompts and noise at every evaluation, so the curve compares models, not noise"})

    # ------------------------------------------------------------------------------------------
    @property
    def samples_per_rank(self) -> int:
        return self.prompts_per_rank * self.group_size

    def sde_steps(self) -> List[int]:
        """Indices of the SDE (stochastic, trainable) steps among 0..num_steps-1."""
        if self.sde_window_size == 0:
            return list(range(self.num_steps))
        return list(range(self.sde_window_start, self.sde_window_start + self.sde_window_size))

    def trainable_steps(self) -> List[int]:
        """SDE steps minus the last transition (SPEC 2)."""
        return [i for i in self.sde_steps() if i < self.num_steps - 1]

    def trained_timesteps(self) -> int:
        return int(len(self.trainable_steps()) * self.timestep_fraction)

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the field for any inconsistent setting."""
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)

        need(self.model_family in FAMILIES, f"model_family must be one of {FAMILIES}, got {self.model_family!r}")
        need(self.sampler in SAMPLERS, f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.model_family == "sd":
            need(self.sampler == "ddim", f"model_family 'sd' (SD 1.x, epsilon prediction) needs sampler 'ddim', got {self.sampler!r}")
        else:
            need(self.sampler != "ddim", f"sampler 'ddim' is for model_family 'sd'; {self.model_family} is a rectified flow: use dance or flow_grpo")
        need(isinstance(self.group_size, int) and self.group_size >= 2,
             f"group_size must be an integer >= 2 (GRPO compares samples of one prompt), got {self.group_size!r}")
        for name in ("prompts_per_rank", "rollout_batch_size", "train_batch_size", "gradient_accumulation_steps",
                     "num_steps", "num_iterations", "height", "width", "num_frames"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        n = self.samples_per_rank
        need(n % self.rollout_batch_size == 0,
             f"rollout_batch_size={self.rollout_batch_size} must divide the {n} samples per rank (prompts_per_rank * group_size)")
        need(n % self.train_batch_size == 0,
             f"train_batch_size={self.train_batch_size} must divide the {n} samples per rank (prompts_per_rank * group_size)")
        batches = n // self.train_batch_size
        need(batches % self.gradient_accumulation_steps == 0,
             f"gradient_accumulation_steps={self.gradient_accumulation_steps} must divide the {batches} training batches per rank "
             f"({n} samples / train_batch_size {self.train_batch_size})")
        need(0 < self.timestep_fraction <= 1, f"timestep_fraction must lie in (0, 1], got {self.timestep_fraction!r}")
        need(self.sde_window_start >= 0 and self.sde_window_size >= 0
             and self.sde_window_start + self.sde_window_size <= self.num_steps,
             f"the SDE window [{self.sde_window_start}, {self.sde_window_start + self.sde_window_size}) must lie in [0, num_steps={self.num_steps}]")
        need(self.trained_timesteps() >= 1,
             f"no timestep would be trained: {len(self.trainable_steps())} trainable SDE steps (the last transition is dropped) "
             f"x timestep_fraction {self.timestep_fraction} < 1; raise num_steps, the SDE window or timestep_fraction")
        need(self.advantage in ("group", "global"), f"advantage must be 'group' or 'global', got {self.advantage!r}")
        need(self.parallel in ("ddp", "fsdp"), f"parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        need(self.mixed_precision in ("bf16", "no"), f"mixed_precision must be 'bf16' or 'no', got {self.mixed_precision!r}")
        need(self.model_dtype in ("float32", "bfloat16", "float16"), f"model_dtype must be float32, bfloat16 or float16, got {self.model_dtype!r}")
        need(self.lr_scheduler in ("constant", "constant_with_warmup", "linear", "cosine"),
             f"lr_scheduler must be constant, constant_with_warmup, linear or cosine, got {self.lr_scheduler!r}")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be > 0, got {self.lr!r}")
        need(self.eta >= 0, f"eta must be >= 0, got {self.eta!r}")
        need(self.kl_beta >= 0, f"kl_beta must be >= 0, got {self.kl_beta!r}")
        need(0 < self.max_skipped_group_fraction <= 1,
             f"max_skipped_group_fraction must lie in (0, 1] (the fraction of an iteration's groups with NaN/inf "
             f"rewards that stops the run), got {self.max_skipped_group_fraction!r}")
        need(0 <= self.ema_decay < 1, f"ema_decay must lie in [0, 1), got {self.ema_decay!r}")
        need(self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every!r}")
        for name in ("eval_every", "eval_num_prompts", "threads"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0,
                 f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        need(isinstance(self.eval_samples_per_prompt, int) and self.eval_samples_per_prompt >= 1,
             f"eval_samples_per_prompt must be an integer >= 1, got {self.eval_samples_per_prompt!r}")
        need(isinstance(self.eval_seed, int), f"eval_seed must be an integer, got {self.eval_seed!r}")
        for spec in self.rewards:
            need(isinstance(spec, RewardSpec) and spec.name, f"each reward needs a name, got {spec!r}")
            need(math.isfinite(spec.weight), f"reward {spec.name!r} has a non-finite weight {spec.weight!r}")
        # Scores, weights and advantages are keyed by name: a repeated name would silently keep
        # only one of them.
        names = [spec.name for spec in self.rewards]
        repeated = sorted({n for n in names if names.count(n) > 1})
        need(not repeated, f"rewards: each name may appear once, {repeated} appear more than once "
                           "(combine them into one weight, or register the variant under its own name)")
        return self

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any], base: Optional["TrainConfig"] = None) -> "TrainConfig":
        """A config with `values` applied over `base` (or the defaults); unknown keys are errors."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        config = dataclasses.replace(base) if base is not None else cls()
        for key, value in values.items():
            setattr(config, key, _coerce(known[key], value))
        return config


def parse_rewards(value) -> List[RewardSpec]:
    """'name:weight,name' or a YAML list of {name, weight, kwargs} -> [RewardSpec]."""
    if isinstance(value, str):
        specs = []
        for item in filter(None, (part.strip() for part in value.split(","))):
            name, _, weight = item.partition(":")
            specs.append(RewardSpec(name.strip(), float(weight) if weight else 1.0))
        return specs
    specs = []
    for item in value or []:
        if isinstance(item, RewardSpec):
            specs.append(item)
        elif isinstance(item, str):
            specs.extend(parse_rewards(item))
        elif isinstance(item, dict):
            specs.append(RewardSpec(item["name"], float(item.get("weight", 1.0)), dict(item.get("kwargs", {}))))
        else:
            raise ValueError(f"a reward must be 'name:weight' or {{name, weight, kwargs}}, got {item!r}")
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
    if f.name == "rewards":
        return parse_rewards(value)
    if f.name == "lora_target_modules":
        return [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    try:
        if kind == "bool":
            return _parse_bool(value)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "str":
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"config field {f.name!r} expects {kind}, got {value!r}") from None
    return value


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dancegrpo_fast.train",
        description="DanceGRPO training. Precedence: defaults < --preset < --config < flags. With no "
                    "--preset, --config, --model_family or --model_path: the built-in tiny task "
                    "(--preset tiny), which trains on a CPU in minutes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file of field: value")
    parser.add_argument("--preset", default=None, help=f"one of {available_presets()}")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        default = getattr(defaults, f.name)
        if f.name == "rewards":
            shown = ",".join(f"{r.name}:{r.weight}" for r in default) or "(none)"
        elif isinstance(default, list):
            shown = ",".join(map(str, default))
        else:
            shown = default
        # argparse.SUPPRESS: a flag not given does not override the preset / YAML value.
        parser.add_argument(f"--{f.name}", dest=f.name, default=argparse.SUPPRESS,
                            help=f"{f.metadata.get('help', '')} (default: {shown})")
    return parser


def _is_tiny_folder(path: str) -> bool:
    """A weights folder written by TinyFlowPipeline.save_pretrained (model_index.json says so)."""
    index = Path(path) / "model_index.json"
    try:
        return json.loads(index.read_text()).get("_class_name") == "TinyFlowPipeline"
    except (OSError, ValueError, AttributeError):
        return False


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """defaults < --preset < --config < command-line flags; validated."""
    args = build_parser().parse_args(argv)
    values = vars(args)
    config = TrainConfig()
    preset = values.pop("preset")
    config_file = values.pop("config")
    if not preset and not config_file and "model_family" not in values and (
            "model_path" not in values or _is_tiny_folder(values["model_path"])):
        # No model named at all, or only a tiny-model folder (pretrain_tiny's output or a
        # snapshot of it): the built-in tiny task that trains on a CPU.
        preset = "tiny"
    if preset:
        config = TrainConfig.from_dict(load_preset(preset), config)
    if config_file:
        config = TrainConfig.from_dict(_load_yaml(config_file), config)
    config = TrainConfig.from_dict(values, config)
    return config.validate()


def config_to_yaml(config: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(config.to_dict())), sort_keys=False)
