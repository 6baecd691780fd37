"""Shared test set-up.

Inputs are fresh random numbers on every run: the session seed is drawn from the OS (or taken
from DANCEGRPO_TEST_SEED to replay a failure) and printed in pytest's header and summary; each test seeds
torch from it and its own name.
"""
import os
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

SESSION_SEED = int(os.environ.get("DANCEGRPO_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config):
    return f"dancegrpo_fast test seed: {SESSION_SEED} (replay with DANCEGRPO_TEST_SEED={SESSION_SEED})"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # Also at the end, where -q (scripts/test.sh) still prints: a failure can then be replayed.
    terminalreporter.write_line(f"dancegrpo_fast test seed: {SESSION_SEED} "
                                f"(replay with DANCEGRPO_TEST_SEED={SESSION_SEED})")


@pytest.fixture(autouse=True)
def _seed_torch(request):
    torch.manual_seed(SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode()))
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run benchmarks/gpu_check.sh on a GPU)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
