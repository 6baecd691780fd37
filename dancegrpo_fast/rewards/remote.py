"""Client side of the reward server (`python -m dancegrpo_fast.rewards.serve`) and its wire format.

Wire format, POST {url}/score with a JSON body:

    {"prompts": ["...", ...],                       # B strings
     "images": {"shape": [B, 3, H, W] | [B, T, 3, H, W],
                "dtype": "uint8" | "float16" | "float32",
                "data": "<base64 of the C-order little-endian array>"}}

uint8 arrays mean value / 255 (4x smaller than float32, and what an 8-bit image file would
hold); float arrays are values in [0, 1]. The answer is {"scores": [B floats or null]} (and,
from a server started with --criteria, {"criteria": {name: [B floats or null]}}) with status 200 (null: the reward could not score that sample, NaN or +-inf; the trainer skips its
group), or {"error": "..."} with a 4xx status for a bad request (400 malformed, 401 missing
token, 413 too large, 422 inputs the reward rejects) and 5xx when the reward failed or the
server is busy (503). Only 5xx answers and connection errors are worth retrying.
GET {url}/health answers {"status": "ok", "reward": {...}, ...}.

With a token (the server's --token, or DANCEGRPO_REWARD_TOKEN on both sides) every request
carries `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .base import Reward, register_reward, validate_inputs

# url -> (request digest, answer): see RemoteReward._answer.
_LAST_ANSWER: Dict[str, tuple] = {}
_LAST_ANSWER_LOCK = threading.Lock()

__all__ = ["RemoteReward", "RemoteRewardError", "WireFormatError", "encode_request", "decode_images",
           "decode_request", "parse_request", "WIRE_DTYPES", "TOKEN_ENV"]

WIRE_DTYPES = {"uint8": np.uint8, "float16": np.float16, "float32": np.float32}

# The bearer token of the reward server, read by the client and by `python -m
# dancegrpo_fast.rewards.serve` when no token is passed explicitly (an environment variable keeps
# it out of `ps` listings, config files and the run's config.yaml).
TOKEN_ENV = "DANCEGRPO_REWARD_TOKEN"

# base64 is decoded in slices of this many characters (a multiple of 4) into one preallocated
# buffer, so a large request never holds the decoded bytes twice.
_B64_SLICE = 1 << 22


class RemoteRewardError(RuntimeError):
    """The reward server could not be reached, or answered with an error."""


class WireFormatError(ValueError):
    """A /score body that does not follow the wire format. `status` is the HTTP status the server
    answers with: 400 (malformed) or 413 (more samples than the server accepts)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


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


def _decode_base64(data: str, size: int) -> bytearray:
    """base64 text of exactly `size` bytes -> a writable buffer (sliced decoding, strict)."""
    out = bytearray(size)
    position = 0
    for start in range(0, len(data), _B64_SLICE):
        piece = binascii.a2b_base64(data[start:start + _B64_SLICE], strict_mode=True)
        out[position:position + len(piece)] = piece
        position += len(piece)
    if position != size:
        raise binascii.Error(f"decoded {position} bytes")
    return out


