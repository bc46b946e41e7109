"""VXLAN (RFC 7348) encap/decap, flow hash and ICMP too-big, against scapy and dpkt."""

import contextlib
import ipaddress
import json
import os
import shutil
import struct
import subprocess
import sys
import time

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror
from scapy.layers.inet6 import ICMPv6EchoRequest, ICMPv6PacketTooBig, IPv6, IPv6ExtHdrFragment
from scapy.layers.ipsec import ESP
from scapy.layers.l2 import Dot1Q, Ether
from scapy.layers.vxlan import VXLAN
from softnic._batch import DROP_REASONS

from softnic import _vxlan as vx

MAC_A = "02:00:00:00:00:0a"
MAC_B = "02:00:00:00:00:0b"


def inner_v4(sport=1234, dport=80, payload=b"x" * 18, proto="tcp", **ip):
    l4 = TCP(sport=sport, dport=dport) if proto == "tcp" else UDP(sport=sport, dport=dport)
    return bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src="192.0.2.1", dst="192.0.2.2", **ip)
                 / l4 / payload)


def inner_v6(sport=1234, dport=80, payload=b"y" * 18):
    return bytes(Ether(src=MAC_A, dst=MAC_B) / IPv6(src="2001:db8::1", dst="2001:db8::2")
                 / UDP(sport=sport, dport=dport) / payload)


