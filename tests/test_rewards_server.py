"""The reward server as a real subprocess, and RemoteReward against it and against dead ports."""

import json
import socket
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from dancegrpo_fast.rewards import CLIPScoreReward, RemoteReward, RemoteRewardError, Reward
from dancegrpo_fast.rewards.remote import encode_request
from dancegrpo_fast.rewards.serve import RewardServer
from dancegrpo_fast.rewards.testing import write_tiny_clip_folder
from helpers.server_process import reward_server

PROMPTS = ["the cat", "a red dog", "the sea at night", "a city in winter", "an apple", "the dog and the cat"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("server") / "clip"
    write_tiny_clip_folder(str(folder), seed=3)
    return folder


@pytest.fixture(scope="module")
def server_url(clip_folder, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("server_log") / "stderr.txt"
    kwargs = json.dumps({"model_path": str(clip_folder)})
    command = [sys.executable, "-m", "dancegrpo_fast.rewards.serve", "--reward", "clip", "--reward-kwargs", kwargs,
               "--host", "127.0.0.1", "--port", "0", "--max-batch", "16", "--max-wait-ms", "300"]
    with reward_server(command, log_path) as url:
        yield url


def _post(url, body, content_type="application/json"):
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _health(url):
    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        return json.loads(response.read())


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_health(server_url):
    health = _health(server_url)
    assert health["status"] == "ok" and health["reward"]["name"] == "clip" and health["max_batch"] == 16
    assert RemoteReward(server_url).health()["status"] == "ok"


def test_concurrent_clients_match_in_process_scores(server_url, clip_folder):
    local = CLIPScoreReward(str(clip_folder))
    generator = torch.Generator().manual_seed(0)
    # float32 on the wire is exact; uint8 is exact for images that are already 8-bit
    jobs = []
    for index in range(6):
        size = 1 + index % 3
        images = torch.rand(size, 3, 40, 40, generator=generator)
        dtype = "float32" if index % 2 == 0 else "uint8"
        if dtype == "uint8":
            images = (images * 255).round() / 255
        prompts = [PROMPTS[(index + k) % len(PROMPTS)] for k in range(size)]
        jobs.append((images, prompts, dtype))
    before = _health(server_url)["stats"]
    results = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def client(index):
        images, prompts, dtype = jobs[index]
        remote = RemoteReward(server_url, timeout_s=60, retries=0, dtype=dtype)
        barrier.wait()
        results[index] = remote(images, prompts)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for (images, prompts, _), scores in zip(jobs, results):
        assert scores is not None and scores.shape == (len(prompts),) and scores.dtype == torch.float32
        torch.testing.assert_close(scores, local(images, prompts), atol=1e-5, rtol=0)
    after = _health(server_url)["stats"]
    requests = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert requests == len(jobs)
    assert batches < requests  # concurrent requests were scored together
    assert after["largest_batch"] > 3  # more than any single request


def test_malformed_requests_get_4xx_and_server_keeps_serving(server_url):
    status, answer = _post(server_url + "/score", b"{not json")
    assert status == 400 and "not JSON" in answer["error"]
    body = json.loads(encode_request(torch.rand(2, 3, 8, 8), ["a", "b"]))
    body["images"]["shape"] = [3, 3, 8, 8]
    status, answer = _post(server_url + "/score", json.dumps(body).encode())
    assert status == 400 and "bytes, expected" in answer["error"]
    status, answer = _post(server_url + "/score", encode_request(torch.rand(2, 3, 8, 8), ["only one"]))
    assert status == 400 and "len(prompts)" in answer["error"]
    status, answer = _post(server_url + "/score", encode_request(torch.rand(2, 3, 8, 8), ["a", "b"], "float32")
                           .replace(b'"float32"', b'"int64"'))
    assert status == 400 and "images.dtype" in answer["error"]
    status, answer = _post(server_url + "/nowhere", b"{}")
    assert status == 404
    # the 4xx is reported by the client without retrying
    video_client = RemoteReward(server_url, modality="video", retries=3, backoff_s=5)
    start = time.perf_counter()
    with pytest.raises(RemoteRewardError, match=r"rejected the request \(HTTP 400\)"):
        video_client(torch.rand(1, 2, 3, 8, 8), ["a"])
    assert time.perf_counter() - start < 4
    # still serving
    status, answer = _post(server_url + "/score", encode_request(torch.rand(2, 3, 8, 8), ["a", "b"]))
    assert status == 200 and len(answer["scores"]) == 2
    assert _health(server_url)["status"] == "ok"


def test_dead_server_fails_clearly_after_retries():
    url = f"http://127.0.0.1:{_free_port()}"
    reward = RemoteReward(url, timeout_s=2, retries=2, backoff_s=0.1)
    start = time.perf_counter()
    with pytest.raises(RemoteRewardError, match=rf"reward server {url} failed after 3 attempts.*Connection"):
        reward(torch.rand(1, 3, 8, 8), ["a"])
    assert time.perf_counter() - start < 3


def test_unresponsive_server_times_out():
    """A server that accepts connections but never answers: each attempt ends at timeout_s."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        reward = RemoteReward(url, timeout_s=0.5, retries=1, backoff_s=0.05)
        start = time.perf_counter()
        with pytest.raises(RemoteRewardError, match=rf"reward server {url} failed after 2 attempts"):
            reward(torch.rand(1, 3, 8, 8), ["a"])
        assert time.perf_counter() - start < 3
    finally:
        listener.close()


class _PromptLengthReward(Reward):
    name = "prompt_length"

    def __init__(self):
        super().__init__()
        self.batches = []

    def _score(self, images, prompts):
        self.batches.append(tuple(images.shape))
        return images.mean(dim=(1, 2, 3)) * 0 + torch.tensor([float(len(p)) for p in prompts])


def test_in_process_server_batches_only_matching_shapes():
    reward = _PromptLengthReward()
    with RewardServer(reward, port=0, max_batch=8, max_wait_ms=300) as server:
        client = RemoteReward(server.url, retries=0)
        jobs = [(torch.rand(2, 3, 8, 8), ["a", "bb"]), (torch.rand(1, 3, 16, 16), ["ccc"]),
                (torch.rand(3, 3, 8, 8), ["dddd", "e", "ff"])]
        results = [None] * 3

        def run(i):
            results[i] = client(*jobs[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
            time.sleep(0.02)
        for thread in threads:
            thread.join(timeout=30)
    assert [r.tolist() for r in results] == [[1.0, 2.0], [3.0], [4.0, 1.0, 2.0]]
    assert all(shape[2:] in ((8, 8), (16, 16)) for shape in reward.batches)
    # the two 8x8 requests are scored together although a 16x16 one arrived between them
    assert sorted(reward.batches) == [(1, 3, 16, 16), (5, 3, 8, 8)]
