import pytest

from softnic._batch import DROP_REASONS, Batch


def test_batch_roundtrip():
    b = Batch(4)
    assert b.push(b"abc", port=3) == 0
    assert b.get(0) == b"abc" and b.port(0) == 3 and b.drop_reason(0) == "ok"
    b.clear()
    assert len(b) == 0


def test_batch_limits():
    b = Batch(1, slot_size=512, headroom=256)
    with pytest.raises(ValueError):
        b.push(bytes(300))
    b.push(bytes(256))
    with pytest.raises(IndexError):
        b.push(b"x")
    assert DROP_REASONS[0] == "ok"


def test_count_cannot_exceed_the_slots():
    """Every stage trusts count: Python may reset it, never push it past size."""
    b = Batch(2)
    b.count = 2
    with pytest.raises(ValueError):
        b.count = 3
    with pytest.raises(ValueError):
        b.count = -1
    assert b.count == 2