def decode_images_raw(obj: Any, max_samples: Optional[int] = None, max_side: Optional[int] = None) -> torch.Tensor:
    """The wire format's "images" object -> the array as sent: uint8 (values 0..255), float16 or
    float32 (values in [0, 1]), without conversion (the server converts one batch at a time).

    Checks the declared shape against `max_samples` (the batch size B; 413) and `max_side`
    (H and W) before it decodes anything; WireFormatError names what is wrong.
    """
    if not isinstance(obj, dict):
        raise WireFormatError("'images' must be an object with 'shape', 'dtype' and 'data'")
    missing = [key for key in ("shape", "dtype", "data") if key not in obj]
    if missing:
        raise WireFormatError(f"'images' lacks {missing}")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if not isinstance(dtype, str) or dtype not in WIRE_DTYPES:
        shown = repr(dtype)[:40]
        raise WireFormatError(f"images.dtype must be one of {sorted(WIRE_DTYPES)}, got {shown}")
    if (not isinstance(shape, list) or not 4 <= len(shape) <= 5
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise WireFormatError(f"images.shape must be 4 or 5 non-negative ints, got {repr(shape)[:80]}")
    if max_samples is not None and shape[0] > max_samples:
        raise WireFormatError(f"the request has {shape[0]} samples, more than this server accepts in one request "
                              f"(max_samples={max_samples}); send smaller chunks", status=413)
    if max_side is not None and max(shape[-2:]) > max_side:
        raise WireFormatError(f"images of {shape[-2]}x{shape[-1]} pixels: each side must be at most "
                              f"max_side={max_side} on this server")
    if not isinstance(data, str):
        raise WireFormatError("images.data must be a base64 string")
    item = np.dtype(WIRE_DTYPES[dtype]).newbyteorder("<")
    # math.prod on Python ints: exact, where np.prod would wrap around in int64 and could make a
    # huge declared shape look like the few bytes actually sent.
    expected = math.prod(shape) * item.itemsize
    if len(data) % 4:
        raise WireFormatError("images.data is not valid base64 (its length is not a multiple of 4)")
    padding = 2 if data.endswith("==") else 1 if data.endswith("=") else 0
    size = len(data) // 4 * 3 - padding
    if size != expected:
        raise WireFormatError(f"images.data has {size} bytes, expected {expected} for shape {shape} and dtype {dtype}")
    try:
        raw = _decode_base64(data, size)
    except (binascii.Error, ValueError):
        raise WireFormatError("images.data is not valid base64") from None
    array = np.frombuffer(raw, dtype=item).reshape(shape)
    if not array.dtype.isnative:  # a big-endian host: torch wants the native byte order
        array = array.astype(array.dtype.newbyteorder("="))
    return torch.from_numpy(array)


def images_to_float(images: torch.Tensor) -> torch.Tensor:
    """A decoded wire array -> float32 in [0, 1] (uint8 means value / 255)."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images.to(torch.float32)


def decode_images(obj: Any) -> torch.Tensor:
    """The wire format's "images" object -> float32 tensor in [0, 1]; ValueError when malformed."""
    return images_to_float(decode_images_raw(obj))


def _reject_constant(token: str):
    raise ValueError(f"{token} is not JSON")


def request_text(body: Any) -> str:
    """A request body (bytes, bytearray or str) -> str; WireFormatError when not UTF-8."""
    if isinstance(body, str):
        return body
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise WireFormatError(f"body is not JSON: not UTF-8 (byte {error.start})") from None


def request_payload(text: str) -> Any:
    """Strict JSON -> Python; WireFormatError (never the parser's own exception, whatever the
    body: NaN/Infinity tokens, or nesting deep enough to exhaust the parser's recursion)."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as error:
        raise WireFormatError(f"body is not JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    except RecursionError:
        raise WireFormatError("body is not JSON the server accepts: nested too deeply") from None
    except ValueError as error:
        raise WireFormatError(f"body is not JSON: {error}") from None


def request_from_payload(payload: Any, max_samples: Optional[int] = None, max_side: Optional[int] = None,
                         max_prompt_chars: Optional[int] = None) -> Tuple[torch.Tensor, List[str]]:
    """A parsed /score body -> (images as sent, see `decode_images_raw`; prompts), checking the
    structure and the limits given; WireFormatError names what is wrong without quoting it."""
    if not isinstance(payload, dict):
        raise WireFormatError("body must be a JSON object with 'images' and 'prompts'")
    if "prompts" not in payload or "images" not in payload:
        raise WireFormatError("body must have 'images' and 'prompts'")
    prompts = payload["prompts"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise WireFormatError("'prompts' must be a list of strings")
    if max_prompt_chars is not None:
        for index, prompt in enumerate(prompts):
            if len(prompt) > max_prompt_chars:
                raise WireFormatError(f"prompts[{index}] has {len(prompt)} characters; this server accepts at most "
                                      f"max_prompt_chars={max_prompt_chars}")
    return decode_images_raw(payload["images"], max_samples, max_side), prompts


def parse_request(body: Any, max_samples: Optional[int] = None, max_side: Optional[int] = None,
                  max_prompt_chars: Optional[int] = None) -> Tuple[torch.Tensor, List[str]]:
    """A /score request body -> (images as sent, see `decode_images_raw`; prompts). Any
    malformed body raises WireFormatError with a short message that does not quote the body.
    (The server runs the three steps itself, dropping each intermediate as soon as it can.)"""
    return request_from_payload(request_payload(request_text(body)), max_samples, max_side, max_prompt_chars)


def decode_request(body: bytes) -> Tuple[torch.Tensor, list]:
    """A /score request body -> (images float32 in [0, 1], prompts); ValueError when malformed."""
    images, prompts = parse_request(body)
    return images_to_float(images), prompts


@register_reward("remote")
class RemoteReward(Reward):
    """A reward computed by a reward server (see `dancegrpo_fast.rewards.serve`).

    url: the server's base URL, e.g. "http://10.0.0.5:8000". timeout_s bounds each attempt;
    a failed attempt (connection refused or reset, timeout, 5xx) is retried `retries` more times
    after about backoff_s, 2*backoff_s, ... (each delay times a random factor in [0.5, 1.5], so
    clients that failed together do not retry together); a 4xx answer (a bad request, a missing
    token) is not retried. When every attempt fails, RemoteRewardError names the url and the
    number of attempts. modality "image" or "video" says what the served reward takes (the server
    checks again). dtype: the wire dtype, "uint8" (default, exact for 8-bit images) or
    "float16"/"float32". token: the server's bearer token (default: the DANCEGRPO_REWARD_TOKEN
    environment variable; none when unset). A score the server could not compute comes back as
    NaN. criterion: return that criterion of the served reward instead of its score (the server
    must run with --criteria; e.g. "VQ" of videoalign); entries reading different criteria of one
    server share one request per batch. criteria: also log every criterion of the served reward
    (implied by criterion).
    """

    def __init__(self, url: str, timeout_s: float = 120.0, retries: int = 2, backoff_s: float = 1.0,
                 dtype: str = "uint8", modality: str = "image", batch_size: Optional[int] = None,
                 name: str = "remote", token: Optional[str] = None, criterion: Optional[str] = None,
                 criteria: bool = False):
        super().__init__(device="cpu", batch_size=batch_size)
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
        if not backoff_s >= 0:
            raise ValueError(f"backoff_s must be >= 0, got {backoff_s!r}")
        if dtype not in WIRE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(WIRE_DTYPES)}, got {dtype!r}")
        if modality not in ("image", "video"):
            raise ValueError(f"modality must be 'image' or 'video', got {modality!r}")
        if token is None:
            token = os.environ.get(TOKEN_ENV) or None
        if token is not None and (not isinstance(token, str) or not token or any(c.isspace() for c in token)):
            raise ValueError(f"token must be a non-empty string without whitespace (or None), got a "
                             f"{type(token).__name__} of length {len(token) if isinstance(token, str) else '?'}")
        self.url = url.rstrip("/")
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.dtype, self.modality, self.name = dtype, modality, name
        if criterion is not None and (not isinstance(criterion, str) or not criterion):
            raise ValueError(f"criterion must be a criterion name of the served reward or None, got {criterion!r}")
        self.criterion = criterion
        # The served reward's criteria, logged like an in-process reward's (RewardSet looks for a
        # `criteria` method): only when asked for or when reading one, since a server without
        # --criteria has none.
        self._shared_answers = criterion is not None or bool(criteria)
        if self._shared_answers:
            self.criteria = self.fetch_criteria
        self._token = token
        # The jitter comes from the OS, not from the `random` module: the trainer seeds that one
        # identically on every rank, which would make every rank retry in lockstep again.
        self._jitter = random.SystemRandom()

    def _backoff(self, attempt: int) -> float:
        return self.backoff_s * 2 ** (attempt - 1) * self._jitter.uniform(0.5, 1.5)

    def _request(self, path: str, body: Optional[bytes]) -> Dict[str, Any]:
        attempts = self.retries + 1
        last_error = "no attempt made"
        headers = {"Content-Type": "application/json"}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        for attempt in range(attempts):
            if attempt:
                time.sleep(self._backoff(attempt))
            request = urllib.request.Request(
                self.url + path, data=body, method="POST" if body is not None else "GET", headers=headers,
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:
                message = _error_message(error)
                if 400 <= error.code < 500:
                    hint = ""
                    if error.code == 401:
                        hint = (f" (pass token=... to the remote reward or set {TOKEN_ENV} to the server's token)"
                                if self._token is None else f" (the token given, or {TOKEN_ENV}, does not match "
                                                            f"the server's)")
                    raise RemoteRewardError(
                        f"reward server {self.url} rejected the request (HTTP {error.code}): {message}{hint}"
                    ) from None
                last_error = f"HTTP {error.code}: {message}"
            except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError, OSError) as error:
                reason = getattr(error, "reason", error)
                last_error = f"{type(reason).__name__}: {reason}"
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                last_error = f"answer is not JSON: {error}"
        raise RemoteRewardError(
            f"reward server {self.url} failed after {attempts} attempts (timeout {self.timeout_s:g} s each); "
            f"last error: {last_error}"
        )

    def health(self) -> Dict[str, Any]:
        """The server's /health answer (raises RemoteRewardError when it is down)."""
        return self._request("/health", None)

    def _answer(self, images: torch.Tensor, prompts: Sequence[str], shared: bool) -> Dict[str, Any]:
        body = encode_request(images, prompts, self.dtype)
        if not shared:
            return self._request("/score", body)
        # Several entries reading criteria of one server (a VQ and an MQ entry) score one batch
        # with one request: the last answer per URL is kept, keyed by the request's digest.
        digest = hashlib.sha256(body).digest()
        with _LAST_ANSWER_LOCK:
            last = _LAST_ANSWER.get(self.url)
            if last is not None and last[0] == digest:
                return last[1]
        answer = self._request("/score", body)
        with _LAST_ANSWER_LOCK:
            _LAST_ANSWER[self.url] = (digest, answer)
        return answer

    def _scores(self, values: Any, answer: Any, count: int, what: str) -> torch.Tensor:
        if (not isinstance(values, list) or len(values) != count
                or not all(s is None or (isinstance(s, (int, float)) and not isinstance(s, bool)) for s in values)):
            raise RemoteRewardError(f"reward server {self.url} answered {answer!r:.200} instead of {count} {what}")
        # null: the server's reward produced NaN or +-inf for that sample (strict JSON has neither).
        return torch.tensor([float("nan") if s is None else float(s) for s in values], dtype=torch.float32)

    def _criteria_of(self, answer: Any) -> Dict[str, Any]:
        criteria = answer.get("criteria") if isinstance(answer, dict) else None
        if not isinstance(criteria, dict):
            raise RemoteRewardError(f"reward server {self.url} answered without per-criterion scores: start it with "
                                    f"--criteria (for a reward that has criteria)")
        return criteria

    def _score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        answer = self._answer(images, prompts, shared=self._shared_answers)
        if self.criterion is None:
            return self._scores(answer.get("scores") if isinstance(answer, dict) else None, answer,
                                images.shape[0], "scores")
        criteria = self._criteria_of(answer)
        if self.criterion not in criteria:
            raise RemoteRewardError(f"reward server {self.url} has no criterion {self.criterion!r}; it has "
                                    f"{sorted(criteria)}")
        return self._scores(criteria[self.criterion], answer, images.shape[0], f"{self.criterion} scores")

    def fetch_criteria(self, images: torch.Tensor, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """{criterion: (B,) float32 CPU} from a server started with --criteria (one request per
        batch_size chunk, shared with this batch's call). Also this reward's `criteria` method
        when it was built with criterion= or criteria=True."""
        validate_inputs(images, prompts, self.modality)
        prompts = list(prompts)
        chunk = self.batch_size or max(images.shape[0], 1)
        parts: Dict[str, List[torch.Tensor]] = {}
        for start in range(0, images.shape[0], chunk):
            part = images[start:start + chunk].clamp(0.0, 1.0)
            answer = self._answer(part, prompts[start:start + chunk], shared=True)
            for name, values in self._criteria_of(answer).items():
                parts.setdefault(name, []).append(self._scores(values, answer, part.shape[0], f"{name} scores"))
        return {name: torch.cat(values) for name, values in parts.items()}

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), "url": self.url, "timeout_s": self.timeout_s, "retries": self.retries,
                "authenticated": self._token is not None, "criterion": self.criterion}


def _error_message(error: urllib.error.HTTPError) -> str:
    """The server's {"error": ...} text, at most 500 characters (a proxy may answer anything)."""
    try:
        body = error.read(65536)
        return str(json.loads(body).get("error", body[:300]))[:500]
    except Exception:
        return str(error.reason)[:500]
