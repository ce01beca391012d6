"""The static cost model (``benchmarks/sass.py``): its SASS reading, its copy reference point,
and one real run, which also compiles every kernel variant for sm_90 with Triton's own
compiler (the interpreter misses what only the compiler rejects). Runs without a GPU."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("triton.backends.nvidia")
sys.path.insert(0, str(ROOT))
from benchmarks import sass  # noqa: E402

SASS = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.U16 R8, desc[UR4][R2.64+0x10] ;
        /*0030*/                   FADD R9, R4, R5 ;
        /*0040*/                   LDGSTS.E.BYPASS.128 [R10], desc[UR4][R2.64] ;
        /*0050*/                   LDGDEPBAR ;
        /*0060*/                   DEPBAR.LE SB0, 0x1 ;
        /*0070*/                   FADD R9, R9, R8 ;
        /*0080*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0090*/               @P0 BRA 0x10 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   BRA 0xb0;
"""


def _sass():
    instrs = [(int(m.group(1), 16), m.group(2)) for m in map(sass._LINE.match, SASS.splitlines()) if m]
    loops = [(int(t, 16), a) for a, text in instrs for t in [text.split("BRA 0x")[-1].rstrip(";")]
             if "BRA" in text and int(t, 16) < a]
    return sass.Sass(instrs, loops, regs=40, stack=0, smem=0)


def test_loops_and_multiplicity():
    s = _sass()
    # the trap loop at the end (a branch to itself) is not a loop
    assert s.loops == [(0x10, 0x90)]
    mult = s.multiplicity([5])
    assert mult[0] == 1 and mult[1:10] == [5] * 9 and mult[10:] == [1, 1]


def test_in_flight_counts_loads_until_their_first_use():
    # 16 + 2 bytes issued; the FADD retires the 16; the async copy (16) stays in its group
    # until a DEPBAR leaves it the oldest outstanding one; the second FADD retires the 2
    assert _sass().in_flight_bytes() == 34


def test_occupancy():
    assert sass.ctas_per_sm(regs=255, warps=8, smem=0) == 1
    assert sass.ctas_per_sm(regs=128, warps=8, smem=0) == 2
    assert sass.ctas_per_sm(regs=32, warps=4, smem=0) == 16  # 64 warps per SM
    assert sass.ctas_per_sm(regs=32, warps=1, smem=0) == 32  # 32 CTAs per SM
    assert sass.ctas_per_sm(regs=32, warps=4, smem=100_000) == 2


def test_model_runs_on_one_configuration(tmp_path):
    """``python -m benchmarks.sass`` on one shape, with a small chunk so that the chunk-roots
    kernels compile too: every kernel variant the launchers use, for sm_90."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "QGOFT_POISON")}
    env.update(QGOFT_CHUNK="256", PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    out = tmp_path / "sass.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.sass", "--dims", "2000", "--rows", "4096",
                           "--ops", "forward", "forward_t", "backward", "--references", "copy", "--no-sweep",
                           "--jobs", "2", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    # the model's first reference point: a plain Triton copy kernel costs about one clone
    (copy,) = [r for r in rows if r.get("reference") == "copy"]
    assert 0.95 <= copy["predicted_over_clone"] <= 1.1, copy
    assert copy["launches"][0]["bound"] == "memory"
    assert copy["launches"][0]["global_access_widths"] == {"LDG.E.128": 1, "STG.E.128": 1}
    rows = [r for r in rows if not r.get("reference")]
    assert sorted((r["kernel"], r["block"]) for r in rows) == sorted(
        (op, b) for op in ("forward", "forward_t", "backward") for b in ("quasi", "givens"))
    names = set()
    for r in rows:
        assert {"kernel", "d", "dtype", "block", "config", "default", "predicted_over_clone", "commit",
                "triton"} <= set(r)
        assert math.isfinite(r["predicted_over_clone"]) and r["predicted_over_clone"] > 0.9
        for launch in r["launches"]:
            names.add(launch["launch"])
            if "regs" in launch:
                assert launch["regs"] > 0 and launch["warp_instructions_per_row"] > 0
    assert {"_givens_fwd_kernel", "_givens_fwd_roots_kernel", "_givens_bwd_kernel", "_givens_bwd_roots_kernel",
            "_givens_grad_sum_kernel"} <= names
