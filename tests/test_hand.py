"""``Hand``, the worker's sans-I/O prefetch and batch policy: decisions from events and
durations only, tested without sockets or clocks."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

import math

from luigi_daisy.hand import (
    BATCH_ROUND_TRIPS,
    BATCH_SECONDS,
    MAX_IN_HAND,
    Hand,
)
from luigi_daisy.protocol import MAX_BATCH_BLOCKS, BlockResult

OK = 2
FAILED = 3


def drive(hand: Hand, block_seconds: float, round_trip: float, blocks: int) -> list[int]:
    """Simulate a worker whose requests are answered in full after ``round_trip``
    seconds and whose blocks take ``block_seconds``; return the sizes of the requests."""
    requests = []
    clock = 0.0
    answer_at = None
    next_index = 0
    done = 0
    while done < blocks:
        if answer_at is not None and (clock >= answer_at or hand.must_wait()):
            exact = clock < answer_at
            clock = max(clock, answer_at)
            hand.answered(list(range(next_index, next_index + hand.asked)),
                          round_trip, exact)
            next_index += len(hand.blocks)
            answer_at = None
        want = hand.to_ask()
        if want or hand.results:  # every result goes before the next block starts
            results = hand.take_results(want)
            assert len(results) <= MAX_BATCH_BLOCKS
            if want:
                requests.append(want)
                answer_at = clock + round_trip
        if hand.must_wait():
            assert not hand.results, "results are sent before the worker waits"
            continue
        hand.blocks.popleft()
        clock += block_seconds
        hand.finished(BlockResult(done, OK), block_seconds)
        done += 1
    return requests


def test_without_prefetch_a_worker_asks_for_one_block_when_its_hand_is_empty():
    hand = Hand(prefetch=0)
    requests = drive(hand, block_seconds=1e-6, round_trip=1e-3, blocks=50)
    assert requests == [1] * 50


def test_long_blocks_keep_prefetch_blocks_in_hand():
    hand = Hand(prefetch=1)
    requests = drive(hand, block_seconds=BATCH_SECONDS, round_trip=0.001, blocks=40)
    assert requests[0] == 2 and set(requests[1:]) == {1}
    assert hand.ahead() == 1


def test_short_blocks_are_asked_for_in_batches_that_cover_two_round_trips():
    hand = Hand(prefetch=1)
    requests = drive(hand, block_seconds=1e-5, round_trip=2e-4, blocks=2000)
    assert hand.ahead() == min(MAX_IN_HAND, 40)
    assert sum(requests) >= 2000 and len(requests) < 2000 / 10


def test_blocks_as_long_as_a_round_trip_keep_two_round_trips_in_hand():
    # a busy server: 100 ms blocks, 800 ms round trips
    hand = Hand(prefetch=1)
    requests = drive(hand, block_seconds=0.1, round_trip=0.8, blocks=200)
    assert hand.ahead() == 16
    assert len(requests) < 200 / 3, "several blocks per request"


def test_blocks_shorter_than_a_second_are_asked_for_a_few_at_a_time():
    hand = Hand(prefetch=1)
    requests = drive(hand, block_seconds=0.1, round_trip=0.001, blocks=200)
    assert hand.ahead() == math.ceil(BATCH_SECONDS / 0.1)
    assert len(requests) < 200 / 4


@given(prefetch=st.integers(0, 8), block_seconds=st.floats(1e-7, 10.0),
       round_trip=st.floats(1e-6, 10.0), blocks=st.integers(1, 300))
def test_requests_stay_within_the_limits(prefetch, block_seconds, round_trip, blocks):
    hand = Hand(prefetch)
    requests = drive(hand, block_seconds, round_trip, blocks)
    assert all(1 <= want <= MAX_BATCH_BLOCKS for want in requests)
    ahead = hand.ahead()
    if prefetch == 0:
        assert ahead == 0
    else:
        covered = math.ceil(max(BATCH_ROUND_TRIPS * round_trip, BATCH_SECONDS)
                            / block_seconds)
        assert ahead == max(prefetch, min(MAX_IN_HAND, covered))


def test_a_result_is_never_kept_back_when_the_next_block_starts():
    hand = Hand(prefetch=1)
    hand.answered(["a", "b", "c"], 1e-3, exact=True)
    for index in range(3):
        hand.blocks.popleft()
        hand.finished(BlockResult(index, OK), 1e-6)
        # Client.next_block sends whatever results exist before returning a block
        results = hand.take_results(hand.to_ask())
        assert [result.index for result in results] == [index]
        assert not hand.results


def test_one_request_at_a_time_and_none_after_the_last_block():
    hand = Hand(prefetch=2)
    assert hand.to_ask() == 3
    hand.take_results(3)
    assert hand.to_ask() == 0 and hand.must_wait()
    hand.answered(None, 1e-3, exact=True)
    assert hand.no_more_blocks and hand.to_ask() == 0 and not hand.must_wait()
