"""Counter-based Gaussian noise shared within GRPO groups.

Definition (the contract every implementation follows: the C++/CUDA extension ``dancegrpo_fast._C``,
the PyTorch fallback below and the Triton kernels, which call Triton's built-in ``tl.randn``; all
give the same numbers up to float32 rounding of log/sqrt/cos):

``normal(seed, j)`` for a 64-bit seed (an int64 reinterpreted as uint64) and an element index
``0 <= j < 2**31`` is exactly Triton 3.x ``tl.randn(seed, j)`` for an int32 offset ``j``:

* key ``k0`` = low 32 bits of the seed, ``k1`` = high 32 bits; counter ``(c0, c1, c2, c3) = (j, 0, 0, 0)``;
* Philox4x32 with 10 rounds, each round (all mod 2**32)::

      (c0, c1, c2, c3) = (umulhi(0xCD9E8D57, c2) ^ c1 ^ k0, 0xCD9E8D57 * c2,
                          umulhi(0xD2511F53, c0) ^ c3 ^ k1, 0xD2511F53 * c0)
      k0 += 0x9E3779B9; k1 += 0xBB67AE85

* for ``x`` in ``(c0, c1)``: reinterpret as int32, ``x = ~x`` if negative, ``u = float32(x) * 4.6566127342e-10``;
* ``u1 = max(1e-7, u(c0))``, ``u2 = u(c1)``,
  ``normal = sqrt(-2 * log(u1)) * cos(6.283185307179586 * u2)`` in float32 math.

``grouped_noise(seeds, group_size, shape)`` returns a ``(P * group_size, *shape)`` tensor whose rows
``p*group_size ... p*group_size + group_size - 1`` all equal ``normal(seeds[p], j)`` for
``j = 0 .. prod(shape) - 1`` laid out in C order; computed in float32, then cast to ``dtype``. A
prompt's noise depends only on its seed: not on P, its position in the batch, the device or rank.

``seed_for_step(seeds, step)`` derives the per-(sample, step) seed used by the rollout kernels, so
that step ``k`` of sample ``i`` uses ``normal(seed_for_step(seed_i, k), j)``::

    seed_u64 = seed mod 2**64                                   (int64 reinterpreted as uint64)
    x = seed_u64 XOR ((0x9E3779B97F4A7C15 * (step + 1)) mod 2**64)
    z = splitmix64(x), i.e.  z = (x + 0x9E3779B97F4A7C15) mod 2**64
                             z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) mod 2**64
                             z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) mod 2**64
                             z = z ^ (z >> 31)
    result = z reinterpreted as int64 (z - 2**64 when z >= 2**63)

The compiled extension is used when it can be imported (and, for CUDA tensors, was built with
CUDA); otherwise a vectorised PyTorch implementation of the same math is used (CPU or CUDA), and
importing this module warns once. Build the extension with ``pip install --no-build-isolation -e .``.
"""
from __future__ import annotations

import importlib
import math
import numbers
import warnings
from typing import Iterable, Sequence

import torch

__all__ = [
    "grouped_noise",
    "philox_normal_torch",
    "seed_for_step",
    "splitmix64",
    "extension_status",
]

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_PHILOX_ROUND_A = 0xD2511F53  # multiplies c0
_PHILOX_ROUND_B = 0xCD9E8D57  # multiplies c2
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUNDS = 10
_UNIFORM_SCALE = 4.6566127342e-10
_TWO_PI = 6.283185307179586
_MIN_UNIFORM = 1.0e-7
_MAX_NUMEL = 1 << 31
_GOLDEN64 = 0x9E3779B97F4A7C15
_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_BACKENDS = ("auto", "extension", "torch")

# ----------------------------------------------------------------------------------------------
# Extension loading
# ----------------------------------------------------------------------------------------------
_C = None
_C_ERROR: str | None = None
try:
    # import_module rather than `from . import _C`, whose error inside the package's __init__ reads
    # like a circular import
    _C = importlib.import_module(__name__.rpartition(".")[0] + "._C")
except Exception as exc:  # ImportError, or an OSError/undefined symbol from a stale build
    _C = None
    _C_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "dancegrpo_fast: the compiled extension dancegrpo_fast._C could not be imported "
        f"({_C_ERROR}); grouped_noise uses the slower pure-PyTorch fallback (same numbers). "
        "Build the extension with `pip install --no-build-isolation -e .` in the repository.",
        RuntimeWarning,
        stacklevel=2,
    )


