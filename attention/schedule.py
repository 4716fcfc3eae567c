"""Which sampling step a model call belongs to, identified by sigma so that any sampler works
(multi-evaluation samplers such as heun call the model between schedule sigmas)."""
from __future__ import annotations

import functools
from array import array
from dataclasses import dataclass

import torch


class ScheduleError(ValueError):
    pass


def step_index(sigma: float, sample_sigmas: torch.Tensor) -> int:
    """Index i of the schedule interval [sigma_i, sigma_{i+1}) that sigma belongs to."""
    return step_in(sigma, schedule_starts(sample_sigmas))


def schedule_starts(sample_sigmas: torch.Tensor) -> list[float]:
    """The sigmas that start each step, as float32 values (step_in compares in float32, as torch did)."""
    return sample_sigmas[:-1].float().cpu().tolist()


def step_in(sigma: float, starts: list[float]) -> int:
    """step_index on schedule_starts(): plain Python, for a lookup every model call makes."""
    threshold = array("f", [sigma * (1 - 1e-5)])[0]  # rounded to float32, as a float32 tensor compares
    return max(sum(1 for s in starts if s >= threshold) - 1, 0)


@functools.lru_cache(maxsize=1024)
def sigma_key(sigma: float) -> str:
    """A dictionary key that identifies one model evaluation of a run."""
    return f"{float(sigma):.7g}"


@dataclass(frozen=True)
class StepRange:
    """Active for steps i with int(start*N) <= i < int(end*N), N = number of steps (P2P's
    self-attention and local-blend rule). `cross`: P2P's cross-attention rule, whose per-step
    weights have N + 1 rows (get_time_words_attention_alpha): int(start*(N+1)) <= i < int(end*(N+1))."""
    start: float = 0.0
    end: float = 1.0
    cross: bool = False

    def __post_init__(self):
        if not (0.0 <= self.start <= 1.0 and 0.0 <= self.end <= 1.0):
            raise ScheduleError(f"a step fraction must be within [0, 1], got start={self.start}, end={self.end}")
        if self.start > self.end:
            raise ScheduleError(f"the step range starts after it ends (start={self.start} > end={self.end})")

    def active(self, step: int, num_steps: int) -> bool:
        n = num_steps + 1 if self.cross else num_steps
        return int(self.start * n) <= step < int(self.end * n)

    @property
    def empty(self) -> bool:
        return self.end <= self.start


def parse_word_values(text: str, low: float = 0.0, high: float = 1.0, what: str = "fraction") -> dict[str, float]:
    """'bicycle=0.4, car=0.6' -> {'bicycle': 0.4, 'car': 0.6}, each value within [low, high]."""
    example = f"car={high / 2:g}"
    out: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in text.replace(";", ",").split(","))):
        word, sep, value = item.partition("=")
        if word.strip() in out:
            raise ScheduleError(f"'{word.strip()}' is given twice: give each word one {what}")
        try:
            out[word.strip()] = float(value)
        except ValueError:
            raise ScheduleError(f"'{item}' is not of the form word={what} (e.g. '{example}')") from None
        if not word.strip():
            raise ScheduleError(f"'{item}' names no word (write e.g. '{example}')")
        if not sep or not low <= out[word.strip()] <= high:
            raise ScheduleError(f"'{item}': the {what} must be within [{low:g}, {high:g}] (e.g. '{example}')")
    return out


def parse_word_fractions(text: str) -> dict[str, float]:
    """Per-word cross-attention schedules: 'bicycle=0.4, car=0.6'."""
    return parse_word_values(text)