def inet_sum(data: bytes) -> int:
    """RFC 1071 sum, written here from the RFC (a third check besides scapy and dpkt)."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


# --- encapsulation, checked by scapy and dpkt -------------------------------------------

UNDERLAYS = [("10.1.0.1", "10.2.0.2"), ("2001:db8:1::1", "2001:db8:2::2")]
FRAMES = [
    inner_v4(),
    inner_v4(proto="udp", payload=b"z" * 1400),
    inner_v6(),
    inner_v6(payload=b"q" * 1401),       # odd length: the checksum tail byte
    bytes(Ether(src=MAC_A, dst=MAC_B, type=0x88B5) / (b"\x01" * 47)),
    bytes(Ether(src=MAC_A, dst=MAC_B) / Dot1Q(vlan=7) / IP(src="1.2.3.4", dst="5.6.7.8")
          / ESP(spi=0x1234, seq=1, data=b"\xaa" * 40)),
]


@pytest.mark.parametrize("local,remote", UNDERLAYS)
@pytest.mark.parametrize("frame", FRAMES)
@pytest.mark.parametrize("csum", [False, True])
def test_encap_parsed_by_scapy_and_dpkt(local, remote, frame, csum):
    vni = 0xABCDEF
    pkt = vx.encap(frame, local, remote, vni, udp_csum=csum, ttl=33)
    v6 = ":" in local
    s = (IPv6 if v6 else IP)(pkt)
    assert s.src == local and s.dst == remote
    u = s[UDP]
    assert u.dport == 4789 and 49152 <= u.sport <= 65535
    assert u.sport == vx.flow_port(vx.flow_hash(frame))
    assert s[VXLAN].vni == vni and s[VXLAN].flags == 0x08
    assert bytes(s[VXLAN].payload) == frame
    if v6:
        assert s.hlim == 33 and s.plen == len(pkt) - 40 and s.nh == 17
        assert s.fl == vx.flow_hash(frame) & 0xFFFFF          # RFC 6438 flow label
        d = dpkt.ip6.IP6(pkt)
        pseudo = d.src + d.dst + struct.pack("!IxxxB", len(pkt) - 40, 17)
        assert u.chksum != 0 and inet_sum(pseudo + pkt[40:]) == 0xFFFF
    else:
        assert s.ttl == 33 and s.flags == "DF" and s.len == len(pkt) and s.proto == 17
        ref = IP(pkt)                  # scapy recomputes the header checksum from scratch
        del ref.chksum
        assert IP(bytes(ref)).chksum == s.chksum
        d = dpkt.ip.IP(pkt)
        assert inet_sum(pkt[:20]) == 0xFFFF
        assert dpkt.in_cksum(pkt[:20]) == 0
        if csum:
            pseudo = d.src + d.dst + struct.pack("!xBH", 17, len(pkt) - 20)
            assert u.chksum != 0 and inet_sum(pseudo + pkt[20:]) == 0xFFFF
            ref = IP(pkt)
            del ref[UDP].chksum
            assert IP(bytes(ref))[UDP].chksum == u.chksum
        else:
            assert u.chksum == 0
    assert isinstance(d.data, dpkt.udp.UDP) and d.data.dport == 4789
    assert d.data.ulen == len(frame) + 16


def test_encap_options():
    fr = inner_v4(tos=0x03)                       # inner CE
    p = vx.encap(fr, "10.0.0.1", "10.0.0.2", 1, dport=8472, tos=0xB8, df=False)
    s = IP(p)
    assert s[UDP].dport == 8472 and s.tos == 0xBB and s.flags == 0
    p2 = vx.encap(fr, "10.0.0.1", "10.0.0.2", 1, df=False)
    assert IP(p2).id != s.id                       # non-atomic datagrams get fresh IDs
    assert IP(vx.encap(fr, "10.0.0.1", "10.0.0.2", 1, ecn=False)).tos == 0
    p6 = vx.encap(inner_v6(), "::1", "::2", 5, tos=0x20, flow_hash=0x12345678)
    s6 = IPv6(p6)
    assert s6.tc == 0x20 and s6.fl == 0x45678 and s6[UDP].sport == vx.flow_port(0x12345678)


def test_encap_refusals():
    with pytest.raises(ValueError, match="malformed_l2"):
        vx.encap(b"\x00" * 13, "10.0.0.1", "10.0.0.2", 1)
    with pytest.raises(ValueError, match="no_room"):
        vx.encap(inner_v4(), "10.0.0.1", "10.0.0.2", 1, _headroom=35)
    assert vx.encap(inner_v4(), "10.0.0.1", "10.0.0.2", 1, _headroom=36)
    with pytest.raises(ValueError, match="no_room"):
        vx.encap(inner_v4(), "::1", "::2", 1, _headroom=55)
    with pytest.raises(ValueError, match="too_big"):
        vx.encap(bytes(65536 - 16 - 20 + 1), "10.0.0.1", "10.0.0.2", 1)
    assert len(vx.encap(bytes(65535 - 36), "10.0.0.1", "10.0.0.2", 1)) == 65535
    with pytest.raises(ValueError):
        vx.encap(inner_v4(), "10.0.0.1", "::2", 1)
    with pytest.raises(ValueError):
        vx.encap(inner_v4(), "10.0.0.1", "10.0.0.2", 1 << 24)


# --- decapsulation ------------------------------------------------------------------------

@pytest.mark.parametrize("outer", [
    IP(src="10.9.0.1", dst="10.9.0.2"),
    IP(src="10.9.0.1", dst="10.9.0.2", options=b"\x01\x01\x01\x00"),
    IPv6(src="2001:db8::a", dst="2001:db8::b"),
])
@pytest.mark.parametrize("flags", [0x08, 0x0C, 0xFF])
def test_decap_scapy_built(outer, flags):
    frame = inner_v4()
    pkt = outer / UDP(sport=51000, dport=4789) / VXLAN(vni=0x123456) / Ether(frame)
    raw = bytes(pkt)
    i = len(raw) - len(frame) - 8
    assert raw[i] & 0x08 and raw[i + 4:i + 7] == b"\x12\x34\x56"   # as scapy lays it out
    assert vx.decap(raw)[:2] == (0x123456, frame)
    # reserved bits in the VXLAN header are ignored on receipt (RFC 7348 §5)
    raw = raw[:i] + bytes([flags]) + b"\xff\xff\xff" + raw[i + 4:i + 7] + b"\xee" + frame
    vni, inner, info = vx.decap(raw)
    assert vni == 0x123456 and inner == frame
    assert info["sport"] == 51000 and info["dport"] == 4789
    assert str(info["src"]) == pkt.src and str(info["dst"]) == pkt.dst
    assert info["family"] == (4 if isinstance(outer, IP) else 6)


def test_decap_roundtrip_and_trailer():
    for local, remote in UNDERLAYS:
        for fr in FRAMES:
            vni, inner, info = vx.decap(vx.encap(fr, local, remote, 77))
            assert (vni, inner, str(info["src"])) == (77, fr, local)
    # bytes past the IP total length (e.g. link padding) are not part of the frame
    p = vx.encap(FRAMES[0], "10.0.0.1", "10.0.0.2", 3)
    assert vx.decap(p + b"\0" * 6)[1] == FRAMES[0]


def test_decap_bad_flags_and_protocols():
    frame = inner_v4()
    bad = bytes(IP() / UDP(dport=4789) / VXLAN(vni=1, flags=0x00) / Ether(frame))
    with pytest.raises(ValueError, match="bad_vxlan"):
        vx.decap(bad)
    with pytest.raises(ValueError, match="malformed_l3"):     # not UDP
        vx.decap(bytes(IP() / TCP() / (b"\x08" + bytes(30))))
    with pytest.raises(ValueError, match="malformed_l3"):     # a fragment
        vx.decap(bytes(IP(flags="MF") / UDP(dport=4789) / VXLAN(vni=1) / Ether(frame)))
    with pytest.raises(ValueError, match="malformed_l2"):     # inner < 14 bytes
        vx.decap(bytes(IP() / UDP(dport=4789) / VXLAN(vni=1) / (b"\0" * 13)))
    with pytest.raises(ValueError, match="malformed_l3"):
        vx.decap(b"\x50" + bytes(60))
    # IPv6 with a destination-options header in front of UDP is walked
    p6 = IPv6(src="::1", dst="::2", nh=60) / bytes([17, 0, 1, 4, 0, 0, 0, 0]) \
        / UDP(sport=5, dport=4789) / VXLAN(vni=9) / Ether(frame)
    assert vx.decap(bytes(p6))[:2] == (9, frame)


@pytest.mark.parametrize("local,remote", UNDERLAYS)
def test_decap_truncated_at_every_offset(local, remote):
    pkt = vx.encap(inner_v4(), local, remote, 5)
    hl = 40 if ":" in local else 20
    for cut in range(len(pkt)):
        with pytest.raises(ValueError) as e:
            vx.decap(pkt[:cut])
        reason = str(e.value)
        assert reason in DROP_REASONS and reason != "ok"
        if cut < hl:
            assert reason == "malformed_l3"
    # the IP/UDP lengths claim more than is there: every shortened length field
    for delta in range(1, 40):
        b = bytearray(pkt)
        ulen_off = hl + 4
        struct.pack_into("!H", b, ulen_off, len(pkt) - hl - delta)
        if len(pkt) - hl - delta < 30:
            with pytest.raises(ValueError):
                vx.decap(bytes(b))
        else:
            assert len(vx.decap(bytes(b))[1]) == len(pkt) - hl - delta - 16


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 199), st.integers(0, 255))
def test_decap_fuzz(data, pos, val):
    base = bytearray(vx.encap(inner_v4(), "10.0.0.1", "10.0.0.2", 5)) + bytearray(data)
    base[pos % len(base)] = val
    for blob in (bytes(base), data):
        try:
            vni, inner, _ = vx.decap(blob)
        except ValueError as e:
            assert str(e) in DROP_REASONS
        else:
            assert len(inner) >= 14 and vni < (1 << 24)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 2000))
def test_hash_and_icmp_fuzz(data, mtu):
    assert vx.flow_hash(data) != 0
    try:
        r = vx.icmp_too_big(data, mtu)
    except ValueError as e:
        assert str(e) in DROP_REASONS
    else:
        assert r is None or len(r) >= 14 + 28


# --- flow hash and source-port spread ----------------------------------------------------

def chi_square(ports, buckets=32):
    counts = [0] * buckets
    for p in ports:
        assert 49152 <= p <= 65535
        counts[(p - 49152) * buckets // 16384] += 1
    exp = len(ports) / buckets
    return sum((c - exp) ** 2 / exp for c in counts)


# chi-square with 31 degrees of freedom: p = 0.001 at 61.1
CHI2_LIMIT = 61.1


def test_sport_spread_ports():
    frames = [inner_v4(sport=1024 + i, dport=443) for i in range(1000)]
    ports = [IP(vx.encap(f, "10.0.0.1", "10.0.0.2", 1))[UDP].sport for f in frames]
    assert len(set(ports)) > 900
    assert chi_square(ports) < CHI2_LIMIT


def test_sport_spread_esp_spi():
    def esp(spi):
        return bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src="192.0.2.1", dst="198.51.100.1")
                     / ESP(spi=spi, seq=1, data=b"\0" * 32))
    ports = [vx.flow_port(vx.flow_hash(esp(0x1000 + i))) for i in range(1000)]
    assert chi_square(ports) < CHI2_LIMIT and len(set(ports)) > 900


def test_sport_spread_esp_in_udp_and_v6():
    def natt(spi):
        return bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src="192.0.2.1", dst="198.51.100.1")
                     / UDP(sport=4500, dport=4500) / struct.pack("!II", spi, 1) / bytes(24))

    def esp6(spi):
        return bytes(Ether(src=MAC_A, dst=MAC_B) / IPv6(src="2001:db8::1", dst="2001:db8::2")
                     / ESP(spi=spi, seq=1, data=b"\0" * 32))
    for mk in (natt, esp6):
        ports = [vx.flow_port(vx.flow_hash(mk(1 + i))) for i in range(1000)]
        assert chi_square(ports) < CHI2_LIMIT and len(set(ports)) > 900


def test_flow_hash_selectors():
    h = vx.flow_hash
    base = inner_v4()
    # payload is not a selector; ports, addresses and VLAN-skipping are
    assert h(base) == h(inner_v4(payload=b"other payload!"))
    assert h(base) != h(inner_v4(sport=1235))
    tagged = bytes(Ether(src=MAC_A, dst=MAC_B) / Dot1Q(vlan=5) / Ether(base).payload)
    qinq = bytes(Ether(src=MAC_A, dst=MAC_B, type=0x88A8) / Dot1Q(vlan=5) / Dot1Q(vlan=6)
                 / Ether(base).payload)
    old_qinq = bytes(Ether(src=MAC_A, dst=MAC_B, type=0x9100) / Dot1Q(vlan=5)
                     / Ether(base).payload)
    assert h(tagged) == h(base) == h(qinq) == h(old_qinq)
    # ESP-in-UDP hashes the SPI; IKE (non-ESP marker 0) hashes the ports
    def natt(spi, sport=4500):
        return bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src="1.1.1.1", dst="2.2.2.2") / UDP(sport=sport, dport=4500)
                     / struct.pack("!II", spi, 7) / bytes(8))
    assert h(natt(5)) != h(natt(6)) and h(natt(5, 1111)) == h(natt(5, 2222))
    assert h(natt(0, 1111)) != h(natt(0, 2222))
    # all fragments of a datagram hash alike (ports only in the unfragmented case)
    f1 = bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src="1.1.1.1", dst="2.2.2.2", flags="MF", proto=17) / bytes(16))
    f2 = bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src="1.1.1.1", dst="2.2.2.2", frag=100, proto=17) / bytes(16))
    assert h(f1) == h(f2)
    g1 = bytes(Ether(src=MAC_A, dst=MAC_B) / IPv6(src="::1", dst="::2") / IPv6ExtHdrFragment(m=1, nh=17)
               / UDP(sport=1, dport=2))
    g2 = bytes(Ether(src=MAC_A, dst=MAC_B) / IPv6(src="::1", dst="::2") / IPv6ExtHdrFragment(offset=9, nh=17)
               / bytes(8))
    assert h(g1) == h(g2)
    # non-IP: MACs matter
    assert h(bytes(Ether(src=MAC_A, dst=MAC_B, type=0x88B5) / bytes(40))) != \
        h(bytes(Ether(src=MAC_B, dst=MAC_B, type=0x88B5) / bytes(40)))
    assert all(49152 <= vx.flow_port(x) <= 65535 for x in (0, 1, 0xFFFFFFFF, 0x80000000))
    assert vx.flow_port(0) == 49152 and vx.flow_port(0xFFFFFFFF) == 65535


# --- ICMP too big ------------------------------------------------------------------------

def test_icmp4_too_big():
    big = bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src="192.0.2.1", dst="198.51.100.9",
                                                 flags="DF", id=77)
                / TCP(sport=40000, dport=80) / (b"p" * 1460))
    r = vx.icmp_too_big(big, 1450)
    e = Ether(r)
    assert e.src == MAC_B and e.dst == MAC_A
    ip = e[IP]
    assert ip.src == "198.51.100.9" and ip.dst == "192.0.2.1" and ip.proto == 1
    assert len(r) - 14 == 576 == ip.len
    ic = e[ICMP]
    assert ic.type == 3 and ic.code == 4 and ic.nexthopmtu == 1450
    assert inet_sum(bytes(ic)) == 0xFFFF and inet_sum(bytes(ip)[:20]) == 0xFFFF
    ref = e.copy()
    del ref[IP].chksum
    del ref[ICMP].chksum
    ref = Ether(bytes(ref))
    assert ref[ICMP].chksum == ic.chksum and ref[IP].chksum == ip.chksum
    assert bytes(ic)[8:] == bytes(Ether(big)[IP])[:548]
    assert ic[IPerror].src == "192.0.2.1" and ic[IPerror].id == 77
    # with dpkt as well
    d = dpkt.ethernet.Ethernet(r)
    assert d.data.data.type == 3 and d.data.data.code == 4


def test_icmp4_vlan_and_short_quote():
    small = bytes(Ether(src=MAC_A, dst=MAC_B) / Dot1Q(vlan=12)
                  / IP(src="192.0.2.1", dst="198.51.100.9", flags="DF") / UDP() / b"abc")
    r = vx.icmp_too_big(small, 576)
    e = Ether(r)
    assert e[Dot1Q].vlan == 12 and e[ICMP].nexthopmtu == 576
    assert bytes(e[ICMP])[8:] == bytes(Ether(small)[IP])


@pytest.mark.parametrize("frame", [
    # DF clear: fragmentation allowed, no PMTU message
    Ether(src=MAC_A, dst=MAC_B) / IP(src="192.0.2.1", dst="198.51.100.9") / UDP() / bytes(100),
    # non-first fragment
    Ether(src=MAC_A, dst=MAC_B) / IP(src="192.0.2.1", dst="198.51.100.9", flags="DF", frag=10) / bytes(9),
    # ICMP error about an ICMP error
    Ether(src=MAC_A, dst=MAC_B) / IP(src="192.0.2.1", dst="198.51.100.9", flags="DF") / ICMP(type=3)
    / bytes(40),
    # broadcast / multicast / invalid sources and destinations
    Ether(src=MAC_A, dst=MAC_B) / IP(src="0.0.0.0", dst="198.51.100.9", flags="DF") / UDP(),
    Ether(src=MAC_A, dst=MAC_B) / IP(src="224.0.0.1", dst="198.51.100.9", flags="DF") / UDP(),
    Ether(src=MAC_A, dst=MAC_B) / IP(src="192.0.2.1", dst="255.255.255.255", flags="DF") / UDP(),
    Ether(src=MAC_A, dst=MAC_B) / IP(src="192.0.2.1", dst="239.1.1.1", flags="DF") / UDP(),
    Ether(src="01:00:5e:00:00:01", dst=MAC_B) / IP(src="192.0.2.1", dst="198.51.100.9", flags="DF") / UDP(),
    Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") / IP(src="192.0.2.1", dst="198.51.100.9",
                                                 flags="DF") / UDP(),
    Ether(src=MAC_A, dst=MAC_B) / IPv6(src="ff02::1", dst="2001:db8::2") / UDP(),
    Ether(src=MAC_A, dst=MAC_B) / IPv6(src="::", dst="2001:db8::2") / UDP(),
    Ether(src=MAC_A, dst=MAC_B) / IPv6(src="2001:db8::1", dst="2001:db8::2") / ICMPv6PacketTooBig(),
    Ether(src=MAC_A, dst=MAC_B) / IPv6(src="2001:db8::1", dst="2001:db8::2")
    / IPv6ExtHdrFragment(offset=3, nh=17) / bytes(20),
    Ether(src=MAC_A, dst=MAC_B, type=0x88B5) / bytes(100),
], ids=lambda f: f.summary())
def test_icmp_no_reply(frame):
    assert vx.icmp_too_big(bytes(frame), 1400) is None


def test_icmp4_mtu_bounds():
    f = bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src="192.0.2.1", dst="198.51.100.9", flags="DF") / UDP())
    assert vx.icmp_too_big(f, 67) is None and vx.icmp_too_big(f, 68) is not None
    with pytest.raises(ValueError, match="malformed_l3"):
        vx.icmp_too_big(f[:30], 1400)


def test_icmp6_too_big():
    big = bytes(Ether(src=MAC_A, dst=MAC_B)
                / IPv6(src="2001:db8::1", dst="2001:db8::2", hlim=9)
                / ICMPv6EchoRequest(data=b"e" * 1500))
    r = vx.icmp_too_big(big, 1400)
    e = Ether(r)
    assert e.src == MAC_B and e.dst == MAC_A
    ip = e[IPv6]
    assert ip.src == "2001:db8::2" and ip.dst == "2001:db8::1" and ip.nh == 58
    assert len(r) - 14 == 1280 and ip.plen == 1240
    ptb = e[ICMPv6PacketTooBig]
    assert ptb.type == 2 and ptb.code == 0 and ptb.mtu == 1400
    ref = e.copy()
    del ref[ICMPv6PacketTooBig].cksum
    assert Ether(bytes(ref))[ICMPv6PacketTooBig].cksum == ptb.cksum
    src = ipaddress.IPv6Address(ip.src).packed
    dst = ipaddress.IPv6Address(ip.dst).packed
    body = r[14 + 40:]
    assert inet_sum(src + dst + struct.pack("!IxxxB", len(body), 58) + body) == 0xFFFF
    assert body[8:] == bytes(Ether(big)[IPv6])[:1232]
    assert vx.icmp_too_big(big, 1279) is None
    # a first fragment is answered; ICMPv6 informational messages are answered
    first = bytes(Ether(src=MAC_A, dst=MAC_B) / IPv6(src="2001:db8::1", dst="2001:db8::2")
                  / IPv6ExtHdrFragment(offset=0, m=1, nh=17) / bytes(1400))
    assert vx.icmp_too_big(first, 1280) is not None


def test_bench_encap_runs():
    ns = vx._bench_encap(inner_v4(payload=b""), "10.0.0.1", "10.0.0.2", 1, 10000)
    assert 0 < ns < 10000


# --- Linux kernel as the peer VTEP (root only: two network namespaces of our own) -----------

PEER = r'''
import json, socket, struct, sys
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from softnic import _vxlan as vx

local, remote, csum = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
v6 = ":" in local
fam = socket.AF_INET6 if v6 else socket.AF_INET
hl = 40 if v6 else 20
rx = socket.socket(fam, socket.SOCK_DGRAM)
rx.bind((local, 4789))
rx.settimeout(3)
frame = bytes(Ether(src="02:00:00:00:00:0b", dst="02:00:00:00:00:0a")
              / IP(src="192.168.77.2", dst="192.168.77.1") / ICMP(id=0x77, seq=1) / b"softnic")
pkt = vx.encap(frame, local, remote, 42, udp_csum=csum)
sport = struct.unpack("!H", pkt[hl:hl + 2])[0]
if len(sys.argv) > 4:                      # a corrupted UDP checksum: the kernel must drop it
    pkt = pkt[:hl + 6] + bytes([pkt[hl + 6] ^ 1]) + pkt[hl + 7:]
# The whole outer packet as we built it goes on the wire (raw socket, header included), so
# the receiving kernel checks our lengths and UDP checksum.
tx = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)
if v6:
    tx.setsockopt(socket.IPPROTO_IPV6, 36, 1)    # IPV6_HDRINCL
tx.sendto(pkt, (remote, 0))
result = {"sport": sport}
for _ in range(20):
    try:
        data, addr = rx.recvfrom(4096)
    except TimeoutError:
        break
    outer = (IPv6(src=addr[0], dst=local) if v6 else IP(src=addr[0], dst=local)) \
        / UDP(sport=addr[1], dport=4789)
    vni, inner, info = vx.decap(bytes(outer / Raw(data)))
    e = Ether(inner)
    if ICMP in e and e[ICMP].type == 0 and e[ICMP].id == 0x77:
        result.update(vni=vni, src=e[IP].src, dst=e[IP].dst, payload=bytes(e[ICMP].payload).hex(),
                      outer_src=str(info["src"]))
        break
print(json.dumps(result))
'''


@contextlib.contextmanager
def kernel_vtep(underlay):
    """Two namespaces joined by a veth: ns1 runs the Linux vxlan driver (VNI 42, inner
    192.168.77.1 / fd00:77::1, MAC ..:0a, static neighbours .2 at MAC ..:0b); ns2 is
    where our code plays the other VTEP. Yields (ns1, ns2, ns1 underlay, ns2 underlay)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for network namespaces")
    ns1, ns2 = f"snvx1-{os.getpid()}", f"snvx2-{os.getpid()}"
    if underlay == "4":
        a, b, plen, extra = "10.200.0.1", "10.200.0.2", "24", []
    else:
        a, b, plen, extra = "fd00:200::1", "fd00:200::2", "64", ["nodad"]

    def ip(*args):
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    try:
        ip("netns", "add", ns1)
        ip("netns", "add", ns2)
        ip("-n", ns1, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", ns2)
        ip("-n", ns1, "addr", "add", f"{a}/{plen}", "dev", "va", *extra)
        ip("-n", ns2, "addr", "add", f"{b}/{plen}", "dev", "vb", *extra)
        for ns, dev in ((ns1, "va"), (ns2, "vb"), (ns1, "lo"), (ns2, "lo")):
            ip("-n", ns, "link", "set", dev, "up")
        ip("-n", ns1, "link", "add", "vx0", "type", "vxlan", "id", "42", "local", a,
           "remote", b, "dstport", "4789")
        ip("-n", ns1, "link", "set", "vx0", "address", "02:00:00:00:00:0a")
        ip("-n", ns1, "addr", "add", "192.168.77.1/24", "dev", "vx0")
        ip("-n", ns1, "addr", "add", "fd00:77::1/64", "dev", "vx0", "nodad")
        ip("-n", ns1, "link", "set", "vx0", "up")
        for addr in ("192.168.77.2", "fd00:77::2"):
            ip("-n", ns1, "neigh", "add", addr, "lladdr", "02:00:00:00:00:0b", "dev", "vx0")
        yield ns1, ns2, a, b
    finally:
        for ns in (ns1, ns2):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def run_in(ns, tmp_path, name, code, *args, **kw):
    script = tmp_path / name
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(script),
                             *args], env=env, text=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.mark.netns
