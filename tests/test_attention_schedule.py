"""attention/schedule.py: step of a sigma, P2P step ranges, per-word fractions."""
from __future__ import annotations

import pathlib
import sys

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from attention.schedule import (ScheduleError, StepRange, parse_word_fractions, parse_word_values,  # noqa: E402
                                sigma_key, step_index)

SIGMAS = torch.tensor([14.6146, 8.0, 4.0, 2.0, 1.0, 0.5, 0.0])  # 6 steps, ends at 0


@pytest.mark.parametrize("i", range(6))
def test_step_index_of_schedule_sigmas(i):
    assert step_index(float(SIGMAS[i]), SIGMAS) == i


@pytest.mark.parametrize("i", range(6))
def test_step_index_of_intermediate_sigmas(i):
    lo, hi = float(SIGMAS[i + 1]), float(SIGMAS[i])
    for sigma in ((lo + hi) / 2, hi * 0.999, lo + 1e-3):
        assert step_index(sigma, SIGMAS) == i, sigma
    if lo > 0:  # heun/dpm_2-style midpoints in log-sigma
        assert step_index((lo * hi) ** 0.5, SIGMAS) == i


def test_step_index_tolerates_float_rounding_and_out_of_range():
    for i in range(6):
        assert step_index(float(SIGMAS[i]) * (1 + 1e-6), SIGMAS) == i  # a hair above: same step
    assert step_index(100.0, SIGMAS) == 0  # above the schedule
    assert step_index(1e-4, SIGMAS) == 5  # the last interval
    assert step_index(float(SIGMAS[3].double()), SIGMAS.double()) == 3
    # a float64 schedule and a sigma from a float32 tensor of it
    s64 = torch.tensor([1.1, 0.7, 0.3, 0.0], dtype=torch.float64)
    assert [step_index(float(s64[i].float()), s64) for i in range(3)] == [0, 1, 2]


def test_sigma_key_identifies_a_sigma_across_dtypes():
    assert sigma_key(8.0) == sigma_key(torch.tensor(8.0).item()) == "8"
    assert sigma_key(float(torch.tensor(14.6146))) == sigma_key(float(torch.tensor(14.6146, dtype=torch.float64).float()))
    assert sigma_key(0.5) != sigma_key(0.5001)


def active_steps(r, n):
    return [i for i in range(n) if r.active(i, n)]


def test_step_range_p2p_semantics():
    assert active_steps(StepRange(0.2, 0.8), 10) == [2, 3, 4, 5, 6, 7]
    assert active_steps(StepRange(0.0, 1.0), 4) == [0, 1, 2, 3]
    assert active_steps(StepRange(), 3) == [0, 1, 2]
    assert active_steps(StepRange(0.0, 0.35), 10) == [0, 1, 2]  # int(3.5) = 3
    assert active_steps(StepRange(0.25, 0.5), 50) == list(range(12, 25))  # int(12.5) = 12, int(25) = 25
    assert active_steps(StepRange(0.0, 0.4), 5) == [0, 1]
    assert active_steps(StepRange(0.5, 1.0), 3) == [1, 2]  # int(1.5) = 1
    assert active_steps(StepRange(0.0, 0.0), 10) == []
    assert active_steps(StepRange(0.0, 0.05), 10) == []  # int(0.5) = 0


def test_cross_step_range_uses_p2p_n_plus_one_rows():
    # (d) P2P's get_time_words_attention_alpha has N + 1 rows: tau = 0.55 at 50 steps injects
    # int(0.55 * 51) = 28 steps, where the self-attention rule int(0.55 * 50) gives 27
    assert active_steps(StepRange(0, 0.55, cross=True), 50) == list(range(28))
    assert active_steps(StepRange(0, 0.55), 50) == list(range(27))
    assert active_steps(StepRange(0.25, 0.75, cross=True), 10) == [2, 3, 4, 5, 6, 7]  # int(2.75), int(8.25)
    assert active_steps(StepRange(0.25, 0.75), 10) == [2, 3, 4, 5, 6]  # int(2.5), int(7.5)
    assert active_steps(StepRange(0, 1, cross=True), 10) == list(range(10))  # never past the last step
    assert StepRange(0, 0.5) != StepRange(0, 0.5, cross=True)


def test_cross_rule_differs_from_the_n_rule_for_8_of_21_fractions_at_12_steps():
    taus = [round(i * 0.05, 2) for i in range(21)]  # 0.00, 0.05 .. 1.00
    cross = {t: len(active_steps(StepRange(0, t, cross=True), 12)) for t in taus}
    plain = {t: len(active_steps(StepRange(0, t), 12)) for t in taus}
    differ = [t for t in taus if cross[t] != plain[t]]
    assert differ == [0.4, 0.55, 0.65, 0.7, 0.8, 0.85, 0.9, 0.95]
    assert all(cross[t] == int(t * 13) and plain[t] == int(t * 12) for t in taus if t < 1)
    assert all(cross[t] - plain[t] in (0, 1) for t in taus)


def test_step_range_empty():
    assert StepRange(0.0, 0.0).empty and StepRange(0.4, 0.4).empty
    assert not StepRange(0.0, 0.1).empty


@pytest.mark.parametrize("start,end", [(-0.1, 0.5), (0.0, 1.1), (1.5, 1.5), (0.0, -0.2), (0.6, 0.5), (1.0, 0.0)])
def test_step_range_rejects_bad_fractions(start, end):
    with pytest.raises(ScheduleError):
        StepRange(start, end)
    assert issubclass(ScheduleError, ValueError)


def test_step_range_error_messages():
    with pytest.raises(ScheduleError, match=r"within \[0, 1\]"):
        StepRange(0.0, 1.2)
    with pytest.raises(ScheduleError, match="starts after it ends"):
        StepRange(0.7, 0.3)


def test_parse_word_fractions():
    assert parse_word_fractions("bicycle=0.4, car=0.6") == {"bicycle": 0.4, "car": 0.6}
    assert parse_word_fractions(" car = 0.25 ; dog=1 ,cat=0") == {"car": 0.25, "dog": 1.0, "cat": 0.0}
    assert parse_word_fractions("") == {}
    assert parse_word_fractions(" , ; ") == {}


def test_parse_word_values_refuses_a_word_given_twice():
    # (g) a word given twice is ambiguous: an error naming it, not "the last one wins"
    with pytest.raises(ScheduleError, match="'car' is given twice"):
        parse_word_fractions("car=0.2, car=0.7")
    with pytest.raises(ScheduleError, match="given twice"):
        parse_word_values("dog=2, cat=1; dog=2", low=-10, high=10, what="weight")
    assert parse_word_values("dog=2, cat=-1", low=-10, high=10, what="weight") == {"dog": 2.0, "cat": -1.0}


@pytest.mark.parametrize("text,needle", [
    ("car", "car"), ("car=abc", "car=abc"), ("car=0.4=0.5", "car=0.4=0.5"),
    ("car=1.5", "[0, 1]"), ("dog=0.2, car=-0.1", "car=-0.1"), ("car=nan", "car=nan"),
])
def test_parse_word_fractions_errors(text, needle):
    with pytest.raises(ScheduleError) as e:
        parse_word_fractions(text)
    assert needle in str(e.value)


def test_parse_word_fractions_rejects_a_missing_word():
    # "=0.4" names no word: it must be an error, not a schedule for the word "" (which the nodes
    # would then silently apply to no token at all)
    with pytest.raises(ScheduleError):
        parse_word_fractions("=0.4")
