"""An HTTP server for any registered reward, batching concurrent requests.

    DANCEGRPO_REWARD_TOKEN=$(cat /secrets/reward_token) python -m dancegrpo_fast.rewards.serve --reward hps \
        --reward-kwargs '{"checkpoint_path": "/models/HPS_v2.1_compressed.pt",
                          "tokenizer_path": "/models/CLIP-ViT-H-14-laion2B-s32B-b79K", "device": "cuda"}' \
        --host 10.0.0.5 --port 8000 --max-batch 32 --max-wait-ms 20

Endpoints: GET /health; POST /score (wire format in `dancegrpo_fast.rewards.remote`). Requests
that arrive within max-wait-ms of the first one waiting are scored together, at most max-batch
samples per reward call (requests with different image sizes go to different batches; a request
larger than max-batch is scored in several calls). When a batch fails, each of its requests is
scored again on its own, so only the request that caused the failure gets the error.

Answers: 200 with the scores (null where the reward gave NaN/inf; with --criteria, also each
criterion's scores for a reward that has criteria); 400 for a malformed request
or inputs outside the limits; 401 without the right bearer token (when the server has one);
413 for a body or a request larger than the limits; 422 for inputs the reward itself rejects
(e.g. a prompt it cannot parse); 500 when the reward failed; 503 when the server is busy
(connections or bytes in flight at their limit). Error messages are short and never quote the
request. Limits (flags): body size, samples per request, image side, prompt length, socket read
timeout (also a deadline for a whole request to arrive), concurrent connections, bytes of
request bodies in flight, listen queue. Port 0 picks a free port; the first line on stdout says
where it listens.
"""

from __future__ import annotations

import argparse
import collections
import hmac
import ipaddress
import json
import os
import queue
import re
import signal
import socket
import sys
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import clip_models, hps, remote, rule_based, videoalign  # noqa: F401  (register the built-in rewards)
from .base import Reward, available_rewards, build_reward, import_reward_modules, validate_inputs, validate_layout
from .remote import TOKEN_ENV, WireFormatError, images_to_float, request_from_payload, request_payload, request_text

__all__ = ["RewardServer", "main", "DEFAULT_LIMITS"]

# Defaults of the limits (flags of the same names, with dashes). max_body_mb: a chunk of 32
# 1024x1024 images in uint8 is about 134 MB of base64; raise it for long videos.
DEFAULT_LIMITS = {"max_body_mb": 128.0, "max_samples": 256, "max_side": 8192, "max_prompt_chars": 10_000,
                  "read_timeout_s": 30.0, "max_connections": 64, "backlog": 128}
# A body must arrive at least this fast (on top of read_timeout_s), so a client trickling bytes
# cannot hold a connection for ever.
MIN_BODY_BYTES_PER_S = 1 << 20
MAX_MESSAGE_CHARS = 300
# Bodies up to this size are read and dropped on a 404/401 answer to keep the connection usable.
_DRAIN_LIMIT = 1 << 16
_MiB = 1 << 20


class _Pending:
    __slots__ = ("images", "prompts", "future")

    def __init__(self, images: torch.Tensor, prompts: List[str]):
        self.images, self.prompts, self.future = images, prompts, Future()


