"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on the CPU: two gloo processes, every layer
sharded (frozen base and adapter alike), one optimizer step on the adapter; the losses and the
trained adapter equal one process's on the whole batch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import qgoft_kernels as qk
from qgoft_kernels.verify import assert_close

pytestmark = pytest.mark.slow
fsdp = pytest.importorskip("torch.distributed.fsdp")


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    qk.inject(model, "all-linear", block="quasi", scale=True)
    with torch.no_grad():
        for p in qk.trainable_parameters(model):
            p.add_(0.1 * torch.randn_like(p))
    return model


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 24, generator=g), torch.randn(8, 4, generator=g)


def _step(model, x, y):
    """One AdamW step on the adapter; the loss before it and the loss after it."""
    opt = torch.optim.AdamW(qk.trainable_parameters(model), lr=1e-2)
    loss = nn.functional.mse_loss(model(x), y) + 1e-2 * qk.orthogonality_penalty(model)
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = nn.functional.mse_loss(model(x), y)
    return loss.detach(), after


def _worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="0")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model()
        for layer in model:
            if isinstance(layer, qk.GivensLinear):
                fsdp.fully_shard(layer)
        fsdp.fully_shard(model)
        sharded = {n: type(p).__name__ for n, p in model.named_parameters()}
        x, y = _data()
        half = slice(rank * 4, (rank + 1) * 4)
        # each rank's loss is its half's mean; FSDP2 averages the gradients over ranks
        loss, after = _step(model, x[half], y[half])
        losses = torch.stack([loss, after])
        dist.all_reduce(losses)
        full = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save({"losses": losses / world, "params": full, "sharded": sharded}, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp2_trains_the_adapter_like_one_process(tmp_path, monkeypatch, free_port):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the PyTorch path; the kernels have their own tests
    out = tmp_path / "fsdp.pt"
    mp.spawn(_worker, args=(2, free_port, str(out)), nprocs=2, join=True)
    result = torch.load(out)
    assert set(result["sharded"].values()) == {"DTensor"}  # base and adapter both sharded
    model = _model()
    x, y = _data()
    # the mean of the two halves' losses (and gradients) is the whole batch's
    loss, _ = _step(model, x, y)
    assert_close(result["losses"][0], loss.detach())
    for name, p in model.named_parameters():
        assert_close(result["params"][name], p.detach(), atol=1e-7)
        if not p.requires_grad:
            assert torch.equal(result["params"][name], p.detach())  # the frozen base is untouched
    with torch.no_grad():
        after = sum(nn.functional.mse_loss(model(x[h]), y[h]) for h in (slice(0, 4), slice(4, 8))) / 2
    assert_close(result["losses"][1], after)
