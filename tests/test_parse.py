"""sn_parse_frame (through softnic._parse.parse): header offsets against scapy's own
layering of the frames it builds, and, on random / truncated / corrupted frames, the exact
result (fields or drop reason) of a reference parser written here from the RFCs."""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert, IPOption_RR
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw
from softnic._parse import parse

VLAN_TPIDS = (0x8100, 0x88A8, 0x9100)
IP6_EXT = (0, 43, 44, 60)



def eth():
    """Explicit MAC addresses: scapy would otherwise resolve them (slowly, via ARP/routes)."""
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")

def ref_parse(f: bytes):
    """Reference: a dict like parse() or the drop reason name."""
    n = len(f)
    if n < 14 or n > 0xFFFF + 64:
        return "malformed_l2"
    pos, tags = 12, 0
    (et,) = struct.unpack_from("!H", f, pos)
    while et in VLAN_TPIDS:
        if tags == 2 or pos + 6 > n:
            return "malformed_l2"
        tags += 1
        pos += 4
        (et,) = struct.unpack_from("!H", f, pos)
    l3 = pos + 2
    h = dict(l2len=l3, ethertype=et, l3off=l3, l4off=l3, l3len_total=0, ipver=0,
             l4proto=0, l4hdrlen=0, is_fragment=False)
    if et == 0x0800:
        if n - l3 < 20 or f[l3] >> 4 != 4:
            return "malformed_l3"
        ihl = (f[l3] & 15) * 4
        (tot,) = struct.unpack_from("!H", f, l3 + 2)
        if ihl < 20 or tot < ihl or l3 + tot > n:
            return "malformed_l3"
        h.update(ipver=4, l3len_total=tot, l4off=l3 + ihl, l4proto=f[l3 + 9])
        (frag,) = struct.unpack_from("!H", f, l3 + 6)
        h["is_fragment"] = bool(frag & 0x3FFF)
        if frag & 0x1FFF:
            return h
        end = l3 + tot
    elif et == 0x86DD:
        if n - l3 < 40 or f[l3] >> 4 != 6:
            return "malformed_l3"
        (plen,) = struct.unpack_from("!H", f, l3 + 4)
        if l3 + 40 + plen > n or 40 + plen > 0xFFFF:
            return "malformed_l3"
        h.update(ipver=6, l3len_total=40 + plen)
        end = l3 + 40 + plen
        cur, nxt, count = l3 + 40, f[l3 + 6], 0
        while nxt in IP6_EXT:
            if count == 8 or (nxt == 0 and count):
                return "malformed_l3"
            count += 1
            if cur + 2 > end:
                return "malformed_l3"
            size = 8 if nxt == 44 else (f[cur + 1] + 1) * 8
            if cur + size > end:
                return "malformed_l3"
            if nxt == 44:
                (fo,) = struct.unpack_from("!H", f, cur + 2)
                if fo >> 3 or fo & 1:
                    h["is_fragment"] = True
                if fo >> 3:
                    h.update(l4proto=f[cur], l4off=cur + 8)
                    return h
            nxt = f[cur]
            cur += size
        h.update(l4proto=nxt, l4off=cur)
    else:
        return h
    l4 = h["l4off"]
    if h["l4proto"] == 6:
        if end - l4 < 20:
            return "malformed_l4"
        doff = (f[l4 + 12] >> 4) * 4
        if doff < 20 or doff > end - l4:
            return "malformed_l4"
        h["l4hdrlen"] = doff
    elif h["l4proto"] == 17:
        if end - l4 < 8:
            return "malformed_l4"
        (ulen,) = struct.unpack_from("!H", f, l4 + 4)
        if ulen < 8 or ulen > end - l4:
            return "malformed_l4"
        h["l4hdrlen"] = 8
    return h


def run_parse(f: bytes):
    try:
        return parse(f)
    except ValueError as e:
        return str(e)


def scapy_offsets(pkt):
    """(l3off, l4off, l4proto, l4hdrlen) from scapy's own layering."""
    raw = bytes(pkt)
    pkt = Ether(raw)  # dissected back, so every field (data offset...) is filled in
    l3 = None
    l4 = None
    for l3layer in (IP, IPv6):
        if l3layer in pkt:
            l3 = len(raw) - len(bytes(pkt[l3layer]))
            break
    for layer, proto in ((TCP, 6), (UDP, 17), (ICMP, 1)):
        if layer in pkt:
            seg = bytes(pkt[layer])
            l4 = len(raw) - len(seg)
            hl = {6: pkt[TCP].dataofs * 4 if proto == 6 else 0, 17: 8, 1: 0}[proto]
            return l3, l4, proto, hl
    return l3, l4, None, 0


