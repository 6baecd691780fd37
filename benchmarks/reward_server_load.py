"""Load-and-abuse test of the reward server, on 127.0.0.1 only, bounded, stops by itself.

    .venv/bin/python benchmarks/reward_server_load.py            # ~1 min on a 2-core CPU

Starts `python -m dancegrpo_fast.rewards.serve --reward tiny_geneval` (with a bearer token and
small limits) as a subprocess, then:
  1. load: CLIENTS threads x REQUESTS valid requests (4 rendered 32x32 images each);
  2. the same load again while abusive clients run alongside: malformed bodies of many shapes,
     unparseable prompts (each sent at the same moment as a valid request), missing and wrong
     tokens, a 1 GB Content-Length with 1 byte sent, slow connections trickling header bytes,
     and valid requests whose bodies are close to --max-body-mb;
  3. the load again during a flood of idle connections over --max-connections;
  4. checks that the server still answers /health, stops it with SIGTERM.
Valid requests go through RemoteReward (the trainer's client: 5xx and connection errors retried
with jittered backoff), so their latency includes retries and an error is a request that failed
for good; the abusive ones are sent raw and must get their expected answer.
Each kind of request has an expected status; anything else counts as an error. Reports per kind:
requests, errors, p50/p99 latency, and the server's peak resident memory (VmHWM) against its
baseline and its body limit. Writes benchmarks/results/reward_server_load.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from dancegrpo_fast.rewards.remote import RemoteReward, RemoteRewardError, encode_request  # noqa: E402
from dancegrpo_fast.tiny.task import render_batch, sample_prompts  # noqa: E402

DEADLINE_S = 240  # the whole script, whatever happens


def _rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.rows = {}

    def add(self, kind: str, expected, status, seconds: float) -> None:
        with self.lock:
            row = self.rows.setdefault(kind, {"requests": 0, "errors": 0, "latencies": [], "statuses": {},
                                              "expected": sorted(map(str, expected))})
            row["requests"] += 1
            row["latencies"].append(seconds)
            row["statuses"][str(status)] = row["statuses"].get(str(status), 0) + 1
            if status not in expected:
                row["errors"] += 1


def _post(url: str, body: bytes, token, timeout: float = 30.0):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers, method="POST"),
                                    timeout=timeout) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        error.read()
        status = error.code
    except (OSError, urllib.error.URLError) as error:
        status = f"connection error: {type(getattr(error, 'reason', error)).__name__}"
    return status, time.perf_counter() - start


def _raw(port: int, data: bytes, timeout: float = 10.0):
    """Raw bytes in; (first status line or the way it ended, seconds until the server closed)."""
    start = time.perf_counter()
    answer = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(data)
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
    except OSError as error:
        return f"connection error: {type(error).__name__}", time.perf_counter() - start
    status = answer.split(b"\r\n", 1)[0].decode(errors="replace").split(" ")
    return (int(status[1]) if len(status) > 1 and status[1].isdigit() else "closed"), time.perf_counter() - start


def start_server(args, token: str):
    command = [sys.executable, "-m", "dancegrpo_fast.rewards.serve", "--reward", "tiny_geneval", "--host", "127.0.0.1",
               "--port", "0", "--max-batch", "32", "--max-wait-ms", "5", "--max-body-mb", str(args.max_body_mb),
               "--max-samples", "1024", "--read-timeout-s", str(args.read_timeout_s),
               "--max-connections", str(args.max_connections)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "DANCEGRPO_REWARD_TOKEN": token}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if " on http://" in line:
            return process, line.split(" on ")[1].split()[0]
    process.kill()
    raise RuntimeError(f"reward server did not start: {process.stderr.read()[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent valid clients")
    parser.add_argument("--requests", type=int, default=50, help="valid requests per client per phase")
    parser.add_argument("--max-body-mb", type=float, default=16.0, help="the server's --max-body-mb")
    parser.add_argument("--max-connections", type=int, default=32, help="the server's --max-connections")
    parser.add_argument("--read-timeout-s", type=float, default=2.0, help="the server's --read-timeout-s")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "reward_server_load.json"))
    args = parser.parse_args()
    for name in ("clients", "requests", "max_connections"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(args, name)}")
    for name in ("max_body_mb", "read_timeout_s"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    # A watchdog: the script ends within DEADLINE_S even if something hangs.
    threading.Timer(DEADLINE_S, lambda: (print("deadline reached, stopping", file=sys.stderr), os._exit(3))).start()
    torch.set_num_threads(1)
    token = secrets.token_hex(16)
    process, url = start_server(args, token)
    port = int(url.rsplit(":", 1)[1])
    score = url + "/score"
    record = Recorder()
    peak_rss = [0]
    sampling = threading.Event()

    def sample_memory():
        while not sampling.wait(0.02):
            try:
                peak_rss[0] = max(peak_rss[0], _rss_kb(process.pid, "VmRSS"))
            except OSError:
                return

    threading.Thread(target=sample_memory, daemon=True).start()
    prompts = sample_prompts("train", 64, seed=0)
    good_body = encode_request(render_batch(prompts[:4], seed=0), prompts[:4])
    # warm-up (first calls import and allocate), then the baseline memory
    for _ in range(5):
        _post(score, good_body, token)
    time.sleep(0.3)
    baseline_kb = _rss_kb(process.pid, "VmRSS")

    def client(phase: str, index: int):
        # The trainer's own client: 5xx (503 while the connections are taken) and connection
        # errors are retried with jittered backoff; an error is a request that still failed.
        remote = RemoteReward(url, timeout_s=30, retries=6, backoff_s=0.2, token=token)
        mine = [prompts[(4 * index + k) % len(prompts)] for k in range(4)]
        images = render_batch(mine, seed=index)
        for _ in range(args.requests):
            start = time.perf_counter()
            try:
                remote(images, mine)
                status = 200
            except RemoteRewardError as error:
                status = f"failed: {str(error)[:80]}"
            record.add(phase, {200}, status, time.perf_counter() - start)

    def run_load(phase: str):
        threads = [threading.Thread(target=client, args=(phase, i)) for i in range(args.clients)]
        for thread in threads:
            thread.start()
        return threads

    # -- 1. load alone ---------------------------------------------------------------------------
    for thread in run_load("valid (load alone)"):
        thread.join(timeout=120)

    # -- 2. load with abuse alongside ----------------------------------------------------------------
    body_limit = int(args.max_body_mb * (1 << 20))
    good_small = encode_request(render_batch(prompts[:2], seed=1), prompts[:2])
    malformed = {
        "nested [ x 100000": b"[" * 100_000, "not UTF-8": b"\xff\xfe\x00garbage", "NaN token": b'{"prompts": NaN}',
        "truncated JSON": good_small[: len(good_small) // 2], "images a list": b'{"prompts": ["a"], "images": [1]}',
        "bad base64": b'{"prompts": ["a"], "images": {"shape": [1, 3, 4, 4], "dtype": "uint8", "data": "!!!!"}}',
        "shape overflow": b'{"prompts": ["a"], "images": {"shape": [1099511627776, 1099511627776, 3, 8], '
                          b'"dtype": "uint8", "data": ""}}',
        "wrong byte count": good_small.replace(b'"shape": [2,', b'"shape": [3,'),
        "zero-height image": encode_request(torch.rand(1, 3, 0, 8), ["a red circle"]),
        "1x100000 image": encode_request(torch.rand(1, 3, 1, 100_000), ["a red circle"]),
        "int64 dtype": good_small.replace(b'"uint8"', b'"int64"'),
    }

    def abuse_malformed():
        for _ in range(5):
            for kind, body in malformed.items():
                status, seconds = _post(score, body, token)
                record.add("malformed body (" + kind + ")", {400, 413}, status, seconds)

    def abuse_bad_prompts():
        bad = encode_request(render_batch(prompts[:2], seed=2), [prompts[0], "zz " * 3000])
        for _ in range(20):
            results = {}

            def send(name, body):
                results[name] = _post(score, body, token)

            pair = [threading.Thread(target=send, args=("bad", bad)), threading.Thread(target=send, args=("good", good_small))]
            for thread in pair:
                thread.start()
            for thread in pair:
                thread.join(timeout=60)
            record.add("unparseable prompt", {422}, *results["bad"])
            record.add("valid, sent with an unparseable one", {200}, *results["good"])

    def abuse_auth():
        for _ in range(20):
            record.add("no token", {401}, *_post(score, good_small, None))
            record.add("wrong token", {401}, *_post(score, good_small, "not-the-token"))

    def abuse_huge_announcement():
        head = f"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 1000000000\r\n\r\n{{"
        for _ in range(10):
            record.add("1 GB Content-Length, 1 byte sent", {413}, *_raw(port, head.encode()))

    def abuse_slow():
        # Each byte comes well within the per-read timeout; the request deadline ends it.
        def one():
            start = time.perf_counter()
            status = "still open"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    for byte in b"POST /score HTTP/1.1\r\nHost: " + b"x" * 200:
                        sock.sendall(bytes([byte]))
                        time.sleep(args.read_timeout_s / 4)
                        if time.perf_counter() - start > 6 * args.read_timeout_s:
                            break
            except OSError:
                status = "closed"
            record.add("slow client (header trickle)", {"closed"}, status, time.perf_counter() - start)

        threads = [threading.Thread(target=one) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

    def abuse_flood():
        # More idle connections than --max-connections: the ones over the limit get 503 at once.
        socks = []
        start = time.perf_counter()
        for _ in range(args.max_connections + 8):
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                pass
        time.sleep(0.3)
        for sock in socks:
            sock.settimeout(0.05)
            try:
                data = sock.recv(200)
                status = int(data.split(b" ")[1]) if data.startswith(b"HTTP/1.1") else "closed"
            except socket.timeout:
                status = "held"  # a slot: served until its read timeout
            except OSError:
                status = "closed"
            record.add("idle connection flood", {"held", 503}, status, time.perf_counter() - start)
        time.sleep(args.read_timeout_s + 0.5)
        for sock in socks:
            sock.close()

    def abuse_large():
        # Valid requests just under the body limit: float32 32x32 images as many as fit in 95%.
        per_sample = 4 * ((3 * 32 * 32 * 4 + 2) // 3)
        count = min(1024, int(0.95 * body_limit) // per_sample)
        large_prompts = [prompts[i % len(prompts)] for i in range(count)]
        large = encode_request(render_batch(large_prompts[:64], seed=3).repeat((count + 63) // 64, 1, 1, 1)[:count],
                               large_prompts, "float32")
        for _ in range(6):
            record.add(f"valid body of {len(large) / (1 << 20):.1f} MB ({count} samples)", {200},
                       *_post(score, large, token, timeout=120))

    threads = run_load("valid (load during abuse)")
    abusers = [threading.Thread(target=target) for target in (abuse_malformed, abuse_bad_prompts, abuse_auth,
                                                               abuse_huge_announcement, abuse_slow, abuse_large)]
    for thread in abusers:
        thread.start()
    for thread in threads + abusers:
        thread.join(timeout=180)
    # -- 3. a flood of idle connections over the limit, with the load: the valid clients see
    # 503s until the flood's connections reach their read timeout, and get through on retry.
    threads = run_load("valid (load during connection flood)")
    flood = threading.Thread(target=abuse_flood)
    flood.start()
    for thread in threads + [flood]:
        thread.join(timeout=180)
    health_status, _ = _post(url + "/health", b"", token)  # POST /health is 404: the server is alive
    with urllib.request.urlopen(urllib.request.Request(url + "/health", headers={"Authorization": f"Bearer {token}"}),
                                timeout=10) as response:
        health = json.loads(response.read())
    sampling.set()
    peak_hwm_kb = _rss_kb(process.pid, "VmHWM")
    process.send_signal(signal.SIGTERM)
    exit_code = process.wait(timeout=30)

    rows = []
    for kind, row in record.rows.items():
        latencies = sorted(row["latencies"])
        p99 = latencies[min(len(latencies) - 1, int(round(0.99 * (len(latencies) - 1))))]
        rows.append({"kind": kind, "requests": row["requests"], "errors": row["errors"],
                     "p50_ms": round(1000 * statistics.median(latencies), 1), "p99_ms": round(1000 * p99, 1),
                     "statuses": row["statuses"], "expected": [str(e) for e in row["expected"]]})
    result = {
        "command": " ".join(["python benchmarks/reward_server_load.py", *sys.argv[1:]]),
        "machine": f"{os.cpu_count()} CPUs, torch threads 1 per process",
        "server": {"reward": "tiny_geneval", "max_body_mb": args.max_body_mb, "max_inflight_mb": 4 * args.max_body_mb,
                   "max_connections": args.max_connections, "read_timeout_s": args.read_timeout_s},
        "rows": rows,
        "total_requests": sum(r["requests"] for r in rows), "total_errors": sum(r["errors"] for r in rows),
        "memory_mb": {"baseline_rss": round(baseline_kb / 1024, 1), "peak_rss_sampled": round(peak_rss[0] / 1024, 1),
                      "peak_rss_vmhwm": round(peak_hwm_kb / 1024, 1),
                      "peak_over_baseline": round((peak_hwm_kb - baseline_kb) / 1024, 1)},
        "server_stats": health["stats"], "still_serving": health["status"] == "ok" and health_status == 404,
        "clean_exit": exit_code == 0,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"| kind | requests | errors | p50 ms | p99 ms | answers |")
    print(f"|---|---|---|---|---|---|")
    for row in rows:
        answers = ", ".join(f"{k} x{v}" for k, v in sorted(row["statuses"].items()))
        print(f"| {row['kind']} | {row['requests']} | {row['errors']} | {row['p50_ms']} | {row['p99_ms']} | {answers} |")
    memory = result["memory_mb"]
    print(f"\n{result['total_requests']} requests, {result['total_errors']} errors; server RSS {memory['baseline_rss']} MB "
          f"after warm-up, peak {memory['peak_rss_vmhwm']} MB (+{memory['peak_over_baseline']} MB; body limit "
          f"{args.max_body_mb:g} MB, bytes in flight limit {4 * args.max_body_mb:g} MB); still serving: "
          f"{result['still_serving']}; clean exit: {result['clean_exit']}")
    print(f"wrote {args.out}")
    os._exit(0 if result["total_errors"] == 0 and result["still_serving"] and result["clean_exit"] else 1)


if __name__ == "__main__":
    main()
