"""Bounded fuzzing of the guest rings, device side (tests/fuzz/vring.py): hostile
descriptor tables must give counted drops or a broken ring, and the device may write
guest memory only where the spec lets it."""

import pytest
from fuzz import vring
from fuzz.common import Finding, run_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhost.testing import RingHarness

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(st.binary(max_size=300))
def test_random_input(data):
    vring.one(data)


def test_bounded_mutation_run_reaches_fatal_and_drop_reasons():
    labels = run_for(vring.one, vring.SEEDS, seconds=5)
    words = {w for label in labels for w in label.replace(":", ",").split(",")}
    assert {"tx", "rx", "ok", "bad_addr", "bad_head"} <= words, sorted(words)
    assert words & {"zero_len", "desc_order", "tx_too_long", "rx_too_big"}


def test_write_check_catches_a_stray_write():
    with RingHarness(num=8, buf_size=64, mem_size=vring.MEM) as h:
        before = h.ram.read(0, vring.MEM)
        after = bytearray(before)
        after[h.free_off + 100] ^= 1
        vring._check_writes(h, before, bytes(after), [(h.gpa_base + h.free_off + 100, 1)])
        with pytest.raises(Finding):
            vring._check_writes(h, before, bytes(after), [])


@pytest.mark.parametrize("rx", [False, True])
def test_vanishing_memory_case_faults_into_a_broken_ring(rx):
    """The harness's vanishing-memory case with everything cut (the empty input chooses
    a cut at 0): the device faults, and the guard leaves a broken ring, no crash."""
    from fuzz.common import Reader

    with RingHarness(num=8, buf_size=64, mem_size=vring.MEM) as h:
        assert vring._vanish(Reader(b""), h, rx).endswith("vanish:guest_memory_fault")