def extension_status() -> dict:
    """State of the compiled extension.

    Returns ``{"built": bool, "cuda": bool, "error": str | None}``: ``built`` when ``dancegrpo_fast._C``
    was imported, ``cuda`` when it was compiled with its CUDA kernel, ``error`` why the import failed.
    """
    built = _C is not None
    return {"built": built, "cuda": bool(built and _C.has_cuda()), "error": _C_ERROR}


# ----------------------------------------------------------------------------------------------
# Argument validation
# ----------------------------------------------------------------------------------------------
def _as_seed_tensor(seeds, name: str = "seeds") -> torch.Tensor:
    """seeds -> 1-D int64 tensor (device kept for tensors, CPU for sequences)."""
    if isinstance(seeds, torch.Tensor):
        if seeds.dtype == torch.bool or seeds.dtype.is_floating_point or seeds.dtype.is_complex:
            raise TypeError(f"{name} must be an integer tensor (int64), got dtype {seeds.dtype}")
        if seeds.dim() != 1:
            raise ValueError(f"{name} must be a 1-D tensor of shape (P,), got shape {tuple(seeds.shape)}")
        if seeds.dtype == torch.int64:
            return seeds
        if seeds.dtype == getattr(torch, "uint64", None):
            return seeds.view(torch.int64)  # reinterpret the bits
        return seeds.to(torch.int64)
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable):
        raise TypeError(
            f"{name} must be a 1-D int64 tensor or a sequence of Python ints, got {type(seeds).__name__}")
    values = []
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise TypeError(f"{name}[{i}] must be an int, got {type(s).__name__}")
        s = int(s)
        if not -(1 << 63) <= s < (1 << 63):
            raise ValueError(f"{name}[{i}] = {s} does not fit in int64 (must be in [-2**63, 2**63))")
        values.append(s)
    return torch.tensor(values, dtype=torch.int64)


def _as_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (int(shape),)
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Iterable):
        raise TypeError(f"shape must be a tuple, list or torch.Size of ints, got {type(shape).__name__}")
    out = []
    for i, d in enumerate(shape):
        if isinstance(d, torch.Tensor) and d.dim() == 0 and not d.dtype.is_floating_point:
            d = int(d)
        if isinstance(d, bool) or not isinstance(d, numbers.Integral):
            raise TypeError(f"shape[{i}] must be an int, got {type(d).__name__}")
        if d < 0:
            raise ValueError(f"shape[{i}] must be >= 0, got {d}")
        out.append(int(d))
    numel = math.prod(out)
    if numel > _MAX_NUMEL:
        raise ValueError(f"shape {tuple(out)} has {numel} elements per prompt; at most 2**31 are supported "
                         "(element indices are int32 offsets)")
    return tuple(out)


def _as_group_size(group_size) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return int(group_size)


def _as_dtype(dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    if dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of float32, float64, float16, bfloat16, got {dtype}")
    return dtype


def _as_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (TypeError, RuntimeError) as exc:
        raise ValueError(f"device must be a torch.device or a string such as 'cpu' or 'cuda', got {device!r}") from exc
    if dev.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"device must be cpu, cuda or meta, got {dev}")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