@pytest.mark.parametrize("underlay,csum,corrupt", [
    ("4", False, False), ("4", True, False), ("6", True, False), ("4", True, True),
    ("6", True, True)])
def test_linux_kernel_vtep_interop(tmp_path, underlay, csum, corrupt):
    """Our outer packet, sent as built, is decapsulated by the Linux vxlan driver, which
    answers a ping; we decapsulate the kernel's reply. A corrupted UDP checksum gets no
    answer (the kernel verified ours)."""
    with kernel_vtep(underlay) as (ns1, ns2, a, b):
        peer = run_in(ns2, tmp_path, "peer.py", PEER, b, a, "1" if csum else "0",
                      *(["corrupt"] if corrupt else []))
        stdout, stderr = peer.communicate(timeout=60)
        assert peer.returncode == 0, stderr[-2000:]
        res = json.loads(stdout.strip().splitlines()[-1])
        if corrupt:
            assert "vni" not in res
            return
        assert res.get("vni") == 42, res
        assert res["src"] == "192.168.77.1" and res["dst"] == "192.168.77.2"
        assert bytes.fromhex(res["payload"]) == b"softnic" and res["outer_src"] == a
        # the kernel learned our inner MAC behind our VTEP address (RFC 7348 §4)
        fdb = subprocess.run(["bridge", "-n", ns1, "fdb", "show", "dev", "vx0"],
                             capture_output=True, text=True, timeout=10).stdout
        assert any("02:00:00:00:00:0b" in ln and b in ln for ln in fdb.splitlines()), fdb


