"""TSO, checksum completion and MSS clamping (softnic._tso).

Oracles: dpkt parses every segment and recomputes its checksums from the re-serialised
packet; a kernel-style ones' complement sum written here verifies IP and TCP checksums
independently; scapy builds the frames and computes the checksums csum_complete and
mss_clamp must reproduce. Drop reasons of hostile input are predicted by a reference
written here from the rules in softnic/_tso.pyx's header comments.
"""

import os
import random
import socket
import struct

import dpkt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP, IPOption_LSRR, IPOption_Router_Alert, IPOption_RR
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    IPv6ExtHdrSegmentRouting,
)
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
from softnic._batch import Batch
from softnic._tso import csum_complete, make_vnet_hdr, mss_clamp, segment, segment_batch
from test_csum import ref_csum
from test_parse import ref_parse

NEEDS_CSUM = 1
TCPV4, UDP_UFO, TCPV6, UDP_L4, ECN = 1, 3, 4, 5, 0x80
FIN, SYN, PSH, ACK, ECE, CWR = 0x01, 0x02, 0x08, 0x10, 0x40, 0x80
TS_OPTS = [("NOP", None), ("NOP", None), ("Timestamp", (123456, 654321))]



def eth():
    """Explicit MAC addresses: scapy would otherwise resolve them (slowly, via ARP/routes)."""
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")

def vnet_for(frame: bytes, gso_size: int, gso_type=None, hdr_len=None):
    h = ref_parse(frame)
    assert isinstance(h, dict)
    hl = h["l4off"] + h["l4hdrlen"]
    if gso_type is None:
        gso_type = TCPV4 if h["ipver"] == 4 else TCPV6
    return make_vnet_hdr(NEEDS_CSUM, gso_type, hl if hdr_len is None else hdr_len, gso_size,
                         h["l4off"], 16)


def ref_final_dst(f: bytes, h: dict):
    """Pseudo-header destination (RFC 9293 3.1 / RFC 8200 8.1) or a drop reason."""
    l3, l4 = h["l3off"], h["l4off"]
    if h["ipver"] == 4:
        dst = f[l3 + 16:l3 + 20]
        i = l3 + 20
        while i < l4:
            if f[i] == 0:
                break
            if f[i] == 1:
                i += 1
                continue
            if i + 1 >= l4 or f[i + 1] < 2 or f[i + 1] > l4 - i:
                return "malformed_l3"
            if f[i] in (131, 137):
                if f[i + 1] < 7:
                    return "malformed_l3"
                dst = f[i + f[i + 1] - 4:i + f[i + 1]]
            i += f[i + 1]
        return dst
    dst = f[l3 + 24:l3 + 40]
    i, nxt = l3 + 40, f[l3 + 6]
    while i < l4:
        size = 8 if nxt == 44 else (f[i + 1] + 1) * 8
        if nxt == 43 and f[i + 3]:
            if f[i + 2] not in (2, 4) or size < 24:
                return "malformed_l3"
            dst = f[i + 8:i + 24]
        nxt = f[i]
        i += size
    return dst


def ref_tso(vh: bytes, f: bytes):
    """None if the frame must segment, else the drop reason name."""
    _flags, gso, hdr_len, gso_size, _cs, _co, _nb = struct.unpack("<BBHHHHH", vh)
    g = gso & 0x7F
    if g not in (TCPV4, TCPV6):
        return "bad_vnet_hdr"
    h = ref_parse(f)
    if isinstance(h, str):
        return h
    if h["ipver"] != (4 if g == TCPV4 else 6) or h["l4proto"] != 6 or h["is_fragment"]:
        return "bad_vnet_hdr"
    hl = h["l4off"] + h["l4hdrlen"]
    if hdr_len < hl or hdr_len > len(f) or gso_size < 48:
        return "bad_vnet_hdr"
    dst = ref_final_dst(f, h)
    return dst if isinstance(dst, str) else None


