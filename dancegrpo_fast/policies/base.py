"""The policy interface: everything the trainer needs to know about one model family.

A policy owns a diffusers pipeline loaded from a local folder, the trainable module (the
transformer or UNet), the sampler schedule as per-step (a, b, s) coefficients (SPEC 1), a cache of
text embeddings, and the model call. The trainer sees latents in the policy's "model space" (e.g.
FLUX's packed tokens): every step is element-wise there, so the log-prob is the same as in the
unpacked layout.
"""
from __future__ import annotations

import abc
import json
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..config import ModelConfig, SamplerConfig
from ..schedules import StepSchedule, flow_schedule
from .attention import AttentionReport, resolve_backend, set_backend
from .meta_pipeline import build_meta_pipeline, holds_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Conditioning = Dict[str, Tensor]


class ModelLoadError(RuntimeError):
    """A model folder that does not exist, is not in the diffusers layout, lacks a component or
    fails to load."""


def check_model_folder(path, pipeline_classes: Sequence[str], family: str) -> Dict:
    """The folder exists, has a model_index.json naming one of `pipeline_classes`, and has every
    component folder that model_index.json lists. Returns the parsed model_index.json."""
    if not path:
        raise ModelLoadError(f"model_path is empty: give the local folder of a {family} checkpoint in "
                             f"the diffusers layout")
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"model path {str(folder)!r} does not exist or is not a folder")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(f"{str(folder)!r} is not a diffusers pipeline folder: model_index.json is missing")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{str(index_file)!r} is not valid JSON: {error}") from None
    class_name = index.get("_class_name")
    if class_name not in pipeline_classes:
        raise ModelLoadError(f"{str(folder)!r} holds a {class_name}, but model_family {family!r} expects "
                             f"one of {list(pipeline_classes)}")
    missing = []
    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        sub = folder / component
        if not sub.is_dir() or not any(sub.iterdir()):
            missing.append(component)
    if missing:
        raise ModelLoadError(f"{str(folder)!r} lacks the component folder(s) {missing} that model_index.json lists")
    return index