def public_message(error: BaseException, prompts: Sequence[str] = ()) -> str:
    """One short line about `error` for a client, quoting none of its input: the request's
    prompts become prompts[i], any other long quoted text or long word becomes <N chars>, and
    the whole is cut at MAX_MESSAGE_CHARS (a 10 MB prompt must not come back as a 20 MB error)."""
    text = str(error)
    if len(text) > 50 * MAX_MESSAGE_CHARS:
        text = text[: 50 * MAX_MESSAGE_CHARS]  # enough for the substitutions to see the start
    for index in sorted(range(len(prompts)), key=lambda i: -len(prompts[i])):
        prompt = prompts[index]
        if prompt:
            text = text.replace(repr(prompt), f"prompts[{index}]")
            if len(prompt) >= 8:
                text = text.replace(prompt, f"prompts[{index}]")
    text = re.sub(r"'[^'\n]{40,}'?|\"[^\"\n]{40,}\"?", lambda m: f"<{len(m.group(0))} chars>", text)
    text = re.sub(r"\S{60,}", lambda m: f"<{len(m.group(0))} chars>", text)
    text = " ".join(text.split())
    message = f"{type(error).__name__}: {text}"
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 3] + "..."


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a listen queue of `backlog` and at most `owner.max_connections`
    connection threads; a connection over the limit gets a 503 from the accepting thread."""

    daemon_threads = True

    def __init__(self, address, handler, owner: "RewardServer", backlog: int):
        self.request_queue_size = backlog  # read by server_activate's listen()
        self.owner = owner
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self.owner._slots.acquire(blocking=False):
            self.owner._reject_busy(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.owner._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.owner._slots.release()

    def handle_error(self, request, client_address):
        # A client that went away mid-answer is not the server's problem: count it, stay quiet.
        # Anything else is a bug of the server: print its traceback (socketserver's default).
        self.owner._count("connection_errors")
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class RewardServer:
    """Serve `reward` over HTTP on (host, port) with dynamic batching.

    `start()` serves from background threads and returns; `serve_forever()` blocks; `close()`
    stops. `port` holds the bound port (useful with port=0). Limits (see DEFAULT_LIMITS):
    max_body_mb (request body), max_samples (per request), max_side (H and W), max_prompt_chars,
    read_timeout_s (the longest silence while a request or answer is in transit, and the time a
    request's line and headers may take), max_connections (open connections; more get 503),
    backlog (the listen queue), max_inflight_mb (bytes of request bodies being read or scored at
    once; more get 503; default 4 * max_body_mb). token: when set, every request needs
    `Authorization: Bearer <token>` (401 otherwise).
    """

    def __init__(self, reward: Reward, host: str = "127.0.0.1", port: int = 0, max_batch: int = 32,
                 max_wait_ms: float = 10.0, request_timeout_s: float = 600.0, *,
                 max_body_mb: float = DEFAULT_LIMITS["max_body_mb"], max_samples: int = DEFAULT_LIMITS["max_samples"],
                 max_side: int = DEFAULT_LIMITS["max_side"], max_prompt_chars: int = DEFAULT_LIMITS["max_prompt_chars"],
                 read_timeout_s: float = DEFAULT_LIMITS["read_timeout_s"],
                 max_connections: int = DEFAULT_LIMITS["max_connections"], backlog: int = DEFAULT_LIMITS["backlog"],
                 max_inflight_mb: Optional[float] = None, token: Optional[str] = None, criteria: bool = False):
        for name, value in (("max_batch", max_batch), ("max_samples", max_samples), ("max_side", max_side),
                            ("max_prompt_chars", max_prompt_chars), ("max_connections", max_connections),
                            ("backlog", backlog)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name, value in (("max_body_mb", max_body_mb), ("read_timeout_s", read_timeout_s),
                            ("request_timeout_s", request_timeout_s)):
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if not (isinstance(max_wait_ms, (int, float)) and max_wait_ms >= 0):
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms!r}")
        if max_inflight_mb is None:
            max_inflight_mb = 4 * max_body_mb
        if not (isinstance(max_inflight_mb, (int, float)) and max_inflight_mb >= max_body_mb):
            raise ValueError(f"max_inflight_mb must be >= max_body_mb = {max_body_mb:g} (one request of the largest "
                             f"size must fit), got {max_inflight_mb!r}")
        if token is not None and (not isinstance(token, str) or not token or any(c.isspace() for c in token)):
            raise ValueError("token must be a non-empty string without whitespace, or None")
        self.reward = reward
        self.max_batch, self.max_wait_s = int(max_batch), float(max_wait_ms) / 1000.0
        self.request_timeout_s = float(request_timeout_s)
        self.max_body_mb, self.max_body_bytes = float(max_body_mb), int(max_body_mb * _MiB)
        self.max_inflight_mb, self.max_inflight_bytes = float(max_inflight_mb), int(max_inflight_mb * _MiB)
        self.max_samples, self.max_side, self.max_prompt_chars = max_samples, max_side, max_prompt_chars
        self.read_timeout_s, self.max_connections, self.backlog = float(read_timeout_s), max_connections, backlog
        self._token = token.encode("utf-8") if token else None
        # criteria: answers also carry the reward's per-criterion scores ({"criteria": {name: [...]}}),
        # for a reward with a criteria(images, prompts) method (e.g. videoalign's VQ, MQ, TA).
        if criteria and not callable(getattr(reward, "criteria", None)):
            raise ValueError(f"criteria: the reward {reward.name!r} has no criteria(images, prompts) method")
        self.criteria = bool(criteria)
        self._criteria_names: Optional[List[str]] = None
        self._queue: "queue.Queue[Optional[_Pending]]" = queue.Queue()
        self._stats_lock = threading.Lock()
        self.stats = {"requests": 0, "samples": 0, "batches": 0, "largest_batch": 0, "errors": 0,
                      "isolated_batches": 0, "timeouts": 0, "busy": 0, "unauthorized": 0, "connection_errors": 0}
        self._slots = threading.BoundedSemaphore(max_connections)
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        # id(handler) -> [socket, deadline or None, expired]: the reaper shuts down connections
        # past their deadline (a per-read socket timeout alone lets a trickle of bytes go on).
        self._connections: Dict[int, list] = {}
        self._connections_lock = threading.Lock()
        # Sockets answered 503 from the accepting thread, closed by the reaper a moment later
        # (closing at once, with the request unread, would reset the connection before the
        # client reads the 503).
        self._rejected: "collections.deque" = collections.deque()
        self._rejected_lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = _HTTPServer((host, port), self._handler_class(), self, backlog)
        self.host, self.port = self._httpd.server_address[:2]
        self._batcher = threading.Thread(target=self._batch_loop, name="reward-batcher", daemon=True)
        self._reaper = threading.Thread(target=self._reap_loop, name="reward-reaper", daemon=True)
        self._server_thread: Optional[threading.Thread] = None
        self._batcher.start()
        self._reaper.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def limits(self) -> Dict[str, Any]:
        return {"max_batch": self.max_batch, "max_body_mb": self.max_body_mb, "max_samples": self.max_samples,
                "max_side": self.max_side, "max_prompt_chars": self.max_prompt_chars,
                "read_timeout_s": self.read_timeout_s, "max_connections": self.max_connections,
                "backlog": self.backlog, "max_inflight_mb": self.max_inflight_mb,
                "authenticated": self._token is not None, "criteria": self.criteria}

    # -- batching -------------------------------------------------------------------------------

    def submit(self, images: torch.Tensor, prompts: List[str]) -> Future:
        pending = _Pending(images, prompts)
        self._queue.put(pending)
        return pending.future

    def _batch_loop(self) -> None:
        # Requests that did not fit the current batch (another image size, or max_batch reached)
        # wait here, in arrival order, for the next ones.
        held: List[_Pending] = []
        stopping = False
        while True:
            if held:
                first = held.pop(0)
            elif stopping:
                return
            else:
                first = self._queue.get()
                if first is None:
                    return
            batch, size = [first], first.images.shape[0]
            deadline = time.monotonic() + self.max_wait_s

            def fits(item: _Pending) -> bool:
                return item.images.shape[1:] == first.images.shape[1:] and size + item.images.shape[0] <= self.max_batch

            for item in list(held):
                if fits(item):
                    held.remove(item)
                    batch.append(item)
                    size += item.images.shape[0]
            while size < self.max_batch and not stopping:
                remaining = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                elif fits(item):
                    batch.append(item)
                    size += item.images.shape[0]
                else:
                    held.append(item)
            self._run_batch(batch)

    def _score(self, items: Sequence[_Pending]) -> torch.Tensor:
        """The scores of the items' samples in order, calling the reward on at most max_batch
        samples at a time; each chunk is converted to float32 only when it is scored."""
        outputs: List[torch.Tensor] = []
        images: List[torch.Tensor] = []
        prompts: List[str] = []

        def flush() -> None:
            if not images:
                return
            chunk = torch.cat(images) if len(images) > 1 else images[0]
            scores = self.reward(chunk, prompts)
            if scores.shape != (chunk.shape[0],):
                raise RuntimeError(f"reward returned {tuple(scores.shape)} scores for {chunk.shape[0]} samples")
            if self.criteria:
                # One row per sample: the score, then each criterion in a fixed order.
                parts = self.reward.criteria(chunk, prompts)
                if self._criteria_names is None:
                    self._criteria_names = list(parts)
                if list(parts) != self._criteria_names:
                    raise RuntimeError(f"reward criteria changed from {self._criteria_names} to {list(parts)}")
                scores = torch.stack([scores] + [torch.as_tensor(parts[n]).float().reshape(-1) for n in parts], dim=1)
            outputs.append(scores)
            with self._stats_lock:
                self.stats["batches"] += 1
                self.stats["largest_batch"] = max(self.stats["largest_batch"], chunk.shape[0])
            images.clear()
            prompts.clear()

        count = 0
        for item in items:
            total, start = item.images.shape[0], 0
            while start < total:
                take = min(total - start, self.max_batch - count)
                images.append(images_to_float(item.images[start:start + take]))
                prompts.extend(item.prompts[start:start + take])
                start += take
                count += take
                if count == self.max_batch:
                    flush()
                    count = 0
        flush()
        return torch.cat(outputs) if outputs else torch.zeros(0)

    def _run_batch(self, batch: Sequence[_Pending]) -> None:
        try:
            scores = self._score(batch)
        except Exception as error:
            if len(batch) == 1:
                batch[0].future.set_exception(error)
                return
            # One request's bad input (or one sample that breaks the reward) must not fail the
            # others that happened to arrive at the same moment: score each request on its own.
            self._count("isolated_batches")
            for item in batch:
                try:
                    item.future.set_result(self._score([item]))
                except Exception as own_error:
                    item.future.set_exception(own_error)
            return
        start = 0
        for item in batch:
            count = item.images.shape[0]
            item.future.set_result(scores[start:start + count])
            start += count

    # -- connections ---------------------------------------------------------------------------

    def _track(self, handler, seconds: Optional[float]) -> None:
        deadline = None if seconds is None else time.monotonic() + seconds
        with self._connections_lock:
            entry = self._connections.get(id(handler))
            if entry is None:
                self._connections[id(handler)] = [handler.connection, deadline, False]
            else:
                entry[1] = deadline

    def _untrack(self, handler) -> bool:
        """Forget the connection; True when the reaper had cut it."""
        with self._connections_lock:
            entry = self._connections.pop(id(handler), None)
        return bool(entry and entry[2])

    def _expired(self, handler) -> bool:
        with self._connections_lock:
            entry = self._connections.get(id(handler))
            return bool(entry and entry[2])

    def _reap_loop(self) -> None:
        interval = min(0.1, self.read_timeout_s / 4)
        while not self._stopping.wait(interval):
            now = time.monotonic()
            with self._connections_lock:
                late = [entry for entry in self._connections.values()
                        if entry[1] is not None and entry[1] < now and not entry[2]]
                for entry in late:
                    entry[2] = True
            for entry in late:
                self._count("timeouts")
                try:
                    entry[0].shutdown(socket.SHUT_RDWR)  # wakes the handler blocked in recv/send
                except OSError:
                    pass
            with self._rejected_lock:
                done = []
                while self._rejected and now - self._rejected[0][1] > 1.0:
                    done.append(self._rejected.popleft()[0])
            for sock in done:
                self._close_quietly(sock)

    @staticmethod
    def _close_quietly(sock) -> None:
        try:
            sock.close()
        except OSError:
            pass

    def _reject_busy(self, sock) -> None:
        """From the accepting thread: a 503 for a connection over max_connections."""
        self._count("busy")
        body = json.dumps({"error": f"server busy: all max_connections={self.max_connections} connections are in "
                                    f"use; retry later"}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            sock.setblocking(False)  # a small answer fits the socket buffer; never wait here
            sock.send(head + body)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close_quietly(sock)
            return
        with self._rejected_lock:
            self._rejected.append((sock, time.monotonic()))
            # A flood of connections: close the oldest answered ones now.
            overflow = [self._rejected.popleft()[0] for _ in range(len(self._rejected) - 4 * self.max_connections)]
        for old in overflow:
            self._close_quietly(old)

    def _reserve(self, size: int) -> bool:
        with self._inflight_lock:
            if self._inflight and self._inflight + size > self.max_inflight_bytes:
                return False
            self._inflight += size
            return True

    def _release(self, size: int) -> None:
        with self._inflight_lock:
            self._inflight -= size

    def _authorized(self, header: Optional[str]) -> bool:
        if self._token is None:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer "):].strip().encode("utf-8"), self._token)

    # -- HTTP ----------------------------------------------------------------------------------

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = server.read_timeout_s  # per read/write; setup() applies it to the socket

            def log_message(self, format: str, *args: Any) -> None:  # quiet by default
                pass

            def setup(self) -> None:
                super().setup()
                server._track(self, server.read_timeout_s)

            def finish(self) -> None:
                try:
                    super().finish()
                except OSError:
                    pass
                finally:
                    server._untrack(self)

            def handle_one_request(self) -> None:
                # The request line and headers (or, on a kept-alive connection, the next request)
                # must arrive within read_timeout_s.
                server._track(self, server.read_timeout_s)
                try:
                    super().handle_one_request()
                except OSError:
                    # The reaper cut the connection, or the client reset it.
                    self.close_connection = True

            def _send(self, status: int, payload: Dict[str, Any], close: bool = False,
                      headers: Optional[Dict[str, str]] = None) -> None:
                if status >= 400:
                    server._count("errors")
                body = json.dumps(payload, allow_nan=False).encode("utf-8")
                server._track(self, server.read_timeout_s)  # the client must take the answer in time
                if close:
                    self.close_connection = True
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                if close:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def _error(self, status: int, message: str, **kwargs: Any) -> None:
                self._send(status, {"error": message[:MAX_MESSAGE_CHARS]}, **kwargs)

            def _check_token(self) -> bool:
                if server._authorized(self.headers.get("Authorization")):
                    return True
                server._count("unauthorized")
                # The body (if any) stays unread: close the connection after the answer.
                self._error(401, f"this server needs 'Authorization: Bearer <token>' with its token (the server's "
                                 f"--token or {TOKEN_ENV})", close=True,
                            headers={"WWW-Authenticate": 'Bearer realm="reward"'})
                return False

            def do_GET(self) -> None:
                if not self._check_token():
                    return
                if self.path.rstrip("/") in ("/health", ""):
                    with server._stats_lock:
                        stats = dict(server.stats)
                    self._send(200, {"status": "ok", "reward": server.reward.describe(), "max_batch": server.max_batch,
                                     "max_wait_ms": server.max_wait_s * 1000.0, "limits": server.limits(),
                                     "stats": stats})
                else:
                    self._error(404, "unknown path; use GET /health or POST /score")

            def do_POST(self) -> None:
                length_header = self.headers.get("Content-Length")
                length = int(length_header) if length_header and length_header.isdigit() else None
                if self.path.rstrip("/") != "/score":
                    small = length is not None and length <= _DRAIN_LIMIT
                    if small:
                        self.rfile.read(length)
                    self._error(404, "unknown path; use POST /score", close=not small)
                    return
                if not self._check_token():
                    return
                if length is None or self.headers.get("Transfer-Encoding"):
                    self._error(411, "a Content-Length header is required (no chunked bodies)", close=True)
                    return
                if length > server.max_body_bytes:
                    self._error(413, f"body of {length} bytes exceeds this server's limit of {server.max_body_bytes} "
                                     f"bytes (max_body_mb={server.max_body_mb:g}); send smaller chunks", close=True)
                    return
                if not server._reserve(length):
                    server._count("busy")
                    self._error(503, f"server busy: more than max_inflight_mb={server.max_inflight_mb:g} MB of "
                                     f"requests in flight; retry later", close=True, headers={"Retry-After": "1"})
                    return
                try:
                    self._score_request(length)
                finally:
                    server._release(length)

            def _read_body(self, length: int) -> Optional[bytearray]:
                """The body in 1 MiB reads (memory grows with what arrives, not with what is
                announced), within read_timeout_s plus the time MIN_BODY_BYTES_PER_S needs."""
                server._track(self, server.read_timeout_s + length / MIN_BODY_BYTES_PER_S)
                body = bytearray()
                try:
                    while len(body) < length:
                        chunk = self.rfile.read(min(_MiB, length - len(body)))
                        if not chunk:
                            break
                        body += chunk
                except OSError:  # socket timeout, or the reaper cut it
                    pass
                if len(body) < length:
                    self.close_connection = True
                    if not server._expired(self):
                        server._count("timeouts")
                    return None
                server._track(self, None)  # scoring time is the server's, not the client's
                return body

            def _score_request(self, length: int) -> None:
                body = self._read_body(length)
                if body is None:
                    return  # nobody is listening for an answer any more
                prompts: List[str] = []
                try:
                    # Each intermediate (body, text, parsed JSON) is dropped as soon as the next
                    # exists: a request peaks at about twice its body, then holds its raw array.
                    text = request_text(body)
                    del body
                    payload = request_payload(text)
                    del text
                    images, prompts = request_from_payload(payload, server.max_samples, server.max_side,
                                                           server.max_prompt_chars)
                    del payload
                    validate_layout(images.shape, prompts, server.reward.modality)
                    if images.is_floating_point():
                        validate_inputs(images, prompts, server.reward.modality)
                except WireFormatError as error:
                    self._error(error.status, str(error))
                    return
                except (ValueError, TypeError) as error:  # RewardInputError included
                    self._error(400, public_message(error, prompts))
                    return
                server._count("requests", samples=images.shape[0])
                future = server.submit(images, prompts)
                del images
                try:
                    scores = future.result(timeout=server.request_timeout_s)
                except FutureTimeout:
                    self._error(503, f"scoring took longer than request_timeout_s={server.request_timeout_s:g}")
                    return
                except (ValueError, TypeError) as error:
                    # Raised by the reward on this request alone (the batch was split): inputs it
                    # does not accept, e.g. a prompt outside its grammar. Retrying cannot help.
                    self._error(422, public_message(error, prompts))
                    return
                except Exception as error:
                    self._error(500, public_message(error, prompts))
                    return
                def as_json(values: torch.Tensor) -> List[Optional[float]]:
                    return [float(s) if torch.isfinite(s) else None for s in values]

                if scores.dim() == 2:  # the server's criteria: column 0 the score, then the criteria
                    self._send(200, {"scores": as_json(scores[:, 0]),
                                     "criteria": {name: as_json(scores[:, 1 + k])
                                                  for k, name in enumerate(server._criteria_names or [])}})
                else:
                    self._send(200, {"scores": as_json(scores)})

        return Handler

    def _count(self, key: str, samples: int = 0) -> None:
        with self._stats_lock:
            self.stats[key] += 1
            self.stats["samples"] += samples

    # -- lifetime ------------------------------------------------------------------------------

    def start(self) -> "RewardServer":
        self._server_thread = threading.Thread(target=self._httpd.serve_forever, name="reward-http", daemon=True)
        self._server_thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def close(self) -> None:
        if self._server_thread is not None:
            self._httpd.shutdown()
        self._httpd.server_close()
        self._stopping.set()
        self._queue.put(None)
        self._batcher.join(timeout=5)
        self._reaper.join(timeout=5)
        with self._rejected_lock:
            rejected, self._rejected = list(self._rejected), collections.deque()
        for sock, _ in rejected:
            self._close_quietly(sock)

    def __enter__(self) -> "RewardServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dancegrpo_fast.rewards.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward", required=True, help=f"registered reward: {', '.join(available_rewards())}, or "
                                                         f"one that a --reward-module registers")
    parser.add_argument("--reward-module", action="append", default=[], dest="reward_modules",
                        help="module to import first, which registers rewards (repeatable; e.g. "
                             "dancegrpo_fast.tiny.reward for tiny_geneval, or your own)")
    parser.add_argument("--reward-kwargs", default="{}", help="JSON object of the reward's keyword arguments")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind; beyond localhost use --token (or a private network)")
    parser.add_argument("--port", type=int, default=8000, help="port (0 picks a free one)")
    parser.add_argument("--max-batch", type=int, default=32, help="most samples scored in one reward call")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a batch waits for more requests")
    parser.add_argument("--request-timeout-s", type=float, default=600.0,
                        help="longest a request waits for its scores (then 503)")
    parser.add_argument("--max-body-mb", type=float, default=DEFAULT_LIMITS["max_body_mb"],
                        help="largest request body in MiB (413 beyond)")
    parser.add_argument("--max-samples", type=int, default=DEFAULT_LIMITS["max_samples"],
                        help="most samples in one request (413 beyond)")
    parser.add_argument("--max-side", type=int, default=DEFAULT_LIMITS["max_side"],
                        help="largest image height or width in pixels (400 beyond)")
    parser.add_argument("--max-prompt-chars", type=int, default=DEFAULT_LIMITS["max_prompt_chars"],
                        help="longest prompt in characters (400 beyond)")
    parser.add_argument("--read-timeout-s", type=float, default=DEFAULT_LIMITS["read_timeout_s"],
                        help="longest silence of a client while it sends a request or reads an answer, and the "
                             "time its request line and headers may take")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_LIMITS["max_connections"],
                        help="open connections served at once (503 beyond)")
    parser.add_argument("--max-inflight-mb", type=float, default=None,
                        help="MiB of request bodies read or scored at once (503 beyond; default 4 x --max-body-mb)")
    parser.add_argument("--backlog", type=int, default=DEFAULT_LIMITS["backlog"],
                        help="listen queue of connections not yet accepted")
    parser.add_argument("--token", default=None,
                        help=f"bearer token every request must carry (default: the {TOKEN_ENV} environment "
                             f"variable; unset = no authentication). Prefer the variable: flags show in `ps`")
    parser.add_argument("--criteria", action="store_true",
                        help="answers also carry the reward's per-criterion scores (rewards with criteria, e.g. "
                             "videoalign's VQ, MQ, TA); the remote reward's criterion= reads one of them")
    args = parser.parse_args(argv)
    try:
        import_reward_modules(args.reward_modules)
    except ValueError as error:
        parser.error(str(error))
    if args.reward not in available_rewards():
        parser.error(f"--reward {args.reward!r} is not registered; known: {', '.join(available_rewards())} "
                     f"(a reward of your own: name its module with --reward-module)")
    try:
        args.reward_kwargs = json.loads(args.reward_kwargs)
    except json.JSONDecodeError as error:
        parser.error(f"--reward-kwargs is not valid JSON: {error}")
    if not isinstance(args.reward_kwargs, dict):
        parser.error("--reward-kwargs must be a JSON object")
    for flag in ("max_batch", "max_samples", "max_side", "max_prompt_chars", "max_connections", "backlog"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be an integer >= 1, got {getattr(args, flag)}")
    for flag in ("max_body_mb", "read_timeout_s", "request_timeout_s"):
        if not getattr(args, flag) > 0:
            parser.error(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    if args.max_wait_ms < 0:
        parser.error(f"--max-wait-ms must be >= 0, got {args.max_wait_ms}")
    if args.max_inflight_mb is not None and not args.max_inflight_mb >= args.max_body_mb:
        parser.error(f"--max-inflight-mb must be >= --max-body-mb ({args.max_body_mb:g}), got {args.max_inflight_mb}")
    if args.token is None:
        args.token = os.environ.get(TOKEN_ENV) or None
    if args.token is not None and (not args.token or any(c.isspace() for c in args.token)):
        parser.error(f"--token (or {TOKEN_ENV}) must be non-empty and without whitespace")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    reward = build_reward(args.reward, **args.reward_kwargs)
    server = RewardServer(reward, args.host, args.port, args.max_batch, args.max_wait_ms, args.request_timeout_s,
                          max_body_mb=args.max_body_mb, max_samples=args.max_samples, max_side=args.max_side,
                          max_prompt_chars=args.max_prompt_chars, read_timeout_s=args.read_timeout_s,
                          max_connections=args.max_connections, backlog=args.backlog,
                          max_inflight_mb=args.max_inflight_mb, token=args.token, criteria=args.criteria)
    if args.token is None and not _is_loopback(args.host):
        print(f"warning: serving on {args.host} without a token: anyone who can reach this port can use the reward "
              f"server; set {TOKEN_ENV} (or --token) on the server and the clients, or bind to a private network",
              file=sys.stderr, flush=True)
    print(f"reward server: serving {reward.name!r} on {server.url} (pid {os.getpid()})", flush=True)

    def stop(signum, frame):  # SIGTERM -> leave serve_forever like Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
