"""The reward server keeps one client's bad input from failing another's request, answers input
errors with short 4xx messages that do not echo the input, and holds its limits (body size,
samples per request, image sides, prompt length, max_batch, read timeout, connections, listen
queue, bearer token). In-process servers on 127.0.0.1 with real HTTP; every socket has a timeout."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import unusable_rewards  # noqa: E402,F401  (registers the test rewards)

import dancegrpo_fast.tiny.reward  # noqa: E402,F401  (registers tiny_geneval)

from dancegrpo_fast.rewards import RemoteReward, RemoteRewardError, Reward, build_reward  # noqa: E402
from dancegrpo_fast.rewards import remote as remote_module  # noqa: E402
from dancegrpo_fast.rewards.remote import encode_request  # noqa: E402
from dancegrpo_fast.rewards.serve import RewardServer, main  # noqa: E402

SECRET = "zz-do-not-echo-" * 40  # an unparseable tiny-task prompt that must not come back


def _post(url, body, headers=None, timeout=10):
    request = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _raw(port, data: bytes, timeout=5.0) -> bytes:
    """Send raw bytes, return everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


class _Recording(Reward):
    """Scores the prompt length; records the size of every batch it is called with."""
    name = "recording"

    def __init__(self):
        super().__init__()
        self.batches = []

    def _score(self, images, prompts):
        self.batches.append(images.shape[0])
        return torch.tensor([float(len(p)) for p in prompts])


