"""lambda schedules against hand-computed values of the paper's Algorithm 1."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prosparse_fx import ConstantSchedule, ProSparseSchedule

PAPER_7B = [(0, 5000), (5e-3, 6000), (5e-2, 10000), (5e-2, 12000), (2e-1, 16000), (2e-1, 16500)]


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.0),
        (5000, 0.0),  # end of the substitution stage
        (5001, 5e-3),  # warmup stage holds lambda_1
        (6000, 5e-3),
        (7000, 5e-3 + (1 - math.cos(math.pi * 0.25)) / 2 * (5e-2 - 5e-3)),
        (8000, 5e-3 + 0.5 * (5e-2 - 5e-3)),  # p = 1/2 gives eta = 1/2
        (10000, 5e-2),
        (11000, 5e-2),  # equal peaks: flat
        (14000, 5e-2 + 0.5 * (2e-1 - 5e-2)),
        (16250, 2e-1),
        (16500, 2e-1),
        (99999, 2e-1),  # after the last boundary: the last peak
    ],
)
def test_paper_schedule_values(step: int, expected: float) -> None:
    assert ProSparseSchedule.from_stages(PAPER_7B)(step) == pytest.approx(expected, abs=1e-12)


def test_stage_index() -> None:
    s = ProSparseSchedule.from_stages(PAPER_7B)
    assert [s.stage(t) for t in (0, 5000, 5001, 6001, 12000, 16001, 20000)] == [0, 0, 1, 2, 3, 5, 5]


def test_scaled_keeps_proportions_and_every_stage() -> None:
    s = ProSparseSchedule.from_stages(PAPER_7B).scaled(330)
    assert s.ends == (100, 120, 200, 240, 320, 330)
    assert s.lambdas == ProSparseSchedule.from_stages(PAPER_7B).lambdas
    tiny = ProSparseSchedule.from_stages(PAPER_7B).scaled(6)
    assert tiny.ends == (1, 2, 3, 4, 5, 6)
    with pytest.raises(ValueError, match="at least 6"):
        ProSparseSchedule.from_stages(PAPER_7B).scaled(5)


@pytest.mark.parametrize(
    ("stages", "match"),
    [
        ([], "at least one"),
        ([(0, 10), (0.1, 5)], "strictly increasing"),
        ([(0, 10), (0.2, 20), (0.1, 30)], "must not decrease"),
        ([(-1, 10)], ">= 0"),
        ([(float("nan"), 10)], ">= 0"),
        ([(0.1,)], "pairs"),
    ],
)
def test_bad_stages(stages, match) -> None:
    with pytest.raises(ValueError, match=match):
        ProSparseSchedule.from_stages(stages)


def test_constant_schedule() -> None:
    assert ConstantSchedule(0.2)(0) == ConstantSchedule(0.2)(10**6) == 0.2
    with pytest.raises(ValueError):
        ConstantSchedule(-1.0)


@given(
    peaks=st.lists(st.floats(0, 10, allow_nan=False), min_size=2, max_size=6),
    lengths=st.lists(st.integers(1, 50), min_size=6, max_size=6),
)
def test_schedule_is_monotone_and_bounded_after_stage0(peaks, lengths) -> None:
    peaks = sorted(peaks)
    ends = [sum(lengths[: i + 1]) for i in range(len(peaks))]
    s = ProSparseSchedule.from_stages(list(zip([0.0] + peaks[1:], ends)))
    values = [s(t) for t in range(ends[0] + 1, ends[-1] + 5)]
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))
    assert all(min(s.lambdas) - 1e-12 <= v <= max(s.lambdas) + 1e-12 for v in values)
    # each stage ends exactly at its peak
    for lam, end in zip(s.lambdas, s.ends):
        assert s(end) == pytest.approx(lam)