# ----------------------------------------------------------------------------------------------
# Pure-PyTorch implementation
# ----------------------------------------------------------------------------------------------
def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(umulhi(a, b), a * b mod 2**32) for a 32-bit constant a and int64 tensor b in [0, 2**32)."""
    b_lo = b & 0xFFFF
    p_lo = b_lo * a  # < 2**48
    t = (b >> 16) * a + (p_lo >> 16)  # == (a * b) >> 16, < 2**49
    hi = t >> 16
    lo = ((t & 0xFFFF) << 16) | (p_lo & 0xFFFF)
    return hi, lo


def _uniform_from_uint32(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # int32(x) < 0  <=>  x >= 2**31, and then ~int32(x) == 0xFFFFFFFF - x == x ^ 0xFFFFFFFF.
    x = torch.where(x >= (1 << 31), x ^ _MASK32, x)
    return x.to(torch.float32) * scale


def philox_normal_torch(seeds, numel: int, device=None) -> torch.Tensor:
    """``normal(seeds[p], j)`` for ``j < numel`` as a ``(P, numel)`` float32 tensor, in pure PyTorch.

    Vectorised over prompts and elements with int64 tensors masked to 32 bits (works on CPU and
    CUDA). ``device`` defaults to the seeds' device (CPU for a list of ints).
    """
    seeds = _as_seed_tensor(seeds)
    if isinstance(numel, bool) or not isinstance(numel, numbers.Integral):
        raise TypeError(f"numel must be an int, got {type(numel).__name__}")
    if not 0 <= numel <= _MAX_NUMEL:
        raise ValueError(f"numel must be in [0, 2**31], got {numel}")
    dev = seeds.device if device is None else _as_device(device)
    seeds = seeds.to(dev)
    P = seeds.shape[0]
    if P == 0 or numel == 0:
        return torch.empty((P, numel), dtype=torch.float32, device=dev)

    out = torch.empty((P, numel), dtype=torch.float32, device=dev)
    k0 = (seeds & _MASK32).unsqueeze(1)  # (P, 1)
    k1 = ((seeds >> 32) & _MASK32).unsqueeze(1)
    # Columns in chunks of about _FALLBACK_CHUNK elements in all, to bound the int64 temporaries.
    cols = max(1, _FALLBACK_CHUNK // P)
    for start in range(0, numel, cols):
        stop = min(numel, start + cols)
        out[:, start:stop] = _philox_normal_block(k0, k1, start, stop, dev)
    return out


_FALLBACK_CHUNK = 1 << 22


def _philox_normal_block(k0: torch.Tensor, k1: torch.Tensor, start: int, stop: int,
                         dev: torch.device) -> torch.Tensor:
    """normal(seed, j) for j in [start, stop) given the keys (P, 1) as int64 in [0, 2**32)."""
    P, n = k0.shape[0], stop - start
    c0 = torch.arange(start, stop, dtype=torch.int64, device=dev).unsqueeze(0).expand(P, n)
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    c1 = c2 = c3 = zero
    for r in range(_PHILOX_ROUNDS):
        if r == 0:  # c1 = c2 = c3 = 0: umulhi(B, 0) = 0 and B * 0 = 0
            hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
            c0, c1, c2, c3 = k0.expand(P, n), zero.expand(P, n), hi_a ^ k1, lo_a
        else:
            hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
            hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
            c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32

    f32 = dict(dtype=torch.float32, device=dev)
    scale = torch.tensor(_UNIFORM_SCALE, **f32)
    u1 = torch.maximum(_uniform_from_uint32(c0, scale), torch.tensor(_MIN_UNIFORM, **f32))
    u2 = _uniform_from_uint32(c1, scale)
    th = torch.tensor(_TWO_PI, **f32) * u2
    r = torch.sqrt(torch.log(u1) * torch.tensor(-2.0, **f32))
    return r * torch.cos(th)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def grouped_noise(seeds, group_size: int, shape: Sequence[int], dtype: torch.dtype = torch.float32,
                  device="cpu", *, backend: str = "auto") -> torch.Tensor:
    """Gaussian noise shared within GRPO groups.

    Args:
        seeds: int64 tensor of shape (P,) (any integer dtype is converted; uint64 is reinterpreted)
            or a sequence of Python ints in [-2**63, 2**63), one per prompt.
        group_size: G >= 1, number of samples per prompt.
        shape: per-sample shape (tuple, list or torch.Size of non-negative ints, at most 2**31 elements).
        dtype: float32, float64, float16 or bfloat16; values are computed in float32 then cast.
        device: "cpu", "cuda", "cuda:N", "meta" or a torch.device. On "meta" the result has the
            shape and dtype and no values (a dry run of a full-size model, dancegrpo_fast.plan).
        backend: "auto" (extension when usable, else PyTorch), "extension" (error if unusable) or
            "torch" (always the PyTorch fallback).

    Returns:
        A contiguous ``(P * group_size, *shape)`` tensor; rows ``p*G .. p*G + G - 1`` all equal
        ``normal(seeds[p], j)``, ``j`` in C order (see the module docstring).
    """
    seeds_t = _as_seed_tensor(seeds)
    group_size = _as_group_size(group_size)
    shape_t = _as_shape(shape)
    dtype = _as_dtype(dtype)
    dev = _as_device(device)
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if dev.type == "meta":
        return torch.empty((seeds_t.shape[0] * group_size,) + shape_t, dtype=dtype, device=dev)

    ext_ok = _C is not None and (dev.type == "cpu" or _C.has_cuda())
    if backend == "extension" and not ext_ok:
        why = _C_ERROR if _C is None else "the extension was built without CUDA"
        raise RuntimeError(f"grouped_noise: backend='extension' requested for device {dev} but the "
                           f"extension is not usable ({why}); build it with "
                           "`pip install --no-build-isolation -e .`")
    if ext_ok and backend != "torch":
        return _C.grouped_noise(seeds_t, group_size, list(shape_t), dtype, dev)

    P = seeds_t.shape[0]
    numel = math.prod(shape_t)
    noise = philox_normal_torch(seeds_t, numel, dev).to(dtype)  # (P, numel)
    out = noise.unsqueeze(1).expand(P, group_size, numel).contiguous()  # materialised copy
    return out.view((P * group_size,) + shape_t)


def splitmix64(x: int) -> int:
    """SplitMix64 finaliser of a 64-bit unsigned int (Python int in [0, 2**64)) -> [0, 2**64)."""
    z = (x + _GOLDEN64) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _seed_for_step_int(seed: int, step: int) -> int:
    x = (seed & _MASK64) ^ ((_GOLDEN64 * (step + 1)) & _MASK64)
    z = splitmix64(x)
    return z - (1 << 64) if z >= (1 << 63) else z


def seed_for_step(seeds, step: int) -> torch.Tensor:
    """Per-(sample, step) seeds: ``splitmix64(seed_u64 ^ (0x9E3779B97F4A7C15 * (step + 1) mod 2**64))``.

    Args:
        seeds: int64 tensor of shape (N,) (one seed per sample) or a sequence of Python ints.
        step: the step index, an int >= 0.

    Returns:
        An int64 tensor of shape (N,) on the seeds' device (CPU for a sequence); the uint64 result
        is reinterpreted as int64. Computed with Python ints (exact); see the module docstring.
    """
    seeds_t = _as_seed_tensor(seeds)
    if isinstance(step, torch.Tensor) and step.dim() == 0 and not step.dtype.is_floating_point:
        step = int(step)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    values = [_seed_for_step_int(int(s), int(step)) for s in seeds_t.tolist()]
    return torch.tensor(values, dtype=torch.int64, device=seeds_t.device)


# ----------------------------------------------------------------------------------------------
# Seeds of the training run: every random draw of a run is keyed by integers (base seed,
# iteration, sample or prompt number, purpose), never by a generator's running state, so that a
# rollout is the same at any batch size, on any number of ranks, and after a resume.
# ----------------------------------------------------------------------------------------------

_MASK63 = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64 chained), e.g. (base seed, iteration, sample)."""
    value = 0x2545F4914F6CDD1D
    for part in parts:
        value = splitmix64((value ^ (int(part) & _MASK64)) & _MASK64)
    return value & _MASK63


def sample_seeds(base_seed: int, iteration: int, first_sample: int, count: int) -> torch.Tensor:
    """(count,) int64 seeds of global samples first_sample .. first_sample + count - 1 (their
    step noise and their trained-timestep subsets derive from these)."""
    return torch.tensor([mix_seed(base_seed, iteration, 1, first_sample + k) for k in range(count)], dtype=torch.int64)


def prompt_seeds(base_seed: int, iteration: int, first_prompt: int, count: int) -> torch.Tensor:
    """(count,) int64 initial-noise seeds of global prompts first_prompt .. (shared noise)."""
    return torch.tensor([mix_seed(base_seed, iteration, 2, first_prompt + k) for k in range(count)], dtype=torch.int64)


def eval_seeds(seed: int, entries: Sequence[int]) -> tuple:
    """Initial-noise and step-noise seeds of held-out evaluation entries (entry k of the eval
    list): ((n,), (n,)) int64, the same at every evaluation of a run."""
    entries = [int(k) for k in entries]
    return (torch.tensor([mix_seed(seed, k, 1) for k in entries], dtype=torch.int64),
            torch.tensor([mix_seed(seed, k, 2) for k in entries], dtype=torch.int64))