PMTU_SENDER = r'''
import socket, sys
v6 = sys.argv[1] == "6"
fam, lvl = (socket.AF_INET6, socket.IPPROTO_IPV6) if v6 else (socket.AF_INET, socket.IPPROTO_IP)
s = socket.socket(fam, socket.SOCK_DGRAM)
# IP(V6)_MTU_DISCOVER = IP_PMTUDISC_DO: DF set, and the socket learns the path MTU
s.setsockopt(lvl, 23 if v6 else 10, 2)
s.connect(("fd00:77::2" if v6 else "192.168.77.2", 9))
s.send(b"D" * 1400)
print("sent", flush=True)
sys.stdin.readline()
print(s.getsockopt(lvl, 24 if v6 else 14), flush=True)      # IPV6_MTU / IP_MTU
'''

PMTU_PEER = r'''
import json, socket, struct, sys
from scapy.layers.inet import IP, UDP
from scapy.packet import Raw
from softnic import _vxlan as vx
local, remote, mtu = sys.argv[1], sys.argv[2], int(sys.argv[3])
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rx.bind((local, 4789))
rx.settimeout(5)
print("ready", flush=True)
for _ in range(20):
    data, addr = rx.recvfrom(4096)
    vni, frame, _ = vx.decap(bytes(IP(src=addr[0], dst=local) / UDP(sport=addr[1], dport=4789)
                                   / Raw(data)))
    if len(frame) > 1400:
        break
reply = vx.icmp_too_big(frame, mtu)
pkt = vx.encap(reply, local, remote, 42, udp_csum=True)
tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
tx.sendto(pkt, (remote, 0))
print(json.dumps({"quoted": len(reply)}), flush=True)
'''


