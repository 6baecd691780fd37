"""Fixtures shared by the trainer, policy and distributed tests (import them into a test module
to use them there)."""
import pytest

from .tiny_models import make_flux, run_single_threaded


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    yield from run_single_threaded()


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return make_flux(tmp_path_factory.mktemp("flux") / "model")
