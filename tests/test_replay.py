"""Anti-replay (RFC 4303 §3.4.3, RFC 6479 window), ESN (RFC 4304, inference per RFC 4303
Appendix A), sequence-number exhaustion (§3.3.3) and SA lifetimes (RFC 4301 §4.4.2.1).

Packets on the wire come from scapy's ESP (an implementation nobody here wrote); window
decisions are also checked against a direct model of §3.4.3 (accept iff new and not left
of the window) over random arrival orders.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers import ipsec as sipsec
from scapy.layers.inet import IP, UDP

from softnic._esp import EspError, SecurityAssociation, _infer_seq, _replay_accept

V4 = ("192.0.2.1", "198.51.100.7")
KEY = os.urandom(20)
SPI = 0x5151
INNER = IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / b"payload"


def rx_sa(window=64, esn=False, seq=0, **kw):
    return SecurityAssociation(SPI, "tunnel", *V4, "aes-gcm", KEY, esn=esn,
                               replay_window=window, seq=seq, **kw)


def wire(seq: int, esn: bool = False) -> bytes:
    """An ESP packet with the 64-bit sequence number `seq`, encrypted by scapy."""
    tx = sipsec.SecurityAssociation(sipsec.ESP, spi=SPI, crypt_algo="AES-GCM", crypt_key=KEY,
                                    tunnel_header=IP(src=V4[0], dst=V4[1]), esn_en=esn)
    lo, hi = seq & 0xFFFFFFFF, seq >> 32
    if lo == 0:
        # scapy treats seq_num=0 as "use my counter": start the counter at 0 instead.
        tx.seq_num = 0
        return bytes(tx.encrypt(INNER, esn_en=esn, esn=hi))
    return bytes(tx.encrypt(INNER, seq_num=lo, esn_en=esn, esn=hi))


def accepted(sa, seq, esn=False) -> bool:
    try:
        out = sa.unprotect(wire(seq, esn))
    except EspError as e:
        assert e.reason == "replay", e.reason
        return False
    assert out == bytes(INNER)
    return True


@pytest.mark.parametrize("window", [64, 4096])
def test_window_end_to_end(window):
    sa = rx_sa(window)
    assert accepted(sa, 10)
    assert accepted(sa, 5) and accepted(sa, 9)          # in-window reordering
    assert not accepted(sa, 5) and not accepted(sa, 10)  # duplicates
    top = 10 + window + 100
    assert accepted(sa, top)
    assert not accepted(sa, top - window)               # just left of the window
    assert accepted(sa, top - window + 1)               # the window's left edge
    assert not accepted(sa, 9)                          # long gone
    assert accepted(sa, top - 1) and not accepted(sa, top - 1)
    assert sa.replay_top == top
    assert sa.stats()["drops"] == {"replay": 5}


def test_window_32_and_odd_sizes():
    for window in (32, 100, 1000):
        sa = rx_sa(window)
        assert _replay_accept(sa, 1000)
        assert _replay_accept(sa, 1000 - window + 1)
        assert not _replay_accept(sa, 1000 - window)
        assert not _replay_accept(sa, 1000)


@settings(max_examples=200, deadline=None)
@given(window=st.sampled_from([32, 64, 128, 1000, 4096]),
       seqs=st.lists(st.integers(0, 9000), min_size=1, max_size=300),
       jumps=st.booleans())
def test_window_matches_the_rfc_model(window, seqs, jumps):
    sa = rx_sa(window)
    seen: set[int] = set()
    top = 0
    for s in seqs:
        if jumps and s % 7 == 0:
            s *= 1000                                   # large slides, beyond the ring
        expect = s != 0 and s not in seen and (s > top or top - s < window)
        assert _replay_accept(sa, s) == expect, (s, top)
        if expect:
            seen.add(s)
            top = max(top, s)
    assert sa.replay_top == top


@pytest.mark.parametrize("window", [64, 4096])
def test_esn_wrap_of_the_low_32_bits(window):
    base = (5 << 32) - 40                              # seq_hi 4, low bits near the top
    sa = rx_sa(window, esn=True, seq=base)
    assert accepted(sa, base + 1, esn=True)
    assert accepted(sa, (5 << 32) + 3, esn=True)        # past the wrap: seq_hi 5 inferred
    assert sa.replay_top == (5 << 32) + 3
    assert accepted(sa, (5 << 32) - 2, esn=True)        # before the wrap, still in window
    assert accepted(sa, 5 << 32, esn=True)              # low bits 0 are valid with ESN
    assert not accepted(sa, (5 << 32) + 3, esn=True)    # duplicate across the wrap
    assert not accepted(sa, (5 << 32) - 2, esn=True)
    if window == 64:
        # Left of the window: infers seq_hi 5 (far ahead), so it fails the ICV rather
        # than the window, and the window does not move.
        with pytest.raises(EspError) as ei:
            sa.unprotect(wire((5 << 32) - 100, esn=True))
        assert ei.value.reason == "icv" and sa.replay_top == (5 << 32) + 3
    for i in range(4, 3 * window, 97):
        assert accepted(sa, (5 << 32) + i, esn=True)


def test_esn_inference_rfc4303_appendix_a():
    w = 64
    sa = rx_sa(w, esn=True, seq=(7 << 32) + 1000)      # case A: window inside subspace 7
    assert _infer_seq(sa, 1000 - w + 1) == (7 << 32) + 1000 - w + 1
    assert _infer_seq(sa, 5000) == (7 << 32) + 5000
    assert _infer_seq(sa, 1000 - w) == (8 << 32) + 1000 - w   # below the window: wrapped
    sa = rx_sa(w, esn=True, seq=(7 << 32) + 10)        # case B: window spans 6 and 7
    assert _infer_seq(sa, 0xFFFFFFF0) == (6 << 32) + 0xFFFFFFF0
    assert _infer_seq(sa, 5) == (7 << 32) + 5
    assert _infer_seq(sa, 0xFFFFFF00) == (7 << 32) + 0xFFFFFF00
    sa = rx_sa(w, esn=True, seq=10)                    # case B at the very start
    assert _infer_seq(sa, 0xFFFFFFF0) == 0             # would be negative: invalid
    sa = rx_sa(w, esn=False, seq=10)
    assert _infer_seq(sa, 0xFFFFFFF0) == 0xFFFFFFF0


def test_forged_packet_does_not_move_the_window():
    sa = rx_sa(64)
    assert accepted(sa, 100)
    forged = bytearray(wire(1_000_000))
    forged[-1] ^= 1
    with pytest.raises(EspError) as ei:
        sa.unprotect(bytes(forged))
    assert ei.value.reason == "icv"
    assert sa.replay_top == 100
    assert accepted(sa, 50)                    # still inside the unmoved window
    assert accepted(sa, 1_000_000)             # and the genuine packet still goes


def test_forged_esn_packet_does_not_move_the_window():
    sa = rx_sa(64, esn=True, seq=(1 << 32) + 10)
    forged = bytearray(wire((3 << 32) + 500, esn=True))  # inferred as seq_hi 1: bad ICV
    with pytest.raises(EspError) as ei:
        sa.unprotect(bytes(forged))
    assert ei.value.reason == "icv" and sa.replay_top == (1 << 32) + 10


# ---------------------------------------------------------------- outbound sequence numbers


def tx_sa(**kw):
    return SecurityAssociation(SPI, "tunnel", *V4, "aes-gcm", KEY, **kw)


@pytest.mark.parametrize("start,n_ok", [(2**32 - 3, 2), (2**32 - 2, 1)])
def test_sequence_exhaustion_without_esn(start, n_ok):
    sa = tx_sa(seq=start)
    sent = [IP(sa.protect(bytes(INNER)))[sipsec.ESP].seq for _ in range(n_ok)]
    assert sent == [start + 1 + i for i in range(n_ok)] and sent[-1] == 2**32 - 1
    for _ in range(3):
        with pytest.raises(EspError) as ei:
            sa.protect(bytes(INNER))
        assert ei.value.reason == "seq_exhausted"
    assert sa.seq == 2**32 - 1                          # nothing wrapped
    assert "seq_exhausted" in sa.pop_events()
    assert sa.stats()["drops"] == {"seq_exhausted": 3}
    assert sa.stats()["packets"] == n_ok


def test_sequence_exhaustion_with_esn_and_near_end():
    sa = tx_sa(esn=True, seq=2**32 - 2)
    for _ in range(4):
        sa.protect(bytes(INNER))                        # ESN: low bits wrap freely
    assert sa.seq == 2**32 + 2 and sa.pop_events() == []
    sa = tx_sa(esn=True, seq=2**64 - 2)
    sa.protect(bytes(INNER))
    with pytest.raises(EspError) as ei:
        sa.protect(bytes(INNER))
    assert ei.value.reason == "seq_exhausted"
    assert sa.pop_events() == ["seq_near_end", "seq_exhausted"]
    sa = tx_sa(seq=0xC0000000 - 2)
    sa.protect(bytes(INNER))
    assert sa.pop_events() == []
    sa.protect(bytes(INNER))
    assert sa.pop_events() == ["seq_near_end"]
    sa.protect(bytes(INNER))
    assert sa.pop_events() == []                        # raised once


# ---------------------------------------------------------------- lifetimes


def test_packet_lifetimes_outbound():
    sa = tx_sa(lifetime={"soft_packets": 3, "hard_packets": 5})
    events = []
    for _ in range(5):
        sa.protect(bytes(INNER))
        events.append(sa.pop_events())
    assert events == [[], [], ["soft_expired"], [], ["hard_expired"]]
    with pytest.raises(EspError) as ei:
        sa.protect(bytes(INNER))
    assert ei.value.reason == "sa_expired"
    assert sa.stats()["expired"] and sa.stats()["packets"] == 5


def test_byte_lifetimes_outbound_and_inbound():
    n = len(bytes(INNER))                               # plaintext bytes per packet
    sa = tx_sa(lifetime={"soft_bytes": 2 * n, "hard_bytes": 3 * n + 1})
    sa.protect(bytes(INNER))
    assert sa.pop_events() == []
    sa.protect(bytes(INNER))
    assert sa.pop_events() == ["soft_expired"]
    sa.protect(bytes(INNER))
    sa.protect(bytes(INNER))                            # crosses the hard limit: still goes
    assert sa.pop_events() == ["hard_expired"]
    with pytest.raises(EspError) as ei:
        sa.protect(bytes(INNER))
    assert ei.value.reason == "sa_expired"
    assert sa.stats()["bytes"] == 4 * n

    rx = rx_sa(lifetime={"soft_bytes": n, "hard_packets": 2})
    assert accepted(rx, 1)
    assert rx.pop_events() == ["soft_expired"]
    assert accepted(rx, 2)
    assert rx.pop_events() == ["hard_expired"]
    with pytest.raises(EspError) as ei:
        rx.unprotect(wire(3))
    assert ei.value.reason == "sa_expired"
    assert rx.replay_top == 2


def test_dropped_packets_do_not_count_against_lifetimes():
    rx = rx_sa(lifetime={"hard_packets": 2})
    bad = bytearray(wire(7))
    bad[-3] ^= 0xFF
    for _ in range(5):
        with pytest.raises(EspError):
            rx.unprotect(bytes(bad))
    assert accepted(rx, 1) and rx.pop_events() == []