@pytest.mark.netns
@pytest.mark.parametrize("inner", ["4", "6"])
def test_linux_kernel_accepts_icmp_too_big(tmp_path, inner):
    """The Linux stack, sending a DF / IPv6 datagram through its vxlan device, takes our
    ICMP Fragmentation Needed / Packet Too Big (sent back through the tunnel) and lowers
    the socket's path MTU to the value we sent."""
    mtu = 1300 if inner == "4" else 1280
    with kernel_vtep("4") as (ns1, ns2, a, b):
        peer = run_in(ns2, tmp_path, "peer.py", PMTU_PEER, b, a, str(mtu))
        try:
            assert peer.stdout.readline().strip() == "ready"
            sender = run_in(ns1, tmp_path, "sender.py", PMTU_SENDER, inner)
            try:
                assert sender.stdout.readline().strip() == "sent", sender.stderr.read()
                out, err = peer.communicate(timeout=30)
                assert peer.returncode == 0, err[-2000:]
                assert json.loads(out.strip().splitlines()[-1])["quoted"] > 0
                time.sleep(0.2)
                got, err = sender.communicate("go\n", timeout=30)
                assert int(got.strip().splitlines()[-1]) == mtu, err
            finally:
                sender.kill()
        finally:
            peer.kill()


@pytest.mark.parametrize("outer_ecn,inner_ecn,expect", [
    (3, 2, 3), (3, 1, 3), (3, 0, 0), (1, 2, 1), (1, 1, 1), (2, 1, 1), (0, 2, 2), (2, 3, 3)])