def test_a_bad_request_batched_with_a_good_one_fails_alone():
    local = build_reward("tiny_geneval")
    good_images, good_prompts = torch.rand(3, 3, 16, 16), ["a red circle", "two blue squares", "a green triangle"]
    with RewardServer(build_reward("tiny_geneval"), max_batch=64, max_wait_ms=500) as server:
        results = {}
        barrier = threading.Barrier(2)

        def client(name, images, prompts):
            # The same retry settings on both sides: before isolation they were re-batched
            # together on every attempt and both failed.
            remote = RemoteReward(server.url, retries=2, backoff_s=0.05, timeout_s=30)
            barrier.wait()
            try:
                results[name] = remote(images, prompts)
            except RemoteRewardError as error:
                results[name] = error

        threads = [threading.Thread(target=client, args=("good", good_images, good_prompts)),
                   threading.Thread(target=client, args=("bad", torch.rand(2, 3, 16, 16), ["a red circle", SECRET]))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        stats = dict(server.stats)
    torch.testing.assert_close(results["good"], local(good_images, good_prompts))
    bad = results["bad"]
    assert isinstance(bad, RemoteRewardError) and "HTTP 422" in str(bad) and "PromptParseError" in str(bad)
    assert "zz-do-not-echo" not in str(bad) and len(str(bad)) < 600
    assert stats["isolated_batches"] >= 1  # they were batched together, then rescored one by one
    assert stats["requests"] == 2  # the 4xx was not retried


@pytest.fixture(scope="module")
def tiny_server():
    with RewardServer(build_reward("tiny_geneval"), max_batch=8, max_wait_ms=1, max_body_mb=2,
                      max_samples=16, max_side=512, max_prompt_chars=200) as server:
        yield server


def _images_body(shape, prompts, dtype="uint8"):
    return encode_request(torch.rand(*shape), prompts, dtype)


@pytest.mark.parametrize("body, status, phrase", [
    (b"[" * 100000, 400, "not JSON"),
    (b"\xff\xfe\x00garbage", 400, "not JSON"),
    (b'{"prompts": NaN, "images": 1}', 400, "NaN is not JSON"),
    (b'{"prompts": ["a"], "images": [1, 2]}', 400, "'images' must be an object"),
    (b'{"prompts": "a", "images": {"shape": [1, 3, 4, 4], "dtype": "uint8", "data": ""}}', 400, "'prompts' must be a list"),
    (b'{"prompts": ["a"], "images": {"shape": [1, 3, 4, 4], "dtype": "uint8", "data": "!!"}}', 400, "base64"),
    # 2**40 * 2**40 * 3 * 8 overflows int64 to a small number: must not look like a match
    (b'{"prompts": ["a"], "images": {"shape": [1099511627776, 1099511627776, 3, 8], "dtype": "uint8", '
     b'"data": ""}}', 413, "samples"),
    (b'{"prompts": [], "images": {"shape": [100000, 3, 0, 0], "dtype": "uint8", "data": ""}}', 413, "max_samples"),
], ids=["deep-nesting", "not-utf8", "nan-token", "images-list", "prompts-str", "bad-base64", "shape-overflow",
        "too-many-samples"])
def test_malformed_bodies_of_any_shape_get_a_short_4xx(tiny_server, body, status, phrase):
    code, answer = _post(tiny_server.url + "/score", body)
    assert code == status and phrase in json.loads(answer)["error"]
    assert len(answer) < 600
    code, answer = _post(tiny_server.url + "/score", _images_body((1, 3, 16, 16), ["a red circle"]))
    assert code == 200  # still serving


@pytest.mark.parametrize("shape, prompts, status, phrase", [
    ((1, 3, 0, 16), ["a red circle"], 400, "H >= 1 and W >= 1"),
    ((1, 3, 1, 100000), ["a red circle"], 400, "max_side=512"),
    ((1, 3, 16, 16), ["a red circle " * 100], 400, "prompts[0] has 1300 characters"),
    ((1, 3, 16, 16), [SECRET[:190]], 422, "PromptParseError"),
], ids=["zero-height", "one-by-100000", "long-prompt", "unparseable-prompt"])
def test_input_errors_are_4xx_without_echoing_the_input(tiny_server, shape, prompts, status, phrase):
    code, answer = _post(tiny_server.url + "/score", _images_body(shape, prompts))
    message = json.loads(answer)["error"]
    assert code == status and phrase in message, message
    assert "zz-do-not-echo" not in message and "red circle a red" not in message and len(answer) < 600


def test_a_large_bad_prompt_gets_a_small_answer():
    with RewardServer(build_reward("tiny_geneval"), max_wait_ms=1, max_prompt_chars=20_000_000) as server:
        prompt = "q" * 10_000_000
        code, answer = _post(server.url + "/score", _images_body((1, 3, 8, 8), [prompt]), timeout=60)
    assert code == 422 and len(answer) < 600 and "qqqq" not in answer.decode()


def test_body_and_sample_limits():
    reward = _Recording()
    with RewardServer(reward, max_batch=4, max_wait_ms=1, max_body_mb=0.05, max_samples=12) as server:
        # max_batch caps what one request sends to the reward in one call
        answer = RemoteReward(server.url, retries=0)(torch.rand(10, 3, 4, 4), [str(i) * (i + 1) for i in range(10)])
        assert answer.tolist() == [float(i + 1) for i in range(10)] and reward.batches == [4, 4, 2]
        code, body = _post(server.url + "/score", _images_body((13, 3, 2, 2), ["a"] * 13))
        assert code == 413 and "max_samples=12" in json.loads(body)["error"]
        # A 1 GB announcement with 1 byte sent is answered at once, without reading or reserving it.
        start = time.monotonic()
        reply = _raw(server.port, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n{")
        assert reply.startswith(b"HTTP/1.1 413") and b"max_body_mb" in reply and time.monotonic() - start < 3
        code, body = _post(server.url + "/score", _images_body((12, 3, 40, 40), ["a"] * 12))
        assert code == 413 and "exceeds" in json.loads(body)["error"]


def test_slow_and_idle_connections_are_closed():
    with RewardServer(_Recording(), max_wait_ms=1, read_timeout_s=0.5) as server:
        # silent after half a body
        start = time.monotonic()
        _raw(server.port, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789", timeout=10)
        assert time.monotonic() - start < 3
        # a trickle of header bytes, each within the per-read timeout: the request deadline ends it
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.setblocking(False)  # one byte always fits the send buffer; recv must not wait
            start, closed = time.monotonic(), False
            for byte in b"POST /score HTTP/1.1\r\nHost: " + b"x" * 100:
                try:
                    sock.send(bytes([byte]))
                    # EOF or an answer: the server is done with this connection
                    closed = sock.recv(100, socket.MSG_PEEK) is not None
                except BlockingIOError:
                    pass  # nothing to read yet: still open
                except OSError:
                    closed = True  # reset by the server
                if closed or time.monotonic() - start > 6:
                    break
                time.sleep(0.2)
            assert closed and time.monotonic() - start < 3
        assert server.stats["timeouts"] >= 2


def test_connection_limit_answers_503_and_recovers():
    with RewardServer(_Recording(), max_wait_ms=1, max_connections=2, read_timeout_s=1.0) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(2)]
        try:
            time.sleep(0.2)
            code, body = _post(server.url + "/score", _images_body((1, 3, 4, 4), ["a"]))
            assert code == 503 and "max_connections=2" in json.loads(body)["error"]
            time.sleep(1.6)  # the idle ones hit the read timeout and free their slots
            code, body = _post(server.url + "/score", _images_body((1, 3, 4, 4), ["a"]))
            assert code == 200
        finally:
            for sock in idle:
                sock.close()


def test_listen_queue_is_configurable():
    with RewardServer(_Recording(), backlog=77) as server:
        assert server._httpd.request_queue_size == 77
        if shutil.which("ss"):
            out = subprocess.run(["ss", "-ltnH", f"sport = :{server.port}"], capture_output=True, text=True).stdout
            assert out.split()[2] == "77"  # Send-Q of a listening socket is its backlog


def test_client_retries_only_5xx_with_jitter(monkeypatch):
    slept = []
    monkeypatch.setattr(remote_module.time, "sleep", lambda seconds: slept.append(seconds))
    with RewardServer(build_reward("test_always_raises"), max_wait_ms=1) as server:
        for _ in range(2):
            with pytest.raises(RemoteRewardError, match=r"failed after 4 attempts.*HTTP 500.*reward model crashed"):
                RemoteReward(server.url, retries=3, backoff_s=1.0)(torch.rand(1, 3, 4, 4), ["a"])
        assert server.stats["requests"] == 8
    first, second = slept[:3], slept[3:]
    for delays in (first, second):
        for attempt, delay in enumerate(delays):
            assert 0.5 * 2 ** attempt <= delay <= 1.5 * 2 ** attempt
    assert first != second  # two clients with the same settings do not retry in lockstep


def test_bearer_token(monkeypatch):
    monkeypatch.delenv("DANCEGRPO_REWARD_TOKEN", raising=False)
    with RewardServer(_Recording(), max_wait_ms=1, token="s3cret-token") as server:
        start = time.monotonic()
        with pytest.raises(RemoteRewardError, match=r"HTTP 401.*DANCEGRPO_REWARD_TOKEN"):
            RemoteReward(server.url, retries=3, backoff_s=5)(torch.rand(1, 3, 4, 4), ["a"])
        assert time.monotonic() - start < 3  # not retried
        code, _ = _post(server.url + "/score", _images_body((1, 3, 4, 4), ["a"]),
                        headers={"Authorization": "Bearer wrong"})
        assert code == 401
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(server.url + "/health", timeout=5)
        assert RemoteReward(server.url, token="s3cret-token")(torch.rand(1, 3, 4, 4), ["abc"]).tolist() == [3.0]
        monkeypatch.setenv("DANCEGRPO_REWARD_TOKEN", "s3cret-token")
        remote = RemoteReward(server.url)
        assert remote(torch.rand(1, 3, 4, 4), ["ab"]).tolist() == [2.0]
        assert "s3cret" not in repr(remote) and "s3cret" not in json.dumps(remote.describe())


def test_cli_flags_are_validated(capsys):
    for flag, value, phrase in (("--max-body-mb", "0", "--max-body-mb must be > 0"),
                                ("--max-connections", "0", "--max-connections must be an integer >= 1"),
                                ("--read-timeout-s", "-1", "--read-timeout-s must be > 0"),
                                ("--backlog", "0", "--backlog must be an integer >= 1"),
                                ("--max-batch", "0", "--max-batch must be an integer >= 1")):
        with pytest.raises(SystemExit):
            main(["--reward", "jpeg_compressibility", flag, value])
        assert phrase in capsys.readouterr().err


def test_reward_modules_register_rewards_for_the_server(capsys):
    with pytest.raises(SystemExit):
        main(["--reward", "no_such_reward"])
    assert "--reward 'no_such_reward' is not registered" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--reward-module", "no.such.module", "--reward", "tiny_geneval"])
    assert "reward_modules: could not import 'no.such.module'" in capsys.readouterr().err
    from dancegrpo_fast.rewards.serve import _parse_args

    args = _parse_args(["--reward-module", "dancegrpo_fast.tiny.reward", "--reward", "tiny_geneval"])
    assert args.reward == "tiny_geneval" and args.reward_modules == ["dancegrpo_fast.tiny.reward"]
