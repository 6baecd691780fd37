"""A pipeline built from its configs on the meta device: every module has its real parameter
shapes and dtypes and no storage, so a full-size model (FLUX.1-dev's 11.9 B parameters) costs
nothing to build and runs shape-only; `dancegrpo_fast.plan` counts its FLOPs and bytes that way.

`Policy._load_pipeline` calls `build_meta_pipeline` when the policy's device is "meta", for any
folder in the diffusers layout: a config-only folder (`dancegrpo_fast/architectures/*`) or a real
checkpoint, whose weights are then not read. Each component listed in model_index.json is built
from its own config under `torch.device("meta")`, in the dtype `from_pretrained` would give it
(including the modules diffusers and transformers keep in float32), and the pipeline class is
constructed from them, so everything after loading (latent shapes, encode, predict, decode) is the
policy's ordinary code.

Tokenizers: a config-only folder ships no vocabulary, only tokenizer_config.json (model_max_length
and the pad id). Each tokenizer becomes a `MetaTokenizer`, which turns every prompt into a row of
pad ids with an all-ones attention mask: `max_length` long when the pipeline pads to max_length
(what every supported pipeline does for the embeddings it keeps), so the text encoders run on meta
tensors of exactly the shapes a real prompt gives. The values of the conditioning are unknowable
on meta; only its shapes and dtypes are real, which is all FLOP and memory counting needs.
"""
from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Dict, List, Optional

import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".gguf")


def component_specs(index: Dict) -> Dict[str, List]:
    """{name: [library, class]} of the components model_index.json lists (None entries included)."""
    return {name: spec for name, spec in index.items() if not name.startswith("_") and isinstance(spec, list)}


def holds_weights(folder, index: Dict) -> bool:
    """True when some component folder holds a weight file (config-only folders hold none)."""
    folder = Path(folder)
    for name, spec in component_specs(index).items():
        if spec[0] is None:
            continue
        sub = folder / name
        if sub.is_dir() and any(p.name.endswith(WEIGHT_SUFFIXES) for p in sub.iterdir()):
            return True
    return False


class MetaTokenizer:
    """Stands in for a tokenizer whose vocabulary is not at hand (see the module docstring).

    Called like a transformers tokenizer; returns input_ids (B, L) int64 filled with pad_token_id
    and attention_mask (B, L) int64 of ones. L = max_length when padding="max_length"; otherwise a
    word count (whitespace words + 2 special tokens, capped at max_length when truncating), which
    the supported pipelines use only for their truncation warning.
    """

    added_tokens_encoder: Dict[str, int] = {}

    def __init__(self, model_max_length: int, pad_token_id: int = 0):
        if not (isinstance(model_max_length, int) and model_max_length >= 1):
            raise ValueError(f"model_max_length must be an integer >= 1, got {model_max_length!r}")
        self.model_max_length = model_max_length
        self.pad_token_id = int(pad_token_id)

    @classmethod
    def from_folder(cls, folder) -> "MetaTokenizer":
        config_file = Path(folder) / "tokenizer_config.json"
        if not config_file.is_file():
            raise ValueError(f"tokenizer folder {str(folder)!r} has no tokenizer_config.json: the meta tokenizer needs "
                             f"its model_max_length")
        config = json.loads(config_file.read_text())
        return cls(int(config.get("model_max_length", 512)), int(config.get("pad_token_id") or 0))

    def __call__(self, text, padding=False, max_length: Optional[int] = None, truncation=None,
                 return_tensors=None, **unused):
        from transformers import BatchEncoding

        texts = [text] if isinstance(text, str) else list(text)
        limit = max_length or self.model_max_length
        if padding == "max_length":
            length = limit
        else:
            length = max(len(t.split()) + 2 for t in texts)
            if truncation:
                length = min(length, limit)
        ids = torch.full((len(texts), length), self.pad_token_id, dtype=torch.int64)
        return BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    def tokenize(self, text: str) -> List[str]:
        """Whitespace words: only looked at for textual-inversion tokens, which a meta run has none of."""
        return text.split()

    def batch_decode(self, ids, **unused) -> List[str]:
        return ["" for _ in range(len(ids))]


