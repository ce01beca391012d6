"""Timers and memory probes, one per device kind.

GPU: ``triton.testing.do_bench`` (CUDA events; median and 20/80% quantiles). CPU:
``torch.utils.benchmark.Timer.blocked_autorange`` (repeated blocks; median and the 20/80%
quantiles of the per-block times). Both return milliseconds. :func:`interleaved_ms` times
several functions against each other on a shared CPU: round after round, each function
once per round in a shuffled order, so a change of load hits them all alike;
:func:`paired_ratio` compares two of them round by round, and :func:`joined_rounds` makes
two such sessions one. :func:`steady_allocator` keeps freed memory in the process, so that
page faults do not depend on what ran before.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import random
import statistics
import time

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
    q20, q80 = _quantiles([t * 1e3 for t in m.times])
    return {"median": m.median * 1e3, "q20": q20, "q80": q80, "runs": m.number_per_run * len(m.times)}


def _quantiles(times) -> tuple[float, float]:
    """The 20% and 80% quantiles of ``times`` (the nearest sample below each)."""
    ranked = sorted(times)
    return tuple(ranked[min(len(ranked) - 1, int(q * len(ranked)))] for q in (0.2, 0.8))


def interleaved_ms(fns: dict, rounds: int = 15, budget_s: float = 30.0, sample_s: float = 0.02,
                   seed: int = 0, min_rounds: int = 3) -> dict:
    """Time every ``fns[name]()`` in the same rounds; milliseconds per call.

    Each function is first called twice (warm-up) and gets a repeat count that makes one
    sample last about ``sample_s``. Then up to ``rounds`` rounds (at least ``min_rounds``,
    fewer past ``budget_s``) run every function's sample once, in an order shuffled per
    round. Returns
    ``{"times": {name: {"median", "q20", "q80", "runs", "samples"}}, "load": [before, after],
    "others_busy": cpus}``: the 1-minute load average before and after, and the CPUs other
    processes kept busy on average while the rounds ran (``None`` without /proc).
    """
    load_before = os.getloadavg()[0]
    ticks = _try_ticks()
    repeats = {}
    for name, fn in fns.items():
        fn()
        start = time.perf_counter()
        fn()
        repeats[name] = max(1, round(sample_s / max(time.perf_counter() - start, 1e-9)))
    samples = {name: [] for name in fns}
    order = list(fns)
    shuffle = random.Random(seed)
    start = time.perf_counter()
    for i in range(rounds):
        if i >= min_rounds and time.perf_counter() - start > budget_s:
            break
        shuffle.shuffle(order)
        for name in order:
            fn, n = fns[name], repeats[name]
            t = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t) / n * 1e3)
    out = {name: _summary(times, repeats[name] * len(times)) for name, times in samples.items()}
    return {"times": out, "load": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "others_busy": _others_since(ticks)}


def _summary(samples: list[float], runs: int) -> dict:
    q20, q80 = _quantiles(samples)
    return {"median": statistics.median(samples), "q20": q20, "q80": q80, "runs": runs, "samples": samples}


def joined_rounds(first: dict, second: dict) -> dict:
    """Two results of :func:`interleaved_ms` over the same functions as one: each function's
    samples, the first session's rounds then the second's (so that round ``i`` of one function
    still pairs with round ``i`` of another, :func:`paired_ratio`), the load before the first
    and after the second, and the CPUs other processes kept busy, averaged over the two."""
    times = {}
    for name, a in first["times"].items():
        b = second["times"][name]
        times[name] = _summary(a["samples"] + b["samples"], a["runs"] + b["runs"])
    busy = [first["others_busy"], second["others_busy"]]
    return {"times": times, "load": [first["load"][0], second["load"][1]],
            "others_busy": None if None in busy else (busy[0] + busy[1]) / 2}


def paired_ratio(times, against, level: float = 0.95) -> dict | None:
    """``times / against`` round by round (two functions' samples from the same rounds of
    :func:`interleaved_ms`): ``{"median", "lo", "hi", "rounds", "level"}``.

    ``[lo, hi]`` is the distribution-free confidence interval for the median ratio: the
    ``j``-th smallest and largest ratio, with ``j`` the largest for which two binomial(n,
    1/2) tails below ``j`` hold at most ``1 - level``. ``level`` is what it covers, ``None``
    with fewer than 6 rounds (then ``[lo, hi]`` is just the range). A round's load hits both
    of its samples, so the ratio of a pair varies less than either time.
    """
    ratios = sorted(a / b for a, b in zip(times, against))
    n = len(ratios)
    if n == 0:
        return None
    j, tail = 0, 0.0
    for below in range(n // 2 + 1):
        tail += math.comb(n, below) / 2 ** n
        if 2 * tail > 1 - level:
            break
        j = below + 1
    lo, hi = (ratios[j - 1], ratios[n - j]) if j else (ratios[0], ratios[-1])
    return {"median": statistics.median(ratios), "lo": lo, "hi": hi, "rounds": n, "level": level if j else None}


#: glibc's ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def steady_allocator() -> dict | None:
    """Keep freed memory in this process (glibc only); returns what was set, or ``None``.

    By default glibc hands large freed blocks back to the kernel (``munmap``, or trimming the
    heap's top), and whether it does depends on what the process allocated before; a buffer
    of a few MB whose pages went back costs about as much again in page faults as the pass
    that fills it. So the same training step can take from a few percent to a few times
    longer, depending on what ran before it (docs/benchmarks.md). Here blocks up to 32 MB come from the heap
    (``M_MMAP_THRESHOLD``, glibc's largest) and the heap is never trimmed
    (``M_TRIM_THRESHOLD``): every method's buffers are reused after its first steps, as
    jemalloc or tcmalloc would reuse them. The setting holds for the whole process.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return None
    values = {"M_MMAP_THRESHOLD": 32 << 20, "M_TRIM_THRESHOLD": 2 ** 31 - 1}
    ok = mallopt(_M_MMAP_THRESHOLD, values["M_MMAP_THRESHOLD"]) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, values["M_TRIM_THRESHOLD"]) == 1 and ok
    return values if ok else None


def _cpu_ticks() -> tuple[int, int, int]:
    """``(busy, total, ours)``: the machine's busy and total CPU ticks, and this process's."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    with open("/proc/self/stat") as fh:
        ours = fh.read().rsplit(")", 1)[1].split()
    return sum(fields) - idle, sum(fields), int(ours[11]) + int(ours[12])


def _try_ticks():
    try:
        return _cpu_ticks()
    except (OSError, ValueError, IndexError):
        return None


def _others_since(ticks) -> float | None:
    """CPUs other processes kept busy, on average, since ``ticks`` (:func:`_cpu_ticks`)."""
    now = _try_ticks()
    if ticks is None or now is None:
        return None
    busy = (now[0] - ticks[0]) - (now[2] - ticks[2])
    return round(max(0.0, busy / max(1, now[1] - ticks[1]) * (os.cpu_count() or 1)), 2)


def others_busy(window_s: float = 1.0) -> float | None:
    """CPUs kept busy by other processes over ``window_s`` seconds (``None`` without /proc)."""
    ticks = _try_ticks()
    time.sleep(window_s)
    return _others_since(ticks)


def wait_for_quiet(max_busy: float = 0.25, max_wait_s: float = 600.0, quiet_s: float = 3.0) -> float | None:
    """Wait until other processes use at most ``max_busy`` CPUs for ``quiet_s`` seconds in a row
    (at most ``max_wait_s``); returns the last reading. A shared machine's timings are only
    comparable when nothing else runs, and the load average lags by a minute."""
    start, quiet_since, busy = time.time(), None, None
    while time.time() - start < max_wait_s:
        busy = others_busy(0.5)
        if busy is None:
            return None
        if busy <= max_busy:
            quiet_since = quiet_since or time.time()
            if time.time() - quiet_since >= quiet_s:
                return busy
        else:
            quiet_since = None
    return busy


def saved_storages(fn) -> dict:
    """The distinct storages autograd saves for the backward while ``fn()`` runs: ``{key: bytes}``.

    Keyed by the storage itself (``_cdata``), so meta tensors, whose data pointers are all 0, are
    told apart too; a sparse COO tensor counts its indices and values.
    """
    seen = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            parts = [t] if t.layout == torch.strided else [t._indices(), t._values()] \
                if t.layout == torch.sparse_coo else []
            for part in parts:
                storage = part.untyped_storage()
                seen[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return seen


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for the backward while ``fn()`` runs
    (:func:`saved_storages`).

    Device-independent and exact: what a training step keeps alive between forward and
    backward (parameters and frozen weights included, as autograd sees them).
    """
    return sum(saved_storages(fn).values())


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
