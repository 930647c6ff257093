"""The replay window against the kernel's counter self-test and a model of its rule."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wgmp.protocol.constants import (
    REJECT_AFTER_MESSAGES,
    REPLAY_WINDOW_SIZE,
    REPLAY_WINDOW_WORDS,
)
from wgmp.protocol.replay import ReplayWindow

VECTORS = json.loads(
    (Path(__file__).parent.parent / "vectors" / "replay_counter.vectors.json").read_text()
)
W: int = VECTORS["window_size_W"]
KERNEL_LIMIT = int(VECTORS["variants"]["kernel"]["REJECT_AFTER_MESSAGES"])
GO_LIMIT = int(VECTORS["variants"]["wireguard-go"]["REJECT_AFTER_MESSAGES"])


def test_vector_constants_match_ours() -> None:
    assert W == REPLAY_WINDOW_SIZE == 8128
    assert GO_LIMIT == REJECT_AFTER_MESSAGES


def _run(steps: list[tuple[int, bool]], limit: int) -> None:
    window = ReplayWindow()
    for n, (counter, expected) in enumerate(steps):
        assert window.accept(counter, limit) is expected, f"step {n}: counter {counter}"


def _pairs(raw: list[list[object]]) -> list[tuple[int, bool]]:
    return [(int(counter), bool(accept)) for counter, accept in raw]  # type: ignore[call-overload]


# The wireguard-go sequence with wireguard-go's limit is the one wgmp must follow; the kernel's
# sequence with the kernel's limit holds for this algorithm too (the file's "checked" note).
@pytest.mark.parametrize(
    ("name", "limit"), [("seq1_wireguard_go", GO_LIMIT), ("seq1_kernel", KERNEL_LIMIT)]
)
def test_seq1(name: str, limit: int) -> None:
    _run(_pairs(VECTORS[name]), limit)


_RANGE = re.compile(r"(\S+) \.\. (\S+)")


def _value(expr: str) -> int:
    """'W', 'W+2' or '0' from the vectors file."""
    return sum(W if term == "W" else int(term) for term in expr.split("+"))


def _range(spec: str) -> Iterator[int]:
    """The counters of an 'X .. Y' spec, ascending or descending as its ends say."""
    match = _RANGE.search(spec)
    assert match, spec
    first, final = _value(match.group(1)), _value(match.group(2))
    step = 1 if final >= first else -1
    return iter(range(first, final + step, step))


def _bulk_cases() -> Iterator[tuple[str, str, str, list[tuple[int, bool]]]]:
    for bulk in VECTORS["bulk"]:
        spec = bulk["accept_range"]
        assert spec.startswith("i = ") and "all true" in spec, spec
        # "A .. B descending, all true (kernel); wireguard-go port uses C .. D": both variants.
        kernel_spec, _, go_spec = spec.partition("wireguard-go port uses")
        variants = {"kernel": kernel_spec, "wireguard-go": go_spec} if go_spec else {"both": spec}
        for variant, text in variants.items():
            yield bulk["name"], variant, text, _pairs(bulk["then"])


@pytest.mark.parametrize(
    ("name", "variant", "spec", "then"),
    list(_bulk_cases()),
    ids=[f"{name}-{variant}" for name, variant, _, _ in _bulk_cases()],
)
def test_bulk(name: str, variant: str, spec: str, then: list[tuple[int, bool]]) -> None:
    counters = list(_range(spec))
    assert len(counters) >= W
    _run([(c, True) for c in counters] + then, GO_LIMIT)


def test_generator_reads_the_specs() -> None:
    assert list(_range("i = 2 .. W+1 ascending, all true")) == list(range(2, W + 2))
    assert list(_range("wireguard-go port uses W+2 .. 2")) == list(range(W + 2, 1, -1))


def test_reset_forgets_everything() -> None:
    window = ReplayWindow()
    for counter in range(0, 3 * W, 7):
        assert window.accept(counter)
    window.reset()
    # After a reset even counter 0 and every counter seen before is new again.
    for counter in range(0, 3 * W, 7):
        assert window.accept(counter)


def test_limit_applies_to_old_counters_too() -> None:
    window = ReplayWindow()
    assert window.accept(100)
    assert not window.accept(50, limit=50)
    assert window.accept(49, limit=50)
    assert window.accept(50)


def test_large_jump_clears_the_whole_ring() -> None:
    window = ReplayWindow()
    for counter in range(200):
        assert window.accept(counter)
    big = 200 + 128 * 64 * 5 + 3
    assert window.accept(big)
    # Counters in the new window that alias old ring slots must not look seen.
    for counter in range(big - W, big):
        assert window.accept(counter), counter
    assert not window.accept(big - W - 1)


@pytest.mark.parametrize("words", [1, 2, 3, 64, 126, 127, 128, 129, 300])
def test_forward_jump_clears_exactly_the_words_passed(words: int) -> None:
    # Every bit of the ring set, then a jump of `words` words: the words passed over must read
    # as unseen and the ones still inside the window as seen.
    window, model = ReplayWindow(), Model()
    full = REPLAY_WINDOW_WORDS * 64
    last = full - 1 + words * 64
    for counter in [*range(full), last, *range(last - W - 64, last + 1)]:
        assert window.accept(counter) is model.accept(counter, GO_LIMIT), counter


# The exact rule, derived from wireguard-go's ValidateCounter: `last` is the largest accepted
# counter (0 for a fresh window). A counter is accepted iff it is below the limit, not accepted
# before, and either above `last` or at most W below it. "Not accepted before" needs no window
# of its own: a word is zeroed only when the window enters it, so a counter within W of `last`
# always still has its bit, and a bit never stands for an older counter in the same slot.
class Model:
    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.last = 0

    def accept(self, counter: int, limit: int) -> bool:
        if counter >= limit or counter in self.seen or counter + W < self.last:
            return False
        self.seen.add(counter)
        self.last = max(self.last, counter)
        return True


_RING_BITS = REPLAY_WINDOW_WORDS * 64
_LIMITS = (REJECT_AFTER_MESSAGES, KERNEL_LIMIT, 3 * W, 64 * 300 + 17)


def _counter(kind: int, offset: int, model: Model, base: int) -> int:
    """A counter chosen relative to the model's state, so that the edges are hit often."""
    near = max(model.last, base)
    if kind == 0:  # around both edges of the window
        return max(0, near - W - 70 + offset % (W + 140))
    if kind == 1:  # jumps of a few words up to more than the whole ring
        return max(0, near - 2 * W + offset % (2 * W + 200 * 64))
    if kind == 2 and model.seen:  # a duplicate
        return sorted(model.seen)[offset % len(model.seen)]
    if kind == 3 and model.seen:  # the same ring bit as a counter seen, one or two laps later
        seen = sorted(model.seen)[offset % len(model.seen)]
        return seen + _RING_BITS * (1 + offset % 2)
    return offset


