"""The sm_90 machine of the static cost model: two cards, two constant sets, and one warp's timeline.

``benchmarks/sass.py`` reads a kernel's SASS; this module prices it. For one warp walking
one program it replays the instructions in order, as a Hopper scheduler issues them
(:func:`timeline`): an instruction issues after the previous one's stall count (the fixed
latencies ptxas encoded in the control bits) and after the variable-latency results it
waits for have arrived (its scoreboard wait mask, or a ``DEPBAR``). The scoreboards are
how the hardware enforces a register's read-after-write and write-after-write hazards on
the results of loads, shuffles, shared memory and the special-function unit; ptxas picks
them from the registers, so register reuse shows as waits here exactly as on the chip.
Each variable-latency result arrives after a latency by kind (:class:`Constants`): a
16-byte or asynchronous global load from DRAM, a narrower one from L2, shared memory,
shuffle, barrier, special functions, conversions, constants.

:func:`launch_time` turns that path into a launch's time on a card: the programs fill the
resident slots in waves (the kernel's real registers, shared memory and warps); in each wave
a scheduler runs its warps' paths side by side, so the wave takes the longest of one warp's
path (latency), its warps' issue slots and pipes (issue) and its share of the HBM bytes at
the copy bandwidth (memory). docs/tuning.md names the source of every constant.
"""
from __future__ import annotations

import collections
import math
import re
from dataclasses import dataclass, field

from qgoft_kernels import planning

SCHEDULERS = 4


@dataclass(frozen=True)
class Constants:
    """One constant set: the latencies (ns for memory, cycles on the SM clock otherwise) and rates."""
    name: str
    clock: float        # SM clock under load, Hz
    dram_ns: float      # a 16-byte or asynchronous global load (the streamed tiles): HBM
    l2_ns: float        # a narrower global load (coefficients, chain values, small buffers): an L2 hit
    smem: int           # LDS / LDSM
    shuffle: int        # SHFL
    barrier: int        # BAR.SYNC of a CTA whose warps arrive together
    sfu: int            # MUFU
    convert: int        # F2F, F2I, I2F and other variable-latency conversions
    constant: int       # LDC / ULDC (constant cache hit)
    other: int          # any other variable-latency instruction (S2R, VOTE, ...)
    operand_read: int   # a variable-latency instruction's source registers are read (its read scoreboard)
    issue_rate: float   # warp-instructions a scheduler issues per clock, at best
    launch: float       # seconds per launch: the gap between back-to-back kernels


@dataclass(frozen=True)
class Card:
    name: str
    sms: int
    copy_bw: float      # torch.clone's bandwidth, bytes read plus written per second
    sets: tuple         # (optimistic, pessimistic) Constants


# docs/tuning.md, "The constants", gives the source of each figure
OPTIMISTIC = Constants("opt", clock=1.98e9, dram_ns=350.0, l2_ns=145.0, smem=24, shuffle=24, barrier=20, sfu=18,
                       convert=14, constant=32, other=20, operand_read=4, issue_rate=1.0, launch=1.3e-6)
PESSIMISTIC = Constants("pess", clock=1.755e9, dram_ns=700.0, l2_ns=280.0, smem=32, shuffle=32, barrier=40, sfu=25,
                        convert=20, constant=32, other=30, operand_read=8, issue_rate=0.8, launch=2.5e-6)
CARDS = (Card("H100-SXM", 132, 3.0e12, (OPTIMISTIC, PESSIMISTIC)),
         Card("H200", 132, 4.3e12, (OPTIMISTIC, PESSIMISTIC)))
SETS = (OPTIMISTIC, PESSIMISTIC)


def card(name: str) -> Card:
    for c in CARDS:
        if c.name == name:
            return c
    raise KeyError(name)


# ------------------------------------------------------------------------------------------
# one instruction, as the scheduler sees it

