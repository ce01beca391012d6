"""DistributedDataParallel on the CPU (gloo, two processes): the adapter's gradients after
all-reduce equal the single-process gradients of the same global batch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import qgoft_kernels as qk
from qgoft_kernels.verify import assert_close

pytestmark = pytest.mark.slow


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(qk.GivensLinear(24, 16, block="quasi", scale=True), nn.Tanh(),
                          qk.GivensLinear(16, 4, block="givens"))
    with torch.no_grad():
        for p in qk.trainable_parameters(model):
            p.add_(0.1 * torch.randn_like(p))
    return model


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(10, 24, generator=g), torch.randn(10, 4, generator=g)


def _worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        x, y = _data()
        shard = slice(rank * 5, (rank + 1) * 5)
        # mean over the local half; DDP averages over ranks: the global batch mean
        nn.functional.mse_loss(model(x[shard]), y[shard]).backward()
        if rank == 0:
            torch.save([p.grad for p in qk.trainable_parameters(model.module)], out_path)
        # both ranks finish their collectives before either tears gloo down (a rank that
        # destroys the group while the other still uses it can abort the process)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_match_single_process(tmp_path, free_port):
    out = tmp_path / "grads.pt"
    mp.spawn(_worker, args=(2, free_port, str(out)), nprocs=2, join=True)
    ddp_grads = torch.load(out)
    model = _model()
    x, y = _data()
    nn.functional.mse_loss(model(x), y).backward()
    single = [p.grad for p in qk.trainable_parameters(model)]
    assert len(ddp_grads) == len(single) == 3
    for a, b in zip(ddp_grads, single):
        assert_close(a, b, atol=1e-7)
