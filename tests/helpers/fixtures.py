"""Fixtures shared by the trainer, policy and distributed tests (import them into a test module
to use them there)."""
import os

import pytest

from .tiny_models import make_flux, run_single_threaded


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    yield from run_single_threaded()


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return make_flux(tmp_path_factory.mktemp("flux") / "model")


@pytest.fixture(scope="module")
def torch_backend():
    """The plain PyTorch step ops for a whole module: for tests of the trainer and evaluation,
    not of the kernels (under TRITON_INTERPRET=1 the interpreted kernels make every sampling step
    about 100x slower; test_fused_ops.py tests them against the same math)."""
    previous = os.environ.get("DANCEGRPO_FAST_BACKEND")
    os.environ["DANCEGRPO_FAST_BACKEND"] = "torch"
    yield
    if previous is None:
        os.environ.pop("DANCEGRPO_FAST_BACKEND")
    else:
        os.environ["DANCEGRPO_FAST_BACKEND"] = previous
