"""The built-in tiny text-to-image task and model: a procedural colored-shapes grammar
(`task`), a rule-based GenEval-like reward (`reward`), a tiny FLUX-architecture rectified flow
on 32x32 pixels with its own word-level text encoder (`model`), shipped pretrained weights
(`weights/`) and an evaluation script (`evaluate`). See docs/tiny_task.md."""
from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
