import itertools

import pytest

import qgoft_kernels as qk
from qgoft_kernels.schedule import schedule


def test_spec_example_d6():
    s = schedule(6)
    assert s.stages == (((0, 1), (2, 3), (4, 5)), ((0, 2),), ((0, 4),))
    assert s.offsets == (0, 3, 4, 5)


@pytest.mark.parametrize("d", [1, 2, 3, 5, 6, 8, 17, 100, 768, 1000, 3072, 4096, 11008, 16384])
def test_tree_has_d_minus_1_pairs_in_ceil_log2_stages(d):
    s = schedule(d)
    assert qk.num_pairs(d) == s.num_pairs == d - 1
    assert qk.num_stages(d) == s.num_stages == (d - 1).bit_length()
    assert s.padded_dim >= d > s.padded_dim // 2 or d == 1
    for r, stage in enumerate(s.stages, start=1):
        stride = 1 << (r - 1)
        assert all(j == i + stride and i % (2 * stride) == 0 and j < d for i, j in stage)
        # i ascending, disjoint
        firsts = [i for i, _ in stage]
        assert firsts == sorted(firsts)
        touched = [k for pair in stage for k in pair]
        assert len(touched) == len(set(touched))


@pytest.mark.parametrize("d, per_stage", [
    (768, [384, 192, 96, 48, 24, 12, 6, 3, 1, 1]),
    (3072, [1536, 768, 384, 192, 96, 48, 24, 12, 6, 3, 1, 1]),
    (11008, [5504, 2752, 1376, 688, 344, 172, 86, 43, 21, 11, 5, 3, 1, 1]),
])
def test_stage_sizes_match_the_official_schedule(d, per_stage):
    # the pairs per stage of the paper's official code (docs/method.md §2)
    assert [len(stage) for stage in schedule(d).stages] == per_stage


def test_paper_parameter_counts():
    # DeBERTaV3-base, all six linears of 12 blocks (in-dims 768 x5 and 3072); LLaMA-2-7B q,k,v,o
    goft = 12 * (5 * qk.num_pairs(768) + qk.num_pairs(3072))
    assert goft == 82_872
    assert 4 * goft == 331_488
    assert 32 * 4 * qk.num_pairs(4096) == 524_160


@pytest.mark.parametrize("bad, err", [(0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError)])
def test_bad_d(bad, err):
    with pytest.raises(err, match="d must"):
        qk.num_pairs(bad)


def test_unknown_structure():
    with pytest.raises(ValueError, match="structure must be one of"):
        qk.num_pairs(8, "spiral")


@pytest.mark.parametrize("d", list(range(1, 70)) + [768, 1000, 3072, 11008, 16384, 28672])
def test_closed_form_offsets_match_the_pair_lists(d):
    from qgoft_kernels.schedule import param_offsets, stage_counts

    counts = tuple(len(stage) for stage in schedule(d).stages)
    assert stage_counts(d) == counts
    assert param_offsets(d) == tuple(itertools.accumulate(counts, initial=0))
