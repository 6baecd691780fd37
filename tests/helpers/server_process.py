"""A reward server as a real process, for the tests that talk to it over HTTP."""
from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def reward_server(command: List[str], log_path: Path, env: Optional[Dict[str, str]] = None,
                  start_timeout: float = 120.0) -> Iterator[str]:
    """Start `command` (a `dancegrpo_fast.rewards.serve` invocation), yield the URL it announces on
    stdout, terminate it afterwards. Its stderr goes to log_path, quoted when it fails to start."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    try:
        lines: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
        url, deadline = None, time.monotonic() + start_timeout
        while url is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                if process.poll() is not None:
                    break
                continue
            if " on http://" in line:
                url = line.split(" on ")[1].split()[0]
        if url is None:
            raise RuntimeError(f"reward server did not start: {Path(log_path).read_text()[-3000:]}")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