@dataclass(frozen=True)
class Instr:
    addr: int
    text: str
    op: str             # the opcode with its modifiers (``LDG.E.128``)
    stall: int          # cycles before the warp's next instruction may issue
    wbar: int           # scoreboard its result is counted on (-1: fixed latency)
    rbar: int           # scoreboard its source operands are counted on until read (-1: none)
    wait: int           # mask of scoreboards that must drain before it issues
    depbar: tuple = ()  # DEPBAR.LE: (scoreboard, at most outstanding, (other scoreboards drained))


def control(word: int) -> dict:
    """The scheduling fields of an sm_70+ instruction's second 64-bit word (Jia et al., 2018):
    stall cycles (4 bits), yield (1), write scoreboard (3), read scoreboard (3, 7 = none),
    wait mask (6), operand reuse (4)."""
    wbar, rbar = (word >> 46) & 7, (word >> 49) & 7
    return dict(stall=(word >> 41) & 15, wbar=-1 if wbar == 7 else wbar, rbar=-1 if rbar == 7 else rbar,
                wait=(word >> 52) & 63)


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P[T0-9]+\s+", "", text).split(" ")[0]


def width(op: str) -> int:
    for token, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if token in op:
            return size
    return 4


def make_instr(addr: int, text: str, word: int | None) -> Instr:
    op = opcode(text)
    ctl = control(word) if word is not None else dict(stall=1, wbar=-1, rbar=-1, wait=0)
    depbar = ()
    if op.startswith("DEPBAR"):
        found = re.search(r"SB(\d),\s*0x([0-9a-f]+)(?:,\s*\{([\d,\s]+)\})?", text)
        if found:
            extra = tuple(int(s) for s in found.group(3).split(",")) if found.group(3) else ()
            depbar = (int(found.group(1)), int(found.group(2), 16), extra)
    return Instr(addr, text, op, **ctl, depbar=depbar)


def is_global_load(op: str) -> bool:
    return op.startswith(("LDG", "LDGSTS"))


def base(op: str) -> str:
    """The opcode without modifiers: ``LDG.E.128`` -> ``LDG``."""
    return op.split(".")[0]


def latency_cycles(op: str, k: Constants, resident: bool = False) -> float:
    """Cycles from issue until a variable-latency instruction's result is there (``resident``:
    the kernel's wide loads read what the launch before it wrote, small enough to be in L2)."""
    name = base(op)
    if (name == "LDGSTS" or (name == "LDG" and width(op) == 16)) and not resident:
        return k.dram_ns * 1e-9 * k.clock
    if name == "LDG":
        return k.l2_ns * 1e-9 * k.clock
    if name in ("LDS", "LDSM"):
        return k.smem
    if name == "SHFL":
        return k.shuffle
    if name == "MUFU":
        return k.sfu
    if name in ("F2F", "F2I", "I2F", "FRND"):
        return k.convert
    if name in ("LDC", "ULDC"):
        return k.constant
    return k.other


# ------------------------------------------------------------------------------------------
# the issue side: slots and pipes

#: per-scheduler cycles one warp-instruction holds its pipe, from the per-SM results per clock of
#: compute capability 9.0 (CUDA C++ Programming Guide, arithmetic instruction throughput): FP32
#: 128 (1 cycle), integer multiply-add 64 (2), integer add/logic/shift/compare/select 64 (2), FP64
#: 64 (2), special functions and conversions 16 (8). F2FP (the fp32 -> 16-bit pack) has a fixed
#: latency in the SASS (no scoreboard), so it runs beside the ALU, not on the conversion unit.
_PIPES = {
    "fma": (1, {"FFMA", "FMUL", "FADD", "HFMA2", "HMUL2", "HADD2"}),
    "imad": (2, {"IMAD"}),
    "alu": (2, {"LOP", "LOP3", "IADD", "IADD3", "VIADD", "SHF", "ISETP", "FSETP", "FSEL", "SEL", "PRMT", "MOV",
                "LEA", "PLOP3", "P2R", "R2P", "SGXT", "IABS", "IMNMX", "FMNMX", "F2FP", "I2FP", "CS2R", "BMSK"}),
    "fp64": (2, {"DFMA", "DMUL", "DADD"}),
    "xu": (8, {"MUFU", "F2F", "F2I", "I2F", "FRND", "POPC", "FLO", "BREV"}),
}
#: FFMA and IMAD share the FMA pipe (IMAD on its half that takes integers)
_SHARED = {"imad": "fma"}
#: per-SM cycles of the shared memory pipe: 128 bytes per clock (shuffles: 32 lanes per clock)
_MIO_BYTES_PER_CLOCK = 128