@pytest.mark.parametrize("v6", [False, True])
def test_decap_ecn_rfc6040(outer_ecn, inner_ecn, expect, v6):
    if v6:
        fr = bytes(Ether(src=MAC_A, dst=MAC_B) / Dot1Q(vlan=3)
                   / IPv6(src="::1", dst="::2", tc=0xA0 | inner_ecn) / UDP() / b"e")
    else:
        fr = inner_v4(tos=0xA0 | inner_ecn, proto="udp")
    pkt = bytes(IP(src="10.0.0.1", dst="10.0.0.2", tos=0x20 | outer_ecn) / UDP(dport=4789)
                / VXLAN(vni=1) / Ether(fr))
    inner = Ether(vx.decap(pkt)[1])
    if v6:
        assert inner[IPv6].tc == 0xA0 | expect
    else:
        assert inner[IP].tos == 0xA0 | expect
        ref = inner[IP].copy()
        del ref.chksum
        assert IP(bytes(ref)).chksum == inner[IP].chksum      # header checksum updated
    assert bytes(inner[UDP]) == bytes(Ether(fr)[UDP])


def test_batch_encap_decap():
    from softnic._batch import Batch
    b = Batch(8)
    frames = [inner_v4(sport=1000 + i) for i in range(5)] + [b"short"]
    for f in frames:
        b.push(f)
    assert vx.encap_batch(b, "10.0.0.1", "10.0.0.2", 99) == 5
    assert b.drop_reason(5) == "malformed_l2" and b.get(5) == b"short"
    for i in range(5):
        s = IP(b.get(i))
        assert s[VXLAN].vni == 99 and bytes(s[VXLAN].payload) == frames[i]
        assert s[UDP].sport == vx.flow_port(vx.flow_hash(frames[i]))
    ok, vnis = vx.decap_batch(b)
    assert ok == 5 and vnis == [99] * 5 + [None]
    assert [b.get(i) for i in range(5)] == frames[:5]
    assert vx._bench_encap_batch(b, "10.0.0.1", "10.0.0.2", 1, 10) > 0


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=14, max_size=1600), st.integers(0, (1 << 24) - 1),
       st.sampled_from(UNDERLAYS), st.booleans())
