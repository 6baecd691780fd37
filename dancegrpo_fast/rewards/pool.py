"""Overlap reward computation with rollout: `AsyncRewardPool.submit(images, prompts) -> Future`.

How the trainer uses it (pipelining inside one iteration, which keeps GRPO exactly on-policy):
the iteration's prompts are rolled out in chunks; as soon as a chunk is decoded its rewards are
submitted, and the policy samples the next chunk while a worker thread scores the previous one.
Only the last chunk's rewards are waited for before the advantages are computed.

    pool = AsyncRewardPool(rewards)                  # a Reward, RewardSet or any callable
    futures = []
    for chunk in prompt_chunks:                      # e.g. G prompts' groups per chunk
        trajectory = rollout(policy, chunk)          # GPU busy sampling
        futures.append(pool.submit(trajectory.images, chunk.prompts))   # scored in the background
    scores = [future.result() for future in futures] # only the last chunk is still running
    ...advantages, update...
    pool.close()

Overlapping across iterations (score iteration k while iteration k+1 samples) is also possible
with the same API, but then k+1 is sampled by the policy before k's update: one step
off-policy, so the ratio at the first step is no longer exactly 1 (SPEC 2). The trainer should
only do that knowingly.

Threads, not processes: torch kernels and PIL's JPEG encoder release the GIL, HTTP calls to a
reward server wait on sockets, and a model reward stays loaded once, in this process. With CUDA
inputs each worker runs on its own CUDA stream that first waits for the work that produced the
images, so the reward model's kernels can run beside the rollout's.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

import torch

__all__ = ["AsyncRewardPool"]


class AsyncRewardPool:
    """A small thread pool computing rewards in the background.

    reward_fn: any callable (images, prompts) -> result: a Reward (result (B,) float32), a
    RewardSet (result {name: (B,)}), a RemoteReward. num_workers: concurrent calls (1 keeps
    the reward model's memory use flat; raise it for remote rewards). clone_inputs: copy the
    images before returning from submit, so the caller may overwrite its buffers at once.
    """

    def __init__(self, reward_fn: Callable[[torch.Tensor, Sequence[str]], Any], num_workers: int = 1,
                 clone_inputs: bool = False):
        if not callable(reward_fn):
            raise TypeError(f"reward_fn must be callable, got {type(reward_fn).__name__}")
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be a positive int, got {num_workers!r}")
        self.reward_fn = reward_fn
        self.num_workers = num_workers
        self.clone_inputs = clone_inputs
        self._executor = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="reward")
        self._streams = threading.local()
        self._closed = False

    def submit(self, images: torch.Tensor, prompts: Sequence[str]) -> Future:
        """Start scoring; returns a concurrent.futures.Future of reward_fn(images, prompts).
        Exceptions of the reward are raised by future.result()."""
        if self._closed:
            raise RuntimeError("AsyncRewardPool is closed")
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        prompts = list(prompts)
        images = images.detach()
        ready = None
        if images.is_cuda:
            # The producer's kernels may still be queued: the worker's stream waits for them.
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(images.device))
        if self.clone_inputs:
            images = images.clone()
        return self._executor.submit(self._run, images, prompts, ready)

    def _run(self, images: torch.Tensor, prompts: Sequence[str], ready: Optional["torch.cuda.Event"]) -> Any:
        if ready is None:
            return self.reward_fn(images, prompts)
        stream = getattr(self._streams, "stream", None)
        if stream is None or stream.device != images.device:
            stream = self._streams.stream = torch.cuda.Stream(images.device)
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            result = self.reward_fn(images, prompts)
        # The images stay referenced until the stream's work on them is done.
        stream.synchronize()
        return result

    def close(self, wait: bool = True) -> None:
        """Stop accepting work; wait for the running calls when `wait`."""
        self._closed = True
        self._executor.shutdown(wait=wait, cancel_futures=not wait)

    def __enter__(self) -> "AsyncRewardPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