def _import_class(library: str, class_name: str):
    if library == "diffusers":
        import diffusers

        return getattr(diffusers, class_name)
    if library == "transformers":
        import transformers

        return getattr(transformers, class_name)
    return getattr(importlib.import_module(library), class_name)


def _fp32_module_names(cls, dtype: torch.dtype) -> List[str]:
    """Module names from_pretrained keeps in float32 for this dtype: diffusers'
    `_keep_in_fp32_modules` always; transformers' `_keep_in_fp32_modules` for float16 only and
    `_keep_in_fp32_modules_strict` for float16 and bfloat16."""
    names = []
    if _is_transformers_model(cls):
        if dtype == torch.float16:
            names += list(getattr(cls, "_keep_in_fp32_modules", None) or [])
        if dtype in (torch.float16, torch.bfloat16):
            names += list(getattr(cls, "_keep_in_fp32_modules_strict", None) or [])
    else:
        names += list(getattr(cls, "_keep_in_fp32_modules", None) or [])
    return names


def _is_transformers_model(cls) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return issubclass(cls, PreTrainedModel)


def _all_ones_mask_as_none(module, args, kwargs):
    """A text encoder of a meta pipeline only sees attention masks made by a MetaTokenizer, which
    are all ones. transformers asks whether a mask is all ones (to skip building it), a question a
    meta tensor cannot answer; no mask means the same thing and skips the question."""
    bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    if bound.arguments.get("attention_mask") is None:
        return None
    bound.arguments["attention_mask"] = None
    return bound.args, bound.kwargs


def _build_module(cls, folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """One model component on the meta device, cast like from_pretrained(torch_dtype=dtype)."""
    with torch.device("meta"):
        if _is_transformers_model(cls):
            config = cls.config_class.from_pretrained(str(folder))
            module = cls(config)
            module.register_forward_pre_hook(_all_ones_mask_as_none, with_kwargs=True)
        else:
            module = cls.from_config(cls.load_config(str(folder)))
    cast(module, dtype)
    keep = _fp32_module_names(cls, dtype)
    if keep:
        for name, sub in module.named_modules():
            if any(part in keep for part in name.split(".")):
                cast(sub, torch.float32)
    return module.eval()


def cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """module.to(dtype) without diffusers' ModelMixin.to, which warns on every dtype cast (even when
    no module is to stay in float32); the cast is the same."""
    return torch.nn.Module.to(module, dtype)


def build_meta_pipeline(pipeline_class, folder, dtype: torch.dtype, index: Dict):
    """`pipeline_class` with every component of `folder` built from its config on the meta device
    (schedulers and image processors are plain objects, built for real from their configs; tokenizers
    are MetaTokenizers).
    Keys of model_index.json that are not components and that the pipeline's __init__ accepts
    (e.g. requires_safety_checker, image_size) are passed through, as from_pretrained does."""
    folder = Path(folder)
    parameters = inspect.signature(pipeline_class.__init__).parameters
    kwargs = {}
    for name, (library, class_name) in component_specs(index).items():
        if library is None:
            kwargs[name] = None
            continue
        if "tokenizer" in name.lower() or class_name.endswith(("Tokenizer", "TokenizerFast")):
            kwargs[name] = MetaTokenizer.from_folder(folder / name)
            continue
        cls = _import_class(library, class_name)
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            kwargs[name] = _build_module(cls, folder / name, dtype)
        elif hasattr(cls, "from_config"):  # schedulers: no tensors worth counting
            kwargs[name] = cls.from_config(cls.load_config(str(folder / name)))
        elif "ImageProcessor" in class_name:  # settings only (Wan I2V's CLIP image processor): loaded as is
            kwargs[name] = cls.from_pretrained(str(folder / name))
        else:
            raise ValueError(f"component {name!r} of {str(folder)!r} is a {class_name}, which cannot be built on the "
                             f"meta device (not a torch module, a scheduler, a tokenizer or an image processor)")
    for key, value in index.items():
        if not key.startswith("_") and not isinstance(value, list) and key in parameters:
            kwargs[key] = value
    return pipeline_class(**{k: v for k, v in kwargs.items() if k in parameters})