def test_encap_decap_property(frame, vni, underlay, csum):
    pkt = vx.encap(frame, *underlay, vni, udp_csum=csum)
    hl = 40 if ":" in underlay[0] else 20
    assert len(pkt) == len(frame) + hl + 16
    assert pkt[hl + 8:hl + 16] == b"\x08\0\0\0" + vni.to_bytes(3, "big") + b"\0"
    s = (IPv6 if hl == 40 else IP)(pkt)
    assert s[VXLAN].vni == vni and s[UDP].len == len(frame) + 16
    if hl == 20:
        assert inet_sum(pkt[:20]) == 0xFFFF
    if hl == 40 or csum:
        src = ipaddress.ip_address(underlay[0]).packed
        dst = ipaddress.ip_address(underlay[1]).packed
        pseudo = src + dst + (struct.pack("!xBH", 17, len(pkt) - hl) if hl == 20
                              else struct.pack("!IxxxB", len(pkt) - hl, 17))
        assert inet_sum(pseudo + pkt[hl:]) == 0xFFFF
    got_vni, inner, info = vx.decap(pkt)
    assert got_vni == vni and info["sport"] == vx.flow_port(vx.flow_hash(frame))
    # decap may rewrite inner ECN bits (RFC 6040), but the outer ECN was copied from them
    assert inner == frame