def pipe_of(op: str) -> tuple[str, int]:
    name = base(op)
    for pipe, (cost, names) in _PIPES.items():
        if name in names:
            return _SHARED.get(pipe, pipe), cost
    return "other", 1


def mio_cycles(op: str) -> float:
    """Per-SM cycles a warp-instruction holds the memory pipe (shuffles, shared and global accesses)."""
    name = base(op)
    if name == "SHFL":
        return 1.0
    if name in ("LDS", "STS", "LDSM", "STSM", "LDG", "STG", "LDGSTS", "RED", "ATOM"):
        return max(1.0, 32 * width(op) / _MIO_BYTES_PER_CLOCK)
    return 0.0


@dataclass
class IssueCounts:
    """What one warp issues over one program: instructions, per-scheduler pipe cycles, SM memory-pipe cycles."""
    instructions: float = 0.0
    pipes: dict = field(default_factory=lambda: collections.Counter())
    mio: float = 0.0

    def add(self, op: str, times: float):
        self.instructions += times
        name, cost = pipe_of(op)
        self.pipes[name] += cost * times
        self.mio += mio_cycles(op) * times

    def scheduler_cycles(self, k: Constants) -> float:
        """Cycles one warp's instructions hold a scheduler: its issue slots or its busiest pipe."""
        busiest = max([v for name, v in self.pipes.items() if name != "other"], default=0.0)
        return max(self.instructions, busiest) / k.issue_rate


# ------------------------------------------------------------------------------------------
# one warp's path through one program

@dataclass
class Path:
    """One warp through one program, alone on its scheduler (cycles)."""
    cycles: float             # the whole program
    iteration: float          # one steady-state iteration of the main loop (0 without a loop)
    round_trips: int          # dependent global round trips inside one main-loop iteration (or the program)
    iterations: int           # trips of the main loop (1 without a loop)
    first_stream: float = 0.0  # when its first 16-byte load from DRAM issues (0: it has none)


