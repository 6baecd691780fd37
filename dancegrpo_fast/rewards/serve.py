"""An HTTP server for any registered reward, batching concurrent requests.

    python -m dancegrpo_fast.rewards.serve --reward hps \
        --reward-kwargs '{"checkpoint_path": "/models/HPS_v2.1_compressed.pt",
                          "tokenizer_path": "/models/CLIP-ViT-H-14-laion2B-s32B-b79K", "device": "cuda"}' \
        --host 0.0.0.0 --port 8000 --max-batch 32 --max-wait-ms 20

Endpoints: GET /health; POST /score (wire format in `dancegrpo_fast.rewards.remote`). Requests
that arrive within max-wait-ms of the first one waiting are scored together, up to max-batch
samples (requests with different image sizes go to different batches). A malformed request gets
a 400 JSON error; a reward failure a 500 JSON error; the server keeps serving either way.
Port 0 picks a free port; the first line on stdout says where it listens.
"""

from __future__ import annotations

import argparse
import json
import queue
import signal
import sys
import threading
import time
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Sequence

import torch

from .base import Reward, RewardInputError, build_reward, validate_inputs
from .remote import decode_request

__all__ = ["RewardServer", "main"]

MAX_BODY_BYTES = 1 << 30


class _Pending:
    __slots__ = ("images", "prompts", "future")

    def __init__(self, images: torch.Tensor, prompts: List[str]):
        self.images, self.prompts, self.future = images, prompts, Future()


class RewardServer:
    """Serve `reward` over HTTP on (host, port) with dynamic batching.

    `start()` serves from background threads and returns; `serve_forever()` blocks; `close()`
    stops. `port` holds the bound port (useful with port=0).
    """

    def __init__(self, reward: Reward, host: str = "127.0.0.1", port: int = 0, max_batch: int = 32,
                 max_wait_ms: float = 10.0, request_timeout_s: float = 600.0):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"need max_batch >= 1 and max_wait_ms >= 0, got {max_batch}, {max_wait_ms}")
        self.reward = reward
        self.max_batch, self.max_wait_s = int(max_batch), float(max_wait_ms) / 1000.0
        self.request_timeout_s = request_timeout_s
        self._queue: "queue.Queue[Optional[_Pending]]" = queue.Queue()
        self._stats_lock = threading.Lock()
        self.stats = {"requests": 0, "samples": 0, "batches": 0, "largest_batch": 0, "errors": 0}
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self.host, self.port = self._httpd.server_address[:2]
        self._batcher = threading.Thread(target=self._batch_loop, name="reward-batcher", daemon=True)
        self._server_thread: Optional[threading.Thread] = None
        self._batcher.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

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

    def _run_batch(self, batch: Sequence[_Pending]) -> None:
        images = torch.cat([item.images for item in batch]) if len(batch) > 1 else batch[0].images
        prompts = [prompt for item in batch for prompt in item.prompts]
        try:
            scores = self.reward(images, prompts)
        except Exception as error:  # every waiting request learns why
            for item in batch:
                item.future.set_exception(error)
            return
        with self._stats_lock:
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], images.shape[0])
        start = 0
        for item in batch:
            count = item.images.shape[0]
            item.future.set_result(scores[start : start + count])
            start += count

    # -- HTTP ----------------------------------------------------------------------------------

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet by default
                pass

            def _send(self, status: int, payload: Dict[str, Any]) -> None:
                body = json.dumps(payload).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path.rstrip("/") in ("/health", ""):
                    with server._stats_lock:
                        stats = dict(server.stats)
                    self._send(200, {"status": "ok", "reward": server.reward.describe(), "max_batch": server.max_batch,
                                     "max_wait_ms": server.max_wait_s * 1000.0, "stats": stats})
                else:
                    self._send(404, {"error": f"unknown path {self.path}; use GET /health or POST /score"})

            def do_POST(self) -> None:
                if self.path.rstrip("/") != "/score":
                    self._drain()
                    self._send(404, {"error": f"unknown path {self.path}; use POST /score"})
                    return
                length = self.headers.get("Content-Length")
                if length is None or not length.isdigit():
                    self.close_connection = True
                    self._send(411, {"error": "Content-Length header required"})
                    return
                if int(length) > MAX_BODY_BYTES:
                    self.close_connection = True
                    self._send(413, {"error": f"body of {length} bytes exceeds {MAX_BODY_BYTES}"})
                    return
                body = self.rfile.read(int(length))
                try:
                    images, prompts = decode_request(body)
                    validate_inputs(images, prompts, server.reward.modality)
                except (ValueError, TypeError, RewardInputError) as error:
                    server._count("errors")
                    self._send(400, {"error": f"bad request: {error}"})
                    return
                server._count("requests", samples=images.shape[0])
                future = server.submit(images, prompts)
                try:
                    scores = future.result(timeout=server.request_timeout_s)
                except Exception as error:
                    server._count("errors")
                    status = 400 if isinstance(error, (RewardInputError, TypeError)) else 500
                    self._send(status, {"error": f"{type(error).__name__}: {error}"})
                    return
                self._send(200, {"scores": [float(s) for s in scores]})

            def _drain(self) -> None:
                length = self.headers.get("Content-Length")
                if length and length.isdigit() and int(length) <= MAX_BODY_BYTES:
                    self.rfile.read(int(length))

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
        self._queue.put(None)
        self._batcher.join(timeout=5)

    def __enter__(self) -> "RewardServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    import dancegrpo_fast.rewards  # noqa: F401  (registers the built-in rewards)
    from .base import available_rewards

    parser = argparse.ArgumentParser(prog="python -m dancegrpo_fast.rewards.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward", required=True, help=f"registered reward: {', '.join(available_rewards())}")
    parser.add_argument("--reward-kwargs", default="{}", help="JSON object of the reward's keyword arguments")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port (0 picks a free one)")
    parser.add_argument("--max-batch", type=int, default=32, help="most samples scored in one reward call")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a batch waits for more requests")
    args = parser.parse_args(argv)
    try:
        args.reward_kwargs = json.loads(args.reward_kwargs)
    except json.JSONDecodeError as error:
        parser.error(f"--reward-kwargs is not valid JSON: {error}")
    if not isinstance(args.reward_kwargs, dict):
        parser.error("--reward-kwargs must be a JSON object")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    reward = build_reward(args.reward, **args.reward_kwargs)
    server = RewardServer(reward, args.host, args.port, args.max_batch, args.max_wait_ms)
    print(f"reward server: serving {reward.name!r} on {server.url} (pid {__import__('os').getpid()})", flush=True)

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
