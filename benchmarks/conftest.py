"""What the pytest-benchmark table of ``pytest benchmarks/`` measures, printed under it."""
import pytest


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    if not any("test_train_step" in r.nodeid for r in terminalreporter.stats.get("passed", [])):
        return
    from benchmarks.test_bench import TOKENS, D, K

    terminalreporter.write_line(
        f"The table above (test_train_step): one training step (forward + backward incl. dx, no optimizer) of "
        f"each method on one {D} -> {K} layer, {TOKENS} tokens, fp32, on this machine's CPU, pytest-benchmark's "
        f"own rounds. A quick check that every method runs; the comparison of record is the peers table of "
        f"`make bench` (interleaved rounds, paired ratios).")
