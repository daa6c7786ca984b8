"""Retention policies, pure: no disk, expected sets worked out by hand."""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest

from ckptstore._retention import (
    AnyOf,
    Candidate,
    KeepBest,
    KeepEvery,
    KeepLast,
    Mode,
    Policy,
    best_step,
    victims,
)


def run(values: Mapping[int, float | None], policy: Policy, metric: str, mode: Mode) -> set[int]:
    """Save the steps in order, applying retention after each commit like the manager."""
    kept: dict[int, Candidate] = {}
    for step, value in values.items():
        kept[step] = Candidate(step, {} if value is None else {metric: value})
        best = best_step(kept.values(), metric, mode)
        for victim in victims(list(kept.values()), policy, [step, best]):
            del kept[victim]
    return set(kept)


def test_issue_case_keep_last_2_keep_best_1_val_loss() -> None:
    # 1:0.5 2:0.3 3:0.4 4:0.45 5:0.6, min: last two are {4, 5}, the best is 2 (0.3).
    policy = AnyOf((KeepLast(2), KeepBest(1, "val_loss", "min")))
    values = {1: 0.5, 2: 0.3, 3: 0.4, 4: 0.45, 5: 0.6}
    assert run(values, policy, "val_loss", "min") == {2, 4, 5}
    candidates = [Candidate(s, {"val_loss": v}) for s, v in values.items()]
    assert best_step(candidates, "val_loss", "min") == 2


def test_issue_case_keep_last_1_keep_best_2_wer() -> None:
    # wer 10.385, 10.238, 9.965 at steps 1, 2, 3: keep the newest (3) and the two
    # lowest (3: 9.965, 2: 10.238); step 1 goes.
    policy = AnyOf((KeepLast(1), KeepBest(2, "wer", "min")))
    values = {1: 10.385, 2: 10.238, 3: 9.965}
    assert run(values, policy, "wer", "min") == {2, 3}
    candidates = [Candidate(s, {"wer": v}) for s, v in values.items()]
    assert best_step(candidates, "wer", "min") == 3


@pytest.mark.parametrize("n", [0, -1, -5, True, 1.0, "2"])
def test_policies_refuse_counts_that_are_not_positive_ints(n: object) -> None:
    for make in (KeepLast, KeepEvery, lambda k: KeepBest(k, "m")):
        with pytest.raises(ValueError):
            make(n)  # type: ignore[arg-type]


def test_keep_best_refuses_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        KeepBest(1, "m", "lowest")  # type: ignore[arg-type]


def test_keep_last_orders_by_step_not_by_input_order() -> None:
    shuffled = [Candidate(s, {}) for s in (120000, 9, 1000000, 10)]
    assert KeepLast(2).keep(shuffled) == {120000, 1000000}


def test_keep_every_keeps_multiples() -> None:
    candidates = [Candidate(s, {}) for s in range(1, 11)]
    assert KeepEvery(4).keep(candidates) == {4, 8}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("mode", ["min", "max"])
def test_non_finite_metric_is_never_best(bad: float, mode: str) -> None:
    candidates = [Candidate(1, {"m": 5.0}), Candidate(2, {"m": bad})]
    assert best_step(candidates, "m", mode) == 1  # type: ignore[arg-type]
    assert KeepBest(1, "m", mode).keep(candidates) == {1}  # type: ignore[arg-type]


def test_only_non_finite_metrics_means_no_best() -> None:
    candidates = [Candidate(1, {"m": math.nan}), Candidate(2, {"m": -math.inf})]
    assert best_step(candidates, "m", "min") is None
    assert KeepBest(2, "m").keep(candidates) == set()


def test_missing_metric_is_never_a_candidate_not_even_as_zero() -> None:
    # A missing metric treated as 0 would win under "min" against 0.5.
    candidates = [Candidate(1, {"other": -1.0}), Candidate(2, {"m": 0.5})]
    assert best_step(candidates, "m", "min") == 2
    assert best_step([Candidate(1, {})], "m", "min") is None
    assert best_step(candidates, None, "min") is None


@pytest.mark.parametrize("mode", ["min", "max"])
def test_tie_goes_to_the_earlier_step(mode: str) -> None:
    candidates = [Candidate(s, {"m": v}) for s, v in ((3, 0.2), (5, 0.2), (1, 0.9), (7, 0.2))]
    if mode == "max":
        candidates = [Candidate(s, {"m": -v}) for s, v in ((3, 0.2), (5, 0.2), (1, 0.9), (7, 0.2))]
        # -0.2 beats -0.9 under max; 3, 5, 7 tie.
    assert best_step(candidates, "m", mode) == 3  # type: ignore[arg-type]
    assert KeepBest(2, "m", mode).keep(candidates) == {3, 5}  # type: ignore[arg-type]


def test_mode_max_prefers_the_highest() -> None:
    candidates = [
        Candidate(1, {"acc": 0.7}),
        Candidate(2, {"acc": 0.9}),
        Candidate(3, {"acc": 0.8}),
    ]
    assert best_step(candidates, "acc", "max") == 2
    assert KeepBest(2, "acc", "max").keep(candidates) == {2, 3}


def test_victims_without_a_policy_is_empty() -> None:
    candidates = [Candidate(s, {}) for s in range(5)]
    assert victims(candidates, None, []) == []


def test_victims_never_include_protected_or_newest() -> None:
    candidates = [Candidate(s, {}) for s in (1, 2, 3, 4)]
    # KeepEvery(10) wants none of them; 4 is the newest, 2 is protected (a pointer target).
    assert victims(candidates, KeepEvery(10), [2, None]) == [1, 3]


def test_any_of_is_the_union() -> None:
    candidates = [Candidate(s, {"m": float(10 - s)}) for s in range(1, 9)]
    policy = AnyOf((KeepLast(1), KeepEvery(3), KeepBest(1, "m", "max")))
    # last: 8; every 3: 3, 6; best under max of 10 - s: step 1.
    assert policy.keep(candidates) == {1, 3, 6, 8}
    assert victims(candidates, policy, []) == [2, 4, 5, 7]
