"""Client side of the reward server (`python -m dancegrpo_fast.rewards.serve`) and its wire format.

Wire format, POST {url}/score with a JSON body:

    {"prompts": ["...", ...],                       # B strings
     "images": {"shape": [B, 3, H, W] | [B, T, 3, H, W],
                "dtype": "uint8" | "float16" | "float32",
                "data": "<base64 of the C-order little-endian array>"}}

uint8 arrays mean value / 255 (4x smaller than float32, and what an 8-bit image file would
hold); float arrays are values in [0, 1]. The answer is {"scores": [B floats]} with status 200,
or {"error": "..."} with a 4xx status for a bad request and 5xx when the reward failed.
GET {url}/health answers {"status": "ok", "reward": {...}, ...}.
"""

from __future__ import annotations

import base64
import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .base import Reward, register_reward

__all__ = ["RemoteReward", "RemoteRewardError", "encode_request", "decode_images", "WIRE_DTYPES"]

WIRE_DTYPES = {"uint8": np.uint8, "float16": np.float16, "float32": np.float32}


class RemoteRewardError(RuntimeError):
    """The reward server could not be reached, or answered with an error."""


def encode_images(images: torch.Tensor, dtype: str = "uint8") -> Dict[str, Any]:
    """(B, ..., 3, H, W) float in [0, 1] -> the JSON-able "images" object of the wire format."""
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(WIRE_DTYPES)}, got {dtype!r}")
    array = images.detach().float().clamp(0, 1).cpu()
    if dtype == "uint8":
        array = (array * 255).round().to(torch.uint8)
    array = np.ascontiguousarray(array.numpy().astype(np.dtype(WIRE_DTYPES[dtype]).newbyteorder("<")))
    return {"shape": list(array.shape), "dtype": dtype, "data": base64.b64encode(array.tobytes()).decode("ascii")}


def encode_request(images: torch.Tensor, prompts: Sequence[str], dtype: str = "uint8") -> bytes:
    return json.dumps({"prompts": list(prompts), "images": encode_images(images, dtype)}).encode("utf-8")


def decode_images(obj: Any) -> torch.Tensor:
    """The wire format's "images" object -> float32 tensor in [0, 1]; ValueError when malformed."""
    if not isinstance(obj, dict):
        raise ValueError("'images' must be an object with 'shape', 'dtype' and 'data'")
    missing = [key for key in ("shape", "dtype", "data") if key not in obj]
    if missing:
        raise ValueError(f"'images' lacks {missing}")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"images.dtype must be one of {sorted(WIRE_DTYPES)}, got {dtype!r}")
    if (not isinstance(shape, list) or not 4 <= len(shape) <= 5
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise ValueError(f"images.shape must be 4 or 5 non-negative ints, got {shape!r}")
    if not isinstance(data, str):
        raise ValueError("images.data must be a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, TypeError) as error:
        raise ValueError(f"images.data is not valid base64: {error}") from error
    item = np.dtype(WIRE_DTYPES[dtype]).newbyteorder("<")
    expected = int(np.prod(shape)) * item.itemsize
    if len(raw) != expected:
        raise ValueError(f"images.data has {len(raw)} bytes, expected {expected} for shape {shape} and dtype {dtype}")
    array = np.frombuffer(raw, dtype=item).reshape(shape).astype(np.float32)
    tensor = torch.from_numpy(array)
    return tensor / 255.0 if dtype == "uint8" else tensor


def decode_request(body: bytes) -> Tuple[torch.Tensor, list]:
    """A /score request body -> (images float32, prompts); ValueError when malformed."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"body is not JSON: {error}") from error
    if not isinstance(payload, dict):
        raise ValueError("body must be a JSON object with 'images' and 'prompts'")
    if "prompts" not in payload or "images" not in payload:
        raise ValueError("body must have 'images' and 'prompts'")
    prompts = payload["prompts"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("'prompts' must be a list of strings")
    return decode_images(payload["images"]), prompts


@register_reward("remote")
class RemoteReward(Reward):
    """A reward computed by a reward server (see `dancegrpo_fast.rewards.serve`).

    url: the server's base URL, e.g. "http://10.0.0.5:8000". timeout_s bounds each attempt;
    a failed attempt (connection refused or reset, timeout, 5xx) is retried `retries` more times
    after backoff_s, 2*backoff_s, ...; a 4xx answer (a bad request) is not retried. When every
    attempt fails, RemoteRewardError names the url and the number of attempts. modality "image" or
    "video" says what the served reward takes (the server checks again). dtype: the wire dtype,
    "uint8" (default, exact for 8-bit images) or "float16"/"float32".
    """

    def __init__(self, url: str, timeout_s: float = 120.0, retries: int = 2, backoff_s: float = 1.0,
                 dtype: str = "uint8", modality: str = "image", batch_size: Optional[int] = None,
                 name: str = "remote"):
        super().__init__(device="cpu", batch_size=batch_size)
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0:
            raise ValueError(f"need timeout_s > 0, retries >= 0, backoff_s >= 0; got {timeout_s}, {retries}, {backoff_s}")
        if dtype not in WIRE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(WIRE_DTYPES)}, got {dtype!r}")
        if modality not in ("image", "video"):
            raise ValueError(f"modality must be 'image' or 'video', got {modality!r}")
        self.url = url.rstrip("/")
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.dtype, self.modality, self.name = dtype, modality, name

    def _request(self, path: str, body: Optional[bytes]) -> Dict[str, Any]:
        attempts = self.retries + 1
        last_error = "no attempt made"
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(
                self.url + path, data=body, method="POST" if body is not None else "GET",
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:
                message = _error_message(error)
                if 400 <= error.code < 500:
                    raise RemoteRewardError(
                        f"reward server {self.url} rejected the request (HTTP {error.code}): {message}"
                    ) from error
                last_error = f"HTTP {error.code}: {message}"
            except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError, OSError) as error:
                reason = getattr(error, "reason", error)
                last_error = f"{type(reason).__name__}: {reason}"
            except json.JSONDecodeError as error:
                last_error = f"answer is not JSON: {error}"
        raise RemoteRewardError(
            f"reward server {self.url} failed after {attempts} attempts (timeout {self.timeout_s:g} s each); "
            f"last error: {last_error}"
        )

    def health(self) -> Dict[str, Any]:
        """The server's /health answer (raises RemoteRewardError when it is down)."""
        return self._request("/health", None)

    def _score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        answer = self._request("/score", encode_request(images, prompts, self.dtype))
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, list) or len(scores) != images.shape[0]:
            raise RemoteRewardError(
                f"reward server {self.url} answered {answer!r:.200} instead of {images.shape[0]} scores"
            )
        return torch.tensor(scores, dtype=torch.float32)

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), "url": self.url, "timeout_s": self.timeout_s, "retries": self.retries}


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        body = error.read()
        return str(json.loads(body).get("error", body[:300]))
    except Exception:
        return str(error.reason)
