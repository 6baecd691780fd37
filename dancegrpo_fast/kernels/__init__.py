"""Fast paths: Triton kernels (`step_loss`, `sde_step`) and their PyTorch twins (`*_torch`).

Nothing outside `dancegrpo_fast.ops` should import from here: ops picks the implementation.
Whether Triton runs compiled or interpreted is fixed when this package is first imported
(Triton reads TRITON_INTERPRET when a kernel is defined).
"""
from __future__ import annotations

import os

import torch

# The log-prob constant of the reference math, shared by every kernel and its PyTorch twin.
from ..sde import HALF_LOG_2PI  # noqa: F401

BLOCK = 1024  # elements per Triton program iteration on the streamed tensors

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    TRITON_AVAILABLE = True
    TRITON_ERROR = None
except Exception as exc:  # ImportError, or a broken install
    TRITON_AVAILABLE = False
    TRITON_ERROR = f"{type(exc).__name__}: {exc}"

TRITON_INTERPRETED = TRITON_AVAILABLE and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_mode() -> str:
    """'compiled', 'interpreted' or 'unavailable'."""
    if not TRITON_AVAILABLE:
        return "unavailable"
    return "interpreted" if TRITON_INTERPRETED else "compiled"


def target_programs(device: torch.device, batch: int) -> int:
    """About how many programs a streaming kernel should launch on `device`."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * 8
    # Interpreter: each program costs Python overhead; a few chunks per row keep the chunked
    # reduction exercised without making tests slow.
    return 4 * batch


def chunking(batch: int, numel: int, block: int, target_programs: int) -> tuple[int, int]:
    """Split each row of `numel` elements into chunks so that about `target_programs` programs
    run in all (enough to fill the GPU with B as small as 1). Returns (chunk_size, num_chunks);
    chunk_size is a multiple of block."""
    blocks_per_row = max(1, -(-numel // block))
    chunks = max(1, min(blocks_per_row, target_programs // max(batch, 1)))
    chunk_blocks = -(-blocks_per_row // chunks)
    chunk = chunk_blocks * block
    return chunk, -(-numel // chunk)