@settings(max_examples=300, deadline=None)
@given(
    base=st.one_of(
        st.just(0),
        st.integers(0, 1 << 64),
        # just below the limit, where the window meets the limit
        st.integers(REJECT_AFTER_MESSAGES - 3 * W, REJECT_AFTER_MESSAGES + 10),
    ),
    steps=st.lists(
        st.tuples(st.integers(0, 4), st.integers(0, 1 << 64), st.integers(0, len(_LIMITS) - 1)),
        min_size=1,
        max_size=300,
    ),
)
def test_matches_model(base: int, steps: list[tuple[int, int, int]]) -> None:
    window, model = ReplayWindow(), Model()
    for kind, offset, limit_index in steps:
        counter, limit = _counter(kind, offset, model, base), _LIMITS[limit_index]
        assert window.accept(counter, limit) is model.accept(counter, limit), counter


def test_in_order_long_run_matches_model() -> None:
    window, model = ReplayWindow(), Model()
    for counter in list(range(0, 20 * W)) + list(range(19 * W - 100, 19 * W + 100)):
        assert window.accept(counter) is model.accept(counter, REJECT_AFTER_MESSAGES)


def test_resume_treats_everything_up_to_the_mark_as_seen() -> None:
    window = ReplayWindow()
    window.resume(1000)
    assert window.last == 1000
    assert not window.accept(1000) and not window.accept(999) and not window.accept(0)
    assert window.accept(1002)  # newer counters pass, out of order too
    assert window.accept(1001)
    assert not window.accept(1001)
    assert window.accept(1000 + 64 * 3)