class Policy(abc.ABC):
    """One model family. Subclasses set the class attributes and implement the abstract methods.

    A policy gets only the configuration sections it needs: `options` (ModelConfig: folder,
    dtypes, resolution, text length) and `sampling` (SamplerConfig: the sampler, its steps,
    guidance).

    Attributes after construction: `pipe` (the diffusers pipeline), `model` (the trainable
    nn.Module, `pipe.<model_component>`), `forward_model` (what predict calls: `model` or its
    DDP wrapper), `device`, `attention` (the attention backend its layers run on).
    """

    family: str = ""
    pipeline_classes: Sequence[str] = ()
    model_component: str = "transformer"
    modality: str = "image"
    timestep_scale: float = 1000.0
    lora_layers_argument: str = "transformer_lora_layers"
    supports_guidance_embedding = False
    # The model passes attention masks (padded text): `auto` then picks a varlen flash backend.
    masked_attention = False
    attention: AttentionReport

    def __init__(self, options: ModelConfig, sampling: SamplerConfig, device: torch.device | str = "cpu"):
        self.options = options
        self.sampling = sampling
        self.device = torch.device(device)
        self.model_path = str(options.path)
        self.dtype = DTYPES[options.dtype]
        self.model_index = check_model_folder(options.path, self.pipeline_classes, self.family)
        self.pipe = self._load_pipeline()
        self.model: nn.Module = getattr(self.pipe, self.model_component)
        self.forward_model: nn.Module = self.model
        self._embedding_cache: "OrderedDict[str, Dict[str, Tensor]]" = OrderedDict()
        self.embedding_cache_size = 4096
        self._negative: Optional[Conditioning] = None
        self.offload_text_encoders = bool(options.offload_text_encoders)
        for name, component in self.pipe.components.items():
            if isinstance(component, nn.Module):
                component.requires_grad_(False)
                if not (self.offload_text_encoders and name in self.text_encoder_names):
                    component.to(self.device)
                if component is not self.model:
                    component.eval()
        self.set_attention_backend(options.attention_backend)

    @property
    def text_encoder_names(self) -> List[str]:
        return [name for name, component in self.pipe.components.items()
                if name.startswith("text_encoder") and isinstance(component, nn.Module)]

    def _text_encoders_to(self, device) -> None:
        if self.device.type == "meta":  # a meta policy has no host memory: its encoders stay on meta
            return
        for name in self.text_encoder_names:
            self.pipe.components[name].to(device)

    # --- loading -------------------------------------------------------------------------------
    def _pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_classes[0])

    def _load_pipeline(self):
        if self.device.type == "meta":
            return self._build_on_meta(self._pipeline_class())
        if not holds_weights(self.model_path, self.model_index):
            raise ModelLoadError(f"{self.model_path!r} holds configs but no weights (an architecture folder such as "
                                 f"dancegrpo_fast/architectures/*): it can only be built on the meta device, e.g. "
                                 f"by python -m dancegrpo_fast.plan; give a checkpoint folder with weights to train")
        try:
            with warnings.catch_warnings():
                # diffusers >= 0.36 renames torch_dtype to dtype; the old name works everywhere.
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                return self._pipeline_class().from_pretrained(self.model_path, torch_dtype=self.dtype)
        except Exception as error:  # surface which folder and family failed, keep the cause
            raise ModelLoadError(f"could not load the {self.family} pipeline from {self.model_path!r}: "
                                 f"{type(error).__name__}: {error}") from error

    def _build_on_meta(self, pipeline_class):
        """Every component from its config on the meta device (policies/meta_pipeline.py): real
        shapes and dtypes, no weights read, no memory used."""
        try:
            return build_meta_pipeline(pipeline_class, self.model_path, self.dtype, self.model_index)
        except Exception as error:
            raise ModelLoadError(f"could not build the {self.family} pipeline of {self.model_path!r} on the meta device: "
                                 f"{type(error).__name__}: {error}") from error

    def set_attention_backend(self, backend: str) -> None:
        """Every attention layer of the trainable model on one diffusers attention backend
        (`auto`: resolved for this device, policies/attention.py); fails with one line when the
        backend cannot run here or some layer did not take it. `self.attention` then says which
        backend and how many layers."""
        resolved = resolve_backend(backend or "native", self.device, self.masked_attention)
        if resolved == "native" and self.device.type == "cuda":
            avoid_cudnn_attention()
        self.attention = set_backend(self.model, resolved, what=self.model_component)

    # --- sampler -------------------------------------------------------------------------------
    def schedule(self, sde_steps: Optional[Sequence[int]] = None) -> StepSchedule:
        """The sampler's steps; sde_steps: the stochastic ones (default: the configured window at
        the first iteration)."""
        c = self.sampling
        steps = c.sde_steps() if sde_steps is None else sde_steps
        return flow_schedule(c.num_steps, c.shift, c.name, c.eta, steps, self.timestep_scale)

    @abc.abstractmethod
    def latent_shape(self) -> tuple:
        """Shape of one sample's latent in model space (what the steps act on)."""

    # --- text ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def _encode_uncached(self, prompts: List[str]) -> Conditioning:
        """Encode prompts: {name: (len(prompts), ...) tensor}."""

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """Text conditioning of the prompts, {name: (len(prompts), ...)} on the device. Each prompt
        is encoded once and kept (on the CPU) in an LRU cache of `embedding_cache_size` entries."""
        prompts = list(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._embedding_cache))
        if missing:
            if self.offload_text_encoders:  # on the device only while encoding new prompts
                self._text_encoders_to(self.device)
            try:
                encoded = self._encode_uncached(missing)
            finally:
                if self.offload_text_encoders:
                    self._text_encoders_to("cpu")
            # Meta tensors hold no data to copy to the CPU: a meta policy caches them as they are.
            cache_device = self.device if self.device.type == "meta" else torch.device("cpu")
            for i, prompt in enumerate(missing):
                self._embedding_cache[prompt] = {k: v[i].detach().to(cache_device) for k, v in encoded.items()}
        rows = []
        for prompt in prompts:
            self._embedding_cache.move_to_end(prompt)
            rows.append(self._embedding_cache[prompt])
        while len(self._embedding_cache) > max(self.embedding_cache_size, len(prompts)):
            self._embedding_cache.popitem(last=False)
        return {k: torch.stack([row[k] for row in rows]).to(self.device) for k in rows[0]}

    def negative_conditioning(self, batch: int) -> Conditioning:
        if self._negative is None:
            self._negative = self.encode([self.sampling.negative_prompt])
        return {k: v.expand(batch, *v.shape[1:]) for k, v in self._negative.items()}

    @property
    def uses_cfg(self) -> bool:
        return self.sampling.cfg_scale != 1.0

    # --- model call ----------------------------------------------------------------------------
    @abc.abstractmethod
    def _call_model(self, module: nn.Module, latents: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
        """One forward pass: latents (B, *latent_shape), timesteps (B,) in model units."""

    def predict(self, latents: Tensor, step_index: Tensor, cond: Conditioning, schedule: StepSchedule,
                module: Optional[nn.Module] = None) -> Tensor:
        """Model output v at the given steps, classifier-free guided when cfg_scale != 1.

        latents (B, *latent_shape); step_index (B,) int64; cond rows aligned with latents.
        Returns v of the latents' shape (the model's dtype).
        """
        module = module if module is not None else self.forward_model
        timesteps = schedule.model_timesteps(step_index, self.device)
        if not self.uses_cfg:
            return self._call_model(module, latents, timesteps, cond)
        batch = latents.shape[0]
        negative = self.negative_conditioning(batch)
        both = {k: torch.cat([negative[k], cond[k]]) for k in cond}
        out = self._call_model(module, torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), both)
        uncond, text = out.chunk(2)
        return uncond + self.sampling.cfg_scale * (text - uncond)

    # --- decoding ------------------------------------------------------------------------------
    @abc.abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Final latents -> images (B, 3, H, W) or videos (B, T, 3, H, W), float32 in [0, 1]."""

    # --- saving --------------------------------------------------------------------------------
    def save_lora(self, folder, state_dict) -> None:
        """Write LoRA weights so that `pipeline.load_lora_weights(folder)` loads them."""
        self._pipeline_class().save_lora_weights(str(folder), **{self.lora_layers_argument: state_dict})


def avoid_cudnn_attention() -> None:
    """PyTorch SDPA without its cuDNN backend (it then picks flash or memory-efficient attention).

    Why: on an H200 with torch 2.11 + CUDA 13.0 the cuDNN attention backward of a full-size FLUX
    training step (720px, bf16 autocast, gradient checkpointing, LoRA) failed with
    "mha_graph.execute(...).is_good()", and the same step ran with cuDNN attention off
    (benchmarks/results/gpu_h200/). The setting is process-wide, as SDPA's backend flags are."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def to_unit_range(decoded: Tensor) -> Tensor:
    return (decoded.float() / 2 + 0.5).clamp(0, 1)
