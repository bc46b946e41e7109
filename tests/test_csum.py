"""Internet checksum (softnic/_csum.pxd through softnic._parse's test surface) against a
straightforward RFC 1071 reference, RFC 1624 incremental updates against full recomputes,
and the pseudo-header sums against dpkt's."""

import os
import random
import struct

import dpkt
from hypothesis import given, settings
from hypothesis import strategies as st
from softnic._parse import (
    checksum,
    checksum_bulk_variants,
    checksum_chain,
    checksum_copy,
    checksum_update16,
    checksum_update32,
    l4_checksum,
)


def same_csum(incremental: int, data: bytes) -> bool:
    """Equal, except that for all-zero data the recompute gives 0xFFFF and eqn. 3 the
    equivalent +0 (RFC 1624 section 3: both are zero in ones' complement)."""
    full = checksum(data)
    if any(data):
        return incremental == full
    return full == 0xFFFF and incremental in (0, 0xFFFF)


def ref_csum(data: bytes) -> int:
    """RFC 1071 as written: big-endian 16-bit words, odd byte padded, end-around carry."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for (w,) in struct.iter_unpack("!H", data):
        s += w
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=3000))
def test_full_checksum_matches_reference(data):
    assert checksum(data) == ref_csum(data)
    copied, c = checksum_copy(data)
    assert copied == data
    assert c == ref_csum(data)


def test_checksum_edge_sizes():
    rng = random.Random(1)
    for n in list(range(0, 70)) + [1023, 1500, 9000, 65535, 65536 + 7]:
        data = rng.randbytes(n)
        assert checksum(data) == ref_csum(data), n
        assert checksum_copy(data) == (data, ref_csum(data)), n
    # Carries: all-ones words, and the all-zero buffer whose checksum is 0xFFFF.
    assert checksum(b"\xff" * 65536) == ref_csum(b"\xff" * 65536) == 0
    assert checksum(bytes(100)) == 0xFFFF
    # A buffer with its checksum inserted sums to zero.
    buf = bytearray(os.urandom(64))
    buf[10:12] = b"\0\0"
    buf[10:12] = struct.pack("!H", checksum(bytes(buf)))
    assert checksum(bytes(buf)) == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 1000), max_size=6))
def test_chained_partial_sums(data, cuts):
    # Chunks of even length, the last one whatever remains.
    bounds = sorted({min(c * 2, len(data)) for c in cuts})
    chunks, prev = [], 0
    for b in bounds:
        chunks.append(data[prev:b])
        prev = b
    chunks.append(data[prev:])
    assert checksum_chain(chunks) == ref_csum(data)


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=2, max_size=200).filter(lambda b: len(b) % 2 == 0),
       st.integers(0, 99), st.integers(0, 0xFFFF))
def test_incremental_update16_equals_recompute(data, where, new):
    pos = (where % (len(data) // 2)) * 2
    old = struct.unpack_from("!H", data, pos)[0]
    changed = data[:pos] + struct.pack("!H", new) + data[pos + 2:]
    assert same_csum(checksum_update16(checksum(data), old, new), changed)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=4, max_size=200).filter(lambda b: len(b) % 4 == 0),
       st.integers(0, 49), st.integers(0, 0xFFFFFFFF))
def test_incremental_update32_equals_recompute(data, where, new):
    pos = (where % (len(data) // 4)) * 4
    old = struct.unpack_from("!I", data, pos)[0]
    changed = data[:pos] + struct.pack("!I", new) + data[pos + 4:]
    assert same_csum(checksum_update32(checksum(data), old, new), changed)


def test_rfc1624_example():
    # RFC 1624 section 4: HC = 0xDD2F, m = 0x5555 -> m' = 0x3285 gives HC' = 0x0000
    # (eqn. 3; eqn. 2 would give the -0 form 0xFFFF the RFC warns about).
    assert checksum_update16(0xDD2F, 0x5555, 0x3285) == 0x0000


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=20, max_size=1500), st.booleans())
def test_pseudo_header_sums_match_dpkt(payload, v6):
    tcp = dpkt.tcp.TCP(sport=1, dport=2, seq=3, off=5, flags=0x18, data=payload)
    if v6:
        ip = dpkt.ip6.IP6(src=os.urandom(16), dst=os.urandom(16), nxt=6, hlim=64,
                          plen=20 + len(payload), data=tcp)
        ip.p = 6
    else:
        ip = dpkt.ip.IP(src=os.urandom(4), dst=os.urandom(4), p=6, data=tcp)
    raw = bytes(ip)  # dpkt fills in the TCP checksum
    seg = raw[40:] if v6 else raw[20:]
    # The segment including dpkt's checksum sums to zero with our pseudo-header.
    assert l4_checksum(ip.src, ip.dst, 6, seg) == 0


def native_sum(data: bytes) -> int:
    """Folded sum of native-order 16-bit words (what the bulk loops return, unswapped)."""
    s = sum(struct.unpack(f"={len(data) // 2}H", data[: len(data) // 2 * 2]))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=5000))
def test_every_bulk_variant_this_cpu_runs(data):
    variants = checksum_bulk_variants(data)
    assert "base" in variants
    for name, (sum4, sum8, copied) in variants.items():
        assert sum4 == native_sum(data[: len(data) // 4 * 4]), name
        assert sum8 == native_sum(data[: len(data) // 8 * 8]), name
        assert copied, name
