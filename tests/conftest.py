"""Test set-up: the interpreter on CPU-only machines, poisoned outputs, fresh seeds."""
import os
import random
import socket

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # must precede the first kernel import (qgoft_kernels imports its kernels lazily) and
    # triton's own: import triton now, in this mode, before a test that switches the flag off
    # (the torch_path fixture) imports a library that imports triton (bitsandbytes does)
    os.environ["TRITON_INTERPRET"] = "1"
    import triton  # noqa: F401
# every kernel output starts as NaN, so an element a kernel does not write fails its check
os.environ["QGOFT_POISON"] = "1"

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one of several test processes (make test: pytest-xdist, one per core): one thread each
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def gen():
    """A generator with a fresh seed; the seed is printed, so a failure can be replayed."""
    seed = random.SystemRandom().randrange(2**31)
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def torch_path(monkeypatch):
    """The PyTorch path on a CPU-only machine (the interpreter would take minutes for whole
    models); the kernels have their own tests. Modules opt in with ``usefixtures``."""
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def free_port():
    """A local TCP port nobody listens on: the rendezvous of a multi-process test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
