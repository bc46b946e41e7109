"""Bounded fuzzing of the frame parser and the TX offloads (tests/fuzz/tso.py)."""

import struct

import pytest
from fuzz import tso
from fuzz.common import Finding, check_ip, inet_sum, run_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(st.binary(max_size=300))
def test_random_input(data):
    tso.one(data)


@SETTINGS
@given(st.sampled_from(tso.SEEDS), st.lists(st.tuples(st.integers(0, 60), st.integers(0, 255)),
                                           max_size=6))
def test_mutated_seeds(seed, edits):
    b = bytearray(seed)
    for i, v in edits:
        b[i % len(b)] = v
    tso.one(bytes(b))


def test_bounded_mutation_run():
    labels = run_for(tso.one, tso.SEEDS, seconds=4)
    ops = {label.split(":")[0] for label in labels}
    assert ops == {"parse", "csum", "tso", "batch", "clamp", "onepass"}
    assert any(label.endswith(":fused") for label in labels)     # the one-pass path ran
    assert "tso:ok" in labels and "tso:bad_vnet_hdr" in labels


def test_oracles_can_fail():
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, bytes(4), bytes(4)))
    struct.pack_into("!H", ip, 10, 0xFFFF - inet_sum(bytes(ip)))
    udp = struct.pack("!HHHH", 1, 2, 8, 0)
    check_ip(bytes(ip) + udp)
    ip[8] ^= 1                                  # TTL changed, checksum not
    with pytest.raises(Finding):
        check_ip(bytes(ip) + udp)
    with pytest.raises(Finding):                # a segment with more payload than the MSS
        fr = tso.Frame(tso.Reader(bytes([0, 0, 0, 1, 0, 100]) + bytes(40)))
        assert len(fr.payload) == 100
        tso.check_segments(fr, [fr.bytes], 1, exact=False)