def check_segments(f: bytes, segs: list, mss: int):
    """Every TSO rule, verified with sums written here (no dpkt, no softnic)."""
    h = ref_parse(f)
    l3, l4, thl = h["l3off"], h["l4off"], h["l4hdrlen"]
    hl = l4 + thl
    payload = f[hl:l3 + h["l3len_total"]]
    n = max(1, -(-len(payload) // mss))
    assert len(segs) == n
    seq0 = struct.unpack_from("!I", f, l4 + 4)[0]
    flags0 = f[l4 + 13]
    dst = ref_final_dst(f, h)
    got = b""
    for i, s in enumerate(segs):
        chunk = s[hl:]
        assert len(chunk) == (mss if i < n - 1 else len(payload) - mss * (n - 1))
        got += chunk
        assert s[:l3] == f[:l3]  # L2 incl. tags
        if h["ipver"] == 4:
            ihl = l4 - l3
            assert ref_csum(s[l3:l4]) == 0, "IPv4 header checksum"
            assert struct.unpack_from("!H", s, l3 + 2)[0] == len(s) - l3
            assert struct.unpack_from("!H", s, l3 + 4)[0] == (
                struct.unpack_from("!H", f, l3 + 4)[0] + i) & 0xFFFF
            assert s[l3 + 6:l3 + 10] == f[l3 + 6:l3 + 10] and s[l3 + 12:l3 + ihl] == f[l3 + 12:l4]
            pseudo = s[l3 + 12:l3 + 16] + dst + struct.pack("!BBH", 0, 6, len(s) - l4)
        else:
            assert struct.unpack_from("!H", s, l3 + 4)[0] == len(s) - l3 - 40
            assert s[l3 + 6:l4] == f[l3 + 6:l4]
            pseudo = s[l3 + 8:l3 + 24] + dst + struct.pack("!IxxxB", len(s) - l4, 6)
        assert ref_csum(pseudo + s[l4:]) == 0, "TCP checksum"
        assert struct.unpack_from("!I", s, l4 + 4)[0] == (seq0 + i * mss) & 0xFFFFFFFF
        want = flags0
        if i < n - 1:
            want &= ~(FIN | PSH)
        if i > 0:
            want &= ~CWR
        assert s[l4 + 13] == want
        # ack, data offset, window, urgent pointer and options unchanged
        assert s[l4 + 8:l4 + 13] == f[l4 + 8:l4 + 13]
        assert s[l4 + 14:l4 + 16] == f[l4 + 14:l4 + 16]
        assert s[l4 + 18:hl] == f[l4 + 18:hl]
    assert got == payload


def check_with_dpkt(segs: list, v6: bool):
    """dpkt parses each segment and, re-serialising with the sums zeroed, recomputes the
    same IP and TCP checksums."""
    for s in segs:
        eth = dpkt.ethernet.Ethernet(s)
        ip = eth.data
        assert isinstance(ip, dpkt.ip6.IP6 if v6 else dpkt.ip.IP)
        tcp = ip.data
        assert isinstance(tcp, dpkt.tcp.TCP)
        tsum = tcp.sum
        tcp.sum = 0
        if v6:
            again = dpkt.ip6.IP6(bytes(ip))
        else:
            isum = ip.sum
            ip.sum = 0
            again = dpkt.ip.IP(bytes(ip))
            assert again.sum == isum
        assert again.data.sum == tsum


def tcp_frame(l2, l3, flags="A", payload=b"", options=TS_OPTS, seq=1000):
    return bytes(l2 / l3 / TCP(sport=40000, dport=5201, seq=seq, ack=77, flags=flags,
                               window=501, options=options) / payload)


# ---- TSO: the formats ---------------------------------------------------------------------

def test_v4_ip_options_tcp_timestamps_ecn():
    payload = os.urandom(20000)
    f = tcp_frame(eth(), IP(src="10.1.0.1", dst="10.1.0.2", id=0xFFF0, ttl=61,
                              options=[IPOption_RR(), IPOption_Router_Alert()]),
                  flags="FPAEC", payload=payload)
    segs = segment(vnet_for(f, 1000, TCPV4 | ECN), f)
    assert len(segs) == 20
    check_segments(f, segs, 1000)
    check_with_dpkt(segs, v6=False)
    ids = [dpkt.ethernet.Ethernet(s).data.id for s in segs]
    assert ids == [(0xFFF0 + i) & 0xFFFF for i in range(20)] and ids[15:17] == [0xFFFF, 0]
    tcps = [dpkt.ethernet.Ethernet(s).data.data for s in segs]
    assert tcps[0].flags & CWR and not any(t.flags & CWR for t in tcps[1:])
    assert all(t.flags & ECE and t.flags & ACK for t in tcps)
    assert [bool(t.flags & FIN) for t in tcps] == [False] * 19 + [True]
    assert [bool(t.flags & PSH) for t in tcps] == [False] * 19 + [True]
    assert all(dict(dpkt.tcp.parse_opts(t.opts)).get(8) for t in tcps)  # timestamps kept


def test_v6_extension_header_vlan():
    payload = os.urandom(9000)
    f = tcp_frame(eth() / Dot1Q(vlan=42),
                  IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrDestOpt(),
                  flags="PA", payload=payload)
    segs = segment(vnet_for(f, 1400), f)
    check_segments(f, segs, 1400)
    check_with_dpkt(segs, v6=True)
    for s in segs:
        e = dpkt.ethernet.Ethernet(s)
        assert e.vlan_tags[0].id == 42
        assert 60 in e.data.extension_hdrs or e.data.nxt == 60


def test_qinq_and_hop_by_hop():
    f = tcp_frame(eth() / Dot1AD(vlan=5) / Dot1Q(vlan=6),
                  IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrHopByHop(), payload=os.urandom(5000))
    check_segments(f, segment(vnet_for(f, 1220), f), 1220)
    f4 = tcp_frame(eth() / Dot1AD(vlan=5) / Dot1Q(vlan=6), IP(src="1.2.3.4", dst="5.6.7.8"),
                   payload=os.urandom(3333))
    segs = segment(vnet_for(f4, 1000), f4)
    check_segments(f4, segs, 1000)


def test_mss_cap_resegments_and_hdr_len_hint():
    payload = os.urandom(14480)
    f = tcp_frame(eth(), IP(src="10.0.0.1", dst="10.0.0.2"), flags="PA", payload=payload)
    segs = segment(vnet_for(f, 1448), f, 536)
    assert len(segs) == -(-len(payload) // 536)
    check_segments(f, segs, 536)
    check_with_dpkt(segs, v6=False)
    # mss_cap above gso_size changes nothing; Linux's hdr_len = skb_headlen (> headers) is ok
    assert segment(vnet_for(f, 1448, hdr_len=200), f, 9000) == segment(vnet_for(f, 1448), f)


def test_source_routes_use_the_final_destination():
    f = tcp_frame(eth(), IP(src="10.0.0.1", dst="10.9.9.9",
                              options=[IPOption_LSRR(routers=["10.8.8.8", "10.7.7.7"])]),
                  payload=os.urandom(3000))
    segs = segment(vnet_for(f, 1000), f)
    assert ref_final_dst(f, ref_parse(f)) == socket.inet_aton("10.7.7.7")
    check_segments(f, segs, 1000)
    # RFC 8754: the segment list is stored last hop first; Segment List[0] is the final
    # destination, as scapy's dissection names it.
    f6 = tcp_frame(eth(), IPv6(src="fd00::1", dst="fd00::99") /
                   IPv6ExtHdrSegmentRouting(addresses=["fd00::7", "fd00::99"], segleft=1),
                   payload=os.urandom(3000))
    final = Ether(f6)[IPv6ExtHdrSegmentRouting].addresses[0]
    assert ref_final_dst(f6, ref_parse(f6)) == socket.inet_pton(socket.AF_INET6, final)
    assert final != "fd00::99"
    check_segments(f6, segment(vnet_for(f6, 1000), f6), 1000)
    rh0 = tcp_frame(eth(), IPv6() / IPv6ExtHdrRouting(addresses=["fd00::5"], segleft=1),
                    payload=os.urandom(3000))
    with pytest.raises(ValueError, match="malformed_l3"):
        segment(vnet_for(rh0, 1000), rh0)


def test_64k_frame_total_length_ffff_into_batch():
    payload = os.urandom(0xFFFF - 20 - 32)
    f = tcp_frame(eth(), IP(src="10.0.0.1", dst="10.0.0.2"), flags="PA", payload=payload)
    assert struct.unpack_from("!H", f, 16)[0] == 0xFFFF
    vh = vnet_for(f, 1448)
    inb = Batch(2, slot_size=len(f) + 512, headroom=256)
    inb.push(vh + f)
    outb = Batch(64)
    n, drops = segment_batch(inb, outb, 1398)
    assert drops == {} and n == outb.count == -(-len(payload) // 1398) == 47
    segs = [outb.get(i) for i in range(n)]
    assert all(len(s) == 14 + 20 + 32 + 1398 for s in segs[:-1])
    check_segments(f, segs, 1398)
    check_with_dpkt(segs, v6=False)
    # IPv6: the largest payload length sn_hdrs.l3len_total (16 bits, 40 + payload) holds;
    # a GSO frame is at most 64 KB in all (Linux's limit), so real guests stay below it.
    f6 = tcp_frame(eth(), IPv6(src="fd00::1", dst="fd00::2"),
                   payload=os.urandom(0xFFFF - 40 - 32))
    assert struct.unpack_from("!H", f6, 18)[0] == 0xFFFF - 40
    segs6 = segment(vnet_for(f6, 1428), f6)
    check_segments(f6, segs6, 1428)
    check_with_dpkt(segs6, v6=True)
    over = bytearray(f6 + bytes(40))
    over[18:20] = b"\xff\xff"
    with pytest.raises(ValueError, match="malformed_l3"):
        segment(make_vnet_hdr(NEEDS_CSUM, TCPV6, 86, 1428, 54, 16), bytes(over))


def test_largest_number_of_segments_and_no_room():
    payload = os.urandom(0xFFFF - 20 - 20)
    f = tcp_frame(eth(), IP(src="10.0.0.1", dst="10.0.0.2"), payload=payload, options=[])
    vh = vnet_for(f, 48)  # the smallest gso_size accepted
    segs = segment(vh, f)
    assert len(segs) == 1365
    check_segments(f, segs, 48)
    inb = Batch(1, slot_size=len(f) + 512, headroom=256)
    inb.push(vh + f)
    small = Batch(1000, slot_size=512, headroom=128)
    assert segment_batch(inb, small) == (0, {"no_room": 1})
    assert inb.drop_reason(0) == "no_room" and small.count == 0
    big = Batch(1400, slot_size=512, headroom=128)
    assert segment_batch(inb, big)[0] == 1365
    # A slot too small for one segment is no_room as well, with nothing produced.
    tiny = Batch(2000, slot_size=128 + 60, headroom=128)
    assert segment_batch(inb, tiny) == (0, {"no_room": 1})


def test_refused_vnet_headers():
    f = tcp_frame(eth(), IP(src="10.0.0.1", dst="10.0.0.2"), payload=os.urandom(3000))
    hl = 14 + 20 + 32
    cases = {
        "udp ufo": make_vnet_hdr(NEEDS_CSUM, UDP_UFO, hl, 1000, 34, 16),
        "udp l4": make_vnet_hdr(NEEDS_CSUM, UDP_L4, hl, 1000, 34, 16),
        "gso_size 0": make_vnet_hdr(NEEDS_CSUM, TCPV4, hl, 0, 34, 16),
        "gso_size 47": make_vnet_hdr(NEEDS_CSUM, TCPV4, hl, 47, 34, 16),
        "hdr_len short": make_vnet_hdr(NEEDS_CSUM, TCPV4, hl - 1, 1000, 34, 16),
        "hdr_len past frame": make_vnet_hdr(NEEDS_CSUM, TCPV4, len(f) + 1, 1000, 34, 16),
        "v6 type on v4": make_vnet_hdr(NEEDS_CSUM, TCPV6, hl, 1000, 34, 16),
        "gso none": make_vnet_hdr(NEEDS_CSUM, 0, hl, 1000, 34, 16),
    }
    for name, vh in cases.items():
        with pytest.raises(ValueError, match="^bad_vnet_hdr$"):
            segment(vh, f)
        assert ref_tso(vh, f) == "bad_vnet_hdr", name
    udp = bytes(eth() / IP() / UDP() / os.urandom(3000))
    with pytest.raises(ValueError, match="^bad_vnet_hdr$"):
        segment(make_vnet_hdr(NEEDS_CSUM, TCPV4, 42, 1000, 34, 6), udp)
    frag = tcp_frame(eth(), IP(flags="MF"), payload=os.urandom(3000))
    with pytest.raises(ValueError, match="^bad_vnet_hdr$"):
        segment(vnet_for(frag, 1000), frag)
    with pytest.raises(ValueError, match="^malformed_l3$"):
        segment(vnet_for(f, 1000), f[:-1])


# ---- TSO: hostile input -------------------------------------------------------------------

BASE_FRAMES = [
    tcp_frame(eth(), IP(src="10.0.0.1", dst="10.0.0.2", options=[IPOption_RR()]),
              flags="FPAC", payload=bytes(range(256)) * 12),
    tcp_frame(eth() / Dot1Q(vlan=3), IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrDestOpt(),
              flags="PA", payload=bytes(range(256)) * 9),
    tcp_frame(eth(), IPv6() / IPv6ExtHdrSegmentRouting(addresses=["fd00::7"], segleft=1),
              payload=b"z" * 1500),
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(BASE_FRAMES),
       st.lists(st.tuples(st.integers(0, 130), st.integers(0, 255)), max_size=4),
       st.one_of(st.just(0), st.integers(0, 3500)), st.booleans(),
       st.one_of(st.none(), st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x84, 0x85, 0x7F])),
       st.one_of(st.integers(-2, 40), st.integers(-200, 200)),
       st.one_of(st.integers(40, 2000), st.integers(0, 0xFFFF)), st.integers(0, 2000))
def test_hostile_frames_and_vnet_headers(frame, flips, cut, fix_len, gso, hdr_delta, gso_size,
                                         mss_cap):
    """gso None: the type that matches the frame; hdr_delta: hdr_len - real headers."""
    l3 = 18 if frame[12:14] == b"\x81\x00" else 14
    h0 = ref_parse(frame)
    if gso is None:
        gso = TCPV4 if h0["ipver"] == 4 else TCPV6
    hdr_len = max(0, h0["l4off"] + h0["l4hdrlen"] + hdr_delta)
    buf = bytearray(frame)
    for pos, val in flips:
        buf[pos] = val
    if cut < len(buf):
        del buf[len(buf) - cut:]
    if fix_len and len(buf) >= l3 + 40:
        if frame[l3] >> 4 == 4:
            buf[l3 + 2:l3 + 4] = struct.pack("!H", len(buf) - l3)
        else:
            buf[l3 + 4:l3 + 6] = struct.pack("!H", len(buf) - l3 - 40)
    f = bytes(buf)
    vh = make_vnet_hdr(NEEDS_CSUM, gso, hdr_len, gso_size, 0, 0)
    want = ref_tso(vh, f)
    try:
        segs = segment(vh, f, mss_cap)
    except ValueError as e:
        assert str(e) == want
        return
    assert want is None
    mss = min(gso_size, mss_cap) if mss_cap else gso_size
    check_segments(f, segs, mss)


def test_vnet_header_shorter_than_12_bytes():
    with pytest.raises(ValueError, match="bad_vnet_hdr"):
        segment(b"\x01" * 11, BASE_FRAMES[0])


def test_segment_batch_mixed():
    f = BASE_FRAMES[0]
    sb = bytearray(bytes(eth() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2)
                         / b"hello"))
    sb[40:42] = struct.pack("!H", pseudo_sum(bytes(sb[26:30]), bytes(sb[30:34]), 17, len(sb) - 34))
    small = bytes(sb)
    inb = Batch(8, slot_size=8192, headroom=128)
    inb.push(vnet_for(f, 1000) + f, port=3)                                  # 4 segments
    inb.push(make_vnet_hdr(NEEDS_CSUM, 0, 0, 0, 34, 6) + small, port=4)     # csum only
    inb.push(b"\x00" * 5)                                                  # runt vnet hdr
    inb.push(make_vnet_hdr(0, UDP_L4, 42, 1000, 34, 6) + small)              # USO refused
    inb.push(make_vnet_hdr(NEEDS_CSUM, 0, 0, 0, 40, 6) + small)             # csum past end
    outb = Batch(16)
    n, drops = segment_batch(inb, outb, 0)
    assert (n, drops) == (5, {"bad_vnet_hdr": 3})
    assert [inb.drop_reason(i) for i in range(5)] == ["ok", "ok"] + ["bad_vnet_hdr"] * 3
    assert [outb.port(i) for i in range(5)] == [3, 3, 3, 3, 4]
    check_segments(f, [outb.get(i) for i in range(4)], 1000)
    done = outb.get(4)
    assert ref_csum(done[26:34] + struct.pack("!BBH", 0, 17, len(done) - 34) + done[34:]) == 0


# ---- checksum completion ------------------------------------------------------------------

def pseudo_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """What a guest leaves in the field: the folded, uncomplemented pseudo-header sum."""
    if len(src) == 4:
        data = src + dst + struct.pack("!BBH", 0, proto, length)
    else:
        data = src + dst + struct.pack("!IxxxB", length, proto)
    return ~ref_csum(data) & 0xFFFF


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("proto", [6, 17])
def test_csum_complete_matches_scapy(v6, proto):
    rng = random.Random(proto + v6)
    for size in (0, 1, 2, 7, 100, 1401):
        l3 = IPv6(src="fd00::1", dst="fd00::2") if v6 else IP(src="192.0.2.1", dst="192.0.2.2")
        l4 = TCP(sport=1, dport=2, flags="PA") if proto == 6 else UDP(sport=1, dport=2)
        want = bytes(eth() / l3 / l4 / rng.randbytes(size))  # scapy fills the checksum
        off = 16 if proto == 6 else 6
        start = 14 + (40 if v6 else 20)
        src, dst = (want[22:38], want[38:54]) if v6 else (want[26:30], want[30:34])
        partial = bytearray(want)
        partial[start + off:start + off + 2] = struct.pack(
            "!H", pseudo_sum(src, dst, proto, len(want) - start))
        vh = make_vnet_hdr(NEEDS_CSUM, 0, 0, 0, start, off)
        got = csum_complete(vh, bytes(partial))
        scapy_sum = struct.unpack_from("!H", want, start + off)[0]
        got_sum = struct.unpack_from("!H", got, start + off)[0]
        assert got_sum == (scapy_sum or 0xFFFF)  # 0 is sent as 0xFFFF
        assert got[:start + off] == want[:start + off] and got[start + off + 2:] == want[
            start + off + 2:]


def test_csum_complete_bounds():
    f = bytes(eth() / IP() / UDP() / b"abcd")
    for start, off in ((len(f) - 1, 0), (len(f) - 2, 1), (0xFFFF, 0xFFFF), (34, len(f))):
        with pytest.raises(ValueError, match="bad_vnet_hdr"):
            csum_complete(make_vnet_hdr(NEEDS_CSUM, 0, 0, 0, start, off), f)
    assert csum_complete(make_vnet_hdr(NEEDS_CSUM, 0, 0, 0, len(f) - 2, 0), f) != f
    # Without NEEDS_CSUM nothing is read or written.
    assert csum_complete(make_vnet_hdr(0, 0, 0, 0, 0xFFFF, 0xFFFF), f) == f
    with pytest.raises(ValueError):
        csum_complete(b"\x01", f)


# ---- MSS clamping -------------------------------------------------------------------------

def tcp_checksum_ok(frame: bytes) -> bool:
    h = ref_parse(frame)
    l3, l4 = h["l3off"], h["l4off"]
    if h["ipver"] == 4:
        pseudo = frame[l3 + 12:l3 + 20] + struct.pack("!BBH", 0, 6, l3 + h["l3len_total"] - l4)
    else:
        pseudo = frame[l3 + 8:l3 + 40] + struct.pack("!IxxxB", l3 + h["l3len_total"] - l4, 6)
    return ref_csum(pseudo + frame[l4:l3 + h["l3len_total"]]) == 0


@pytest.mark.parametrize("opts", [
    [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 2)), ("WScale", 7)],
    [("NOP", None), ("MSS", 8960), ("NOP", None), ("WScale", 7)],  # MSS value at odd offset
    [("WScale", 2), ("MSS", 1460)],
])
@pytest.mark.parametrize("v6", [False, True])
def test_mss_clamp(opts, v6):
    l3 = IPv6(src="fd00::1", dst="fd00::2") if v6 else IP(src="10.0.0.1", dst="10.0.0.2")
    syn = bytes(eth() / l3 / TCP(flags="S", options=opts))
    out = mss_clamp(syn, 1360)
    assert out != syn and tcp_checksum_ok(out)
    assert dict(Ether(out)[TCP].options)["MSS"] == 1360
    # Everything but the MSS value and the checksum is unchanged.
    diff = [i for i in range(len(syn)) if syn[i] != out[i]]
    assert len(diff) <= 4
    # Already small enough, not a SYN, or no MSS option: unchanged.
    assert mss_clamp(out, 1400) == out
    assert mss_clamp(bytes(eth() / l3 / TCP(flags="A", options=opts)), 500) == bytes(
        eth() / l3 / TCP(flags="A", options=opts))
    nomss = bytes(eth() / l3 / TCP(flags="S", options=[("WScale", 7)]))
    assert mss_clamp(nomss, 500) == nomss
    synack = bytes(eth() / l3 / TCP(flags="SA", options=opts))
    assert tcp_checksum_ok(mss_clamp(synack, 1000))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=36), st.integers(0, 36), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_mss_clamp_random_options_keep_checksum(opts, where, old, mss):
    opts = opts[:where] + struct.pack("!BBH", 2, 4, old) + opts[where:]
    opts = (opts + bytes(-len(opts) % 4))[:40]
    syn = bytes(eth() / IP(src="10.0.0.1", dst="10.0.0.2")
                / TCP(flags="S", dataofs=5 + len(opts) // 4) / opts)
    out = mss_clamp(syn, mss)
    assert len(out) == len(syn) and tcp_checksum_ok(out)
    assert sum(a != b for a, b in zip(syn, out, strict=True)) <= 4


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 700), st.integers(0, 700), st.booleans())
def test_csum_complete_hostile_offsets(frame, start, off, flag):
    vh = make_vnet_hdr(NEEDS_CSUM if flag else 0, 0, 0, 0, start, off)
    if flag and start + off + 2 > len(frame):
        with pytest.raises(ValueError, match="^bad_vnet_hdr$"):
            csum_complete(vh, frame)
        return
    got = csum_complete(vh, frame)
    assert len(got) == len(frame)
    if not flag:
        assert got == frame
        return
    pos = start + off
    assert got[:pos] == frame[:pos] and got[pos + 2:] == frame[pos + 2:]
    # The field gets the checksum of frame[start:] as the guest left it (its partial sum
    # included), 0 sent as 0xFFFF; the result verifies when the field is word-aligned.
    want = ref_csum(frame[start:]) or 0xFFFF
    if off % 2 == 0:
        assert struct.unpack_from("!H", got, pos)[0] == want
