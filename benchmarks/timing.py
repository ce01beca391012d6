"""Timers and memory probes, one per device kind.

GPU: ``triton.testing.do_bench`` (CUDA events; median and 20/80% quantiles). CPU:
``torch.utils.benchmark.Timer.blocked_autorange`` (repeated blocks; median and the 20/80%
quantiles of the per-block times). Both return milliseconds.
"""
from __future__ import annotations

import torch


def time_ms(fn, device: torch.device, min_run_time: float = 0.2) -> dict:
    """``{"median", "q20", "q80", "runs"}`` in milliseconds for calling ``fn()``."""
    if device.type == "cuda":
        import triton.testing

        median, q20, q80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"median": median, "q20": q20, "q80": q80, "runs": None}
    from torch.utils.benchmark import Timer

    fn()  # warm-up
    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    times = sorted(t * 1e3 for t in m.times)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return {"median": m.median * 1e3, "q20": pick(0.2), "q80": pick(0.8), "runs": m.number_per_run * len(m.times)}


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for the backward while ``fn()`` runs.

    Device-independent and exact: what a training step keeps alive between forward and
    backward (parameters and frozen weights included, as autograd sees them).
    """
    seen = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.layout == torch.strided:
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), t.device)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def peak_bytes(fn, device: torch.device) -> int | None:
    """Peak CUDA memory allocated while ``fn()`` runs, above what was allocated before."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before