ICMP_SEEDS = [
    bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src="192.0.2.1", dst="198.51.100.9", flags="DF")
          / TCP() / bytes(700)),
    bytes(Ether(src=MAC_A, dst=MAC_B) / Dot1Q(vlan=4) / IPv6(src="2001:db8::1", dst="2001:db8::2")
          / IPv6ExtHdrFragment(m=1, nh=58) / ICMPv6EchoRequest(data=bytes(1400))),
    bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src="192.0.2.1", dst="198.51.100.9", flags="DF",
                                           options=b"\x94\x04\0\0") / ICMP(type=8) / bytes(9)),
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(ICMP_SEEDS), st.lists(st.tuples(st.integers(0, 1600), st.integers(0, 255)),
                                            max_size=4), st.integers(0, 1600))
def test_icmp_too_big_mutated(seed, edits, cut):
    """Structured mutations reach the deep paths; any reply must be a valid ICMP error."""
    b = bytearray(seed)
    for pos, val in edits:
        b[pos % len(b)] = val
    frame = bytes(b[:max(cut, 14)] if cut < len(b) else b)
    try:
        r = vx.icmp_too_big(frame, 1280)
    except ValueError as e:
        assert str(e) in DROP_REASONS
        return
    if r is None:
        return
    e = Ether(r)
    assert e.dst == Ether(frame).src
    l3 = bytes(e.payload.payload if Dot1Q in e else e.payload)
    if IP in e:
        assert e[ICMP].type == 3 and e[ICMP].code == 4 and len(l3) <= 576
        assert inet_sum(l3[:20]) == 0xFFFF and inet_sum(l3[20:]) == 0xFFFF
    else:
        ip6 = e[IPv6]
        assert e[ICMPv6PacketTooBig].mtu == 1280 and len(l3) <= 1280
        src = ipaddress.IPv6Address(ip6.src).packed
        dst = ipaddress.IPv6Address(ip6.dst).packed
        assert inet_sum(src + dst + struct.pack("!IxxxB", len(l3) - 40, 58) + l3[40:]) == 0xFFFF


def test_icmp_ratelimit_bucket():
    # 10 per second, burst 3: three at once, then one per 100 ms
    t0 = 5_000_000_000
    got = vx._ratelimit_trace(10, 3, [t0, t0, t0, t0, t0 + 50_000_000, t0 + 100_000_000,
                                      t0 + 150_000_000, t0 + 10**10, t0 + 10**10,
                                      t0 + 10**10, t0 + 10**10])
    assert got == [True, True, True, False, False, True, False, True, True, True, False]
    # a clock that goes backwards grants nothing extra
    assert vx._ratelimit_trace(1, 1, [t0, t0 - 10**9, t0 - 10**9]) == [True, False, False]