WELL_FORMED = [
    eth() / IP() / TCP() / b"x",
    eth() / IP(options=[IPOption_RR(), IPOption_Router_Alert()]) / TCP(
        options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 2)), ("WScale", 7)]) / b"hi",
    eth() / Dot1Q(vlan=7) / IP() / UDP() / b"payload",
    eth() / Dot1AD(vlan=3) / Dot1Q(vlan=9) / IPv6() / TCP() / b"q",
    eth() / IPv6() / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting(addresses=["::1"])
    / IPv6ExtHdrDestOpt() / UDP() / b"abc",
    eth() / IPv6() / IPv6ExtHdrFragment(m=1, offset=0) / TCP() / b"abc",
    eth() / IP() / ICMP() / b"ping",
]


@pytest.mark.parametrize("pkt", WELL_FORMED, ids=lambda p: p.summary())
def test_offsets_match_scapy(pkt):
    raw = bytes(pkt)
    h = parse(raw)
    l3, l4, proto, hl = scapy_offsets(pkt)
    assert h["l3off"] == h["l2len"] == l3
    assert h["l4off"] == l4 and h["l4proto"] == proto and h["l4hdrlen"] == hl
    assert h["ipver"] == (4 if IP in pkt else 6)
    assert h["l3len_total"] == len(raw) - l3
    assert h == ref_parse(raw)


def test_padding_fragments_and_non_ip():
    # A 60-byte minimum frame: padding after the IP total length is tolerated.
    small = bytes(eth() / IP() / UDP() / b"a")
    padded = small + bytes(60 - len(small))
    assert parse(padded)["l3len_total"] == len(small) - 14
    assert parse(bytes(eth() / ARP()))["ipver"] == 0
    later = parse(bytes(eth() / IP(frag=100, flags=0) / Raw(b"x" * 30)))
    assert later["is_fragment"] and later["l4hdrlen"] == 0
    later6 = parse(bytes(eth() / IPv6() / IPv6ExtHdrFragment(offset=5, m=0) / Raw(b"y" * 16)))
    assert later6["is_fragment"] and later6["l4hdrlen"] == 0
    atomic = parse(bytes(eth() / IPv6() / IPv6ExtHdrFragment(offset=0, m=0) / UDP()))
    assert not atomic["is_fragment"] and atomic["l4proto"] == 17


def test_drop_reasons():
    good = bytes(eth() / IP() / TCP() / b"data")
    assert run_parse(good[:13]) == "malformed_l2"
    assert run_parse(good[:14 + 19]) == "malformed_l3"
    assert run_parse(good[:-1]) == "malformed_l3"  # total length beyond the frame
    bad_doff = bytearray(good)
    bad_doff[14 + 20 + 12] = 0x40
    assert run_parse(bytes(bad_doff)) == "malformed_l4"
    three_tags = bytes(eth() / Dot1AD() / Dot1Q() / Dot1Q() / IP() / TCP())
    assert run_parse(three_tags) == "malformed_l2"
    hbh_twice = bytes(eth() / IPv6() / IPv6ExtHdrHopByHop() / IPv6ExtHdrHopByHop() / UDP())
    assert run_parse(hbh_twice) == "malformed_l3"
    chain = eth() / IPv6()
    for _ in range(9):
        chain = chain / IPv6ExtHdrDestOpt()
    assert run_parse(bytes(chain / UDP())) == "malformed_l3"
    bad_ulen = bytearray(bytes(eth() / IP() / UDP() / b"abc"))
    bad_ulen[14 + 20 + 4:14 + 20 + 6] = b"\x00\x40"
    assert run_parse(bytes(bad_ulen)) == "malformed_l4"


frames = st.sampled_from([bytes(p) for p in WELL_FORMED])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames, st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
       st.integers(0, 300), st.booleans())
def test_corrupted_and_truncated_match_reference(frame, flips, cut, fix_len):
    l3 = parse(frame)["l3off"]
    buf = bytearray(frame)
    for pos, val in flips:
        if pos < len(buf):
            buf[pos] = val
    if cut < len(buf):
        del buf[len(buf) - cut:]
    if fix_len and len(buf) >= l3 + 40:
        # Make the IP length agree with the cut, so the damage reaches L4 and beyond.
        if frame[l3] >> 4 == 4:
            buf[l3 + 2:l3 + 4] = struct.pack("!H", len(buf) - l3)
        else:
            buf[l3 + 4:l3 + 6] = struct.pack("!H", len(buf) - l3 - 40)
    f = bytes(buf)
    assert run_parse(f) == ref_parse(f)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([0x0800, 0x86DD, 0x8100, 0x0806]))
def test_random_bytes_match_reference(tail, et):
    f = bytes(12) + struct.pack("!H", et) + tail
    assert run_parse(f) == ref_parse(f)
    # Version nibble forced right, so the random bytes reach the deeper layers.
    if et in (0x0800, 0x86DD) and tail:
        gb = bytearray(f)
        gb[14] = (0x45 if et == 0x0800 else 0x60) | (gb[14] & 0x0F if et == 0x0800 else 0)
        g = bytes(gb)
        assert run_parse(g) == ref_parse(g)