class _Warp:
    """The scheduler's view of one warp: its next issue cycle and its six scoreboards."""

    def __init__(self, k: Constants, resident: bool = False):
        self.k = k
        self.resident = resident
        self.t = 0.0
        # per scoreboard: outstanding operations as [done, depth, iteration]
        self.sb = [[] for _ in range(6)]
        self.group = None           # the open cp.async group: [done, depth]
        self.iteration = 0          # which loop iteration is being walked (for the round trips)
        self.depth = 0              # dependent global round trips waited for in this iteration
        self.first_stream = None    # issue cycle of the first 16-byte load from DRAM

    def _drain(self, b: int, keep: int = 0) -> float:
        """Wait until at most ``keep`` operations are outstanding on scoreboard ``b``; the time it allows."""
        ops = sorted(self.sb[b], key=lambda e: e[0])
        retire, self.sb[b] = ops[:max(0, len(ops) - keep)], ops[max(0, len(ops) - keep):]
        for done, depth, it in retire:
            if it == self.iteration:
                self.depth = max(self.depth, depth)
        return max([e[0] for e in retire], default=0.0)

    def step(self, ins: Instr):
        ready = self.t
        for b in range(6):
            if ins.wait >> b & 1:
                ready = max(ready, self._drain(b))
        if ins.depbar:
            b, keep, extra = ins.depbar
            ready = max(ready, self._drain(b, keep))
            for e in extra:
                ready = max(ready, self._drain(e))
        issue = ready
        op = ins.op
        if self.first_stream is None and not self.resident and is_global_load(op) and width(op) == 16:
            self.first_stream = issue
        self.t = issue + max(1, ins.stall)
        if op.startswith(("BAR.SYNC", "BAR.RED")):
            self.t = max(self.t, issue + self.k.barrier)
        if ins.rbar >= 0:
            self.sb[ins.rbar].append([issue + self.k.operand_read, 0, self.iteration])
        if op.startswith("LDGSTS"):
            done, depth = issue + latency_cycles(op, self.k, self.resident), self.depth + 1
            self.group = [max(done, self.group[0]), max(depth, self.group[1])] if self.group else [done, depth]
        if op.startswith("LDGDEPBAR"):
            # closes the open group of asynchronous copies: it counts on its scoreboard until all are in
            done, depth = self.group or [issue, 0]
            self.group = None
            self.sb[max(ins.wbar, 0)].append([done, depth, self.iteration])
        elif ins.wbar >= 0:
            done = issue + latency_cycles(op, self.k, self.resident)
            depth = self.depth + 1 if is_global_load(op) else 0
            self.sb[ins.wbar].append([done, depth, self.iteration])

    def shift(self, after: float, by: float):
        """Move everything later than ``after`` by ``by`` cycles (the iterations not walked)."""
        self.t += by
        for ops in self.sb:
            for e in ops:
                if e[0] > after:
                    e[0] += by
        if self.group and self.group[0] > after:
            self.group[0] += by


def _nest(loops):
    """Loops as a tree: ``[(start, end, index, children)]`` in code order."""
    order = sorted(range(len(loops)), key=lambda i: (loops[i][0], -loops[i][1]))
    roots, stack = [], []
    for i in order:
        start, end = loops[i]
        node = (start, end, i, [])
        while stack and not (stack[-1][0] <= start and end <= stack[-1][1]):
            stack.pop()
        (stack[-1][3] if stack else roots).append(node)
        stack.append(node)
    return roots


#: iterations of a loop walked one by one; the rest repeat the mean time of the last ``STEADY``
#: (a prefetching loop settles into a period as long as its pipelining depth)
WALKED, STEADY = 8, 4


def timeline(instrs: list[Instr], loops: list, trips: list, k: Constants, resident: bool = False) -> Path:
    """One warp's path through a program whose ``i``-th loop runs ``trips[i]`` times (``resident``:
    see :func:`latency_cycles`)."""
    warp = _Warp(k, resident)
    addrs = [ins.addr for ins in instrs]
    index = {a: i for i, a in enumerate(addrs)}
    counts = [trips[i] if i < len(trips) else 1 for i in range(len(loops))]
    # the main loop: the one whose body runs most instructions in all
    main = max(range(len(loops)), key=lambda i: counts[i] * (index[loops[i][1]] - index[loops[i][0]] + 1),
               default=None)
    found = {}

    def region(lo: int, hi: int, children):
        i = lo
        for start, end, li, inner in children + [(None, None, None, None)]:
            stop = index[start] if start is not None else hi + 1
            while i < stop:
                warp.step(instrs[i])
                i += 1
            if start is None:
                break
            loop(index[start], index[end], li, inner)
            i = index[end] + 1

    def loop(lo: int, hi: int, li: int, inner):
        n = counts[li]
        ends = [warp.t]
        for _ in range(min(n, WALKED)):
            if li == main:
                # round trips are counted per iteration of the main loop
                warp.iteration += 1
                warp.depth = 0
            region(lo, hi, inner)
            ends.append(warp.t)
            if li == main:
                found["round_trips"] = warp.depth
        last = ends[-min(len(ends) - 1, STEADY) - 1:]
        step = (last[-1] - last[0]) / max(1, len(last) - 1)
        if li == main and n:
            found["iteration"] = step
        if n > WALKED:
            warp.shift(ends[-2], step * (n - WALKED))
        if li == main:
            # after the loop, waits on its loads add no round trip
            warp.iteration += 1
            warp.depth = 0

    region(0, len(instrs) - 1, _nest(loops))
    if main is None:
        # a program without a loop is one iteration
        return Path(cycles=warp.t, iteration=warp.t, round_trips=warp.depth, iterations=1,
                    first_stream=warp.first_stream or 0.0)
    return Path(cycles=warp.t, iteration=found.get("iteration", 0.0), round_trips=found.get("round_trips", 0),
                iterations=counts[main], first_stream=warp.first_stream or 0.0)


