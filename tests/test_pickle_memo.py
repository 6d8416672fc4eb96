"""PickleMemo: pickles already read are shared by their bytes, up to a total size."""

from zinspect.core.torchzip import PickleMemo


def test_many_distinct_pickles_are_kept_until_the_total_is_spent():
    # a pp x tp run repeats one optimizer pickle per (stage, tp) slice: 64 distinct of 512
    memo = PickleMemo(max_bytes=100, total_bytes=64 * 10)
    parsed = {}
    for i in range(64):
        raw = b"%09d" % i + b"."
        parsed[raw] = (i,)
        memo.put(raw, parsed[raw])
    assert all(memo.get(raw) is value for raw, value in parsed.items())
    memo.put(b"0123456789X", ("no room",))  # the 640 bytes are spent
    assert memo.get(b"0123456789X") is None


def test_a_pickle_beyond_the_size_limit_is_not_kept_and_a_repeat_costs_nothing():
    memo = PickleMemo(max_bytes=8, total_bytes=20)
    memo.put(b"123456789", ("big",))
    assert memo.get(b"123456789") is None
    memo.put(b"1234", ("a",))
    memo.put(b"1234", ("again",))  # the same bytes twice: kept once, charged once
    assert memo.get(b"1234") == ("a",)
    assert memo.room == 16