# ------------------------------------------------------------------------------------------
# a launch on a card

def ctas_per_sm(regs: int, warps: int, smem: int) -> int:
    """Resident CTAs per SM: registers (256 per warp granule), warps, CTA slots, shared memory
    (the arithmetic the package's launchers size their grids with)."""
    return planning.resident_ctas(regs, warps, smem, planning.SM90)


def launch_time(path: Path, issue: IssueCounts, programs: int, warps: int, ctas: int, hbm_bytes: int,
                card_: Card, k: Constants) -> dict:
    """The time of one launch of ``programs`` CTAs on ``card_`` under constants ``k``.

    The CTAs fill ``ctas`` resident slots per SM in waves; each wave takes the longest of
    one warp's path, the issue and pipe cycles of the warps sharing a scheduler (and the
    SM's memory pipe), and its share of the bytes at the copy bandwidth. A wave after the
    first starts when the one before it ends (its programs do the same work, so they end
    together), and until its programs issue their first 16-byte load from DRAM (the path's
    ``first_stream``: the prologue, such as loading coefficients) the memory has nothing of
    theirs to stream: that time adds to such a wave's memory side. The first wave's is left
    out, as it is for one wave of persistent programs (what ``torch.clone`` is compared with
    has no such prologue either: docs/tuning.md, "Mixed batches").
    """
    slots = max(1, ctas) * card_.sms
    waves = programs / slots
    full, tail = divmod(programs, slots)
    dead = path.first_stream / k.clock
    # (programs in the wave, waves like it, its time before the first streamed load)
    if dead and full + bool(tail) > 1:
        parts = ([(slots, 1, 0.0)] if full else []) + [(slots, full - 1, dead)] + ([(tail, 1, dead)] if tail else [])
    else:
        parts = [(slots, full, 0.0)] + ([(tail, 1, 0.0)] if tail else [])
    totals = collections.Counter()
    for size, count, wait in parts:
        if not count:
            continue
        per_sm = -(-size // card_.sms)
        per_scheduler = -(-per_sm * warps // SCHEDULERS)
        latency = path.cycles / k.clock
        issue_t = max(per_scheduler * issue.scheduler_cycles(k), per_sm * warps * issue.mio) / k.clock
        memory = hbm_bytes * size / programs / card_.copy_bw + wait
        wave = {"memory": memory, "issue": issue_t, "latency": latency}
        bound = max(wave, key=wave.get)
        totals["time"] += count * wave[bound]
        for name, value in wave.items():
            totals[name] += count * value
        totals["bound_" + bound] += count * wave[bound]
    bound = max(("memory", "issue", "latency"), key=lambda b: totals["bound_" + b])
    return {"time": totals["time"] + k.launch, "waves": waves, "bound": bound,
            "seconds": {b: totals[b] for b in ("memory", "issue", "latency")}}


def clone_time(nbytes: int, card_: Card, k: Constants) -> float:
    """``torch.clone`` of ``nbytes``: read and write them at the copy bandwidth, one launch."""
    return 2 * nbytes / card_.copy_bw + k.launch


def ratio_range(times: dict, clone: dict) -> tuple[float, float]:
    return tuple(times[k.name] / clone[k.name] for k in SETS)


def fmt(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.2f}"
