"""VXLAN (RFC 7348 §5) decapsulation and encapsulation, and the tunnel's ICMP too-big
reply (RFC 1191 §4 / RFC 4443 §3.2): softnic._vxlan.decap, encap, icmp_too_big.

decap gets outer IPv4/IPv6 (+ extension headers) / UDP / VXLAN / inner frame packets
built here, then damaged: truncation, flipped bits, wrong lengths, I flag cleared,
fragments, wrong protocol. Oracle: for an undamaged packet the exact VNI, inner frame
and outer addresses; for any accepted packet, the inner frame is the UDP payload's
tail as the UDP length field bounds it (walked here, not by softnic).
encap of random frames must give a packet scapy dissects as IP/UDP/VXLAN with the same
frame inside, a source port in 49152-65535 and (IPv6) a UDP checksum that verifies.
icmp_too_big of mutated frames: None, a drop reason, or an ICMP message dpkt parses
with a valid checksum that quotes the start of the offending packet.
"""

from __future__ import annotations

import ipaddress
import struct

import dpkt
import softnic._vxlan as _vxlan
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.vxlan import VXLAN

from .common import Reader, check_ip, check_reason, expect, inet_sum

V4 = (bytes([198, 51, 100, 1]), bytes([198, 51, 100, 2]))
V6 = (bytes.fromhex("20010db8000000010000000000000001"),
      bytes.fromhex("20010db8000000010000000000000002"))


def inner_frame(r: Reader) -> bytes:
    """An Ethernet frame: IPv4/IPv6 TCP/UDP (so the flow hash has fields) or raw."""
    eth = bytes([2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1])
    k = r.u8() % 4
    body = r.take(r.below(200))
    if k == 0:
        return eth + r.take(2) + body
    if k == 1:
        udp = struct.pack("!HHHH", r.uint(2), r.uint(2), 8 + len(body), 0) + body
        hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, r.u8(), 20 + len(udp), 0,
                                    0x4000 if r.flag() else 0, 64, 17, 0,
                                    bytes([10, 1, 0, r.u8()]), bytes([10, 2, 0, r.u8()])))
        struct.pack_into("!H", hdr, 10, 0xFFFF - inet_sum(bytes(hdr)))
        return eth + b"\x08\x00" + bytes(hdr) + udp
    tcp = struct.pack("!HHIIBBHHH", r.uint(2), 443, 1, 0, 0x50, 0x10, 1000, 0, 0) + body
    hdr6 = struct.pack("!IHBB", 0x60000000 | r.uint(2), len(tcp), 6, 64)
    return eth + b"\x86\xdd" + hdr6 + bytes(15) + bytes([r.u8()]) + bytes(15) + b"\x09" + tcp


def outer(r: Reader, frame: bytes, vni: int) -> tuple[bytes, bool, int]:
    """(packet, v6, UDP header offset)."""
    vx = struct.pack("!BxxxI", 0x08, vni << 8)
    udp_len = 8 + len(vx) + len(frame)
    udp = struct.pack("!HHHH", 49152 + r.uint(2) % 16384, 4789, udp_len, 0)
    if r.flag():
        ext = b""
        nh = 17
        if r.u8() % 4 == 3:
            ext = bytes([17, 0, 1, 4, 0, 0, 0, 0])
            nh = 0
        hdr = struct.pack("!IHBB", 0x60000000, len(ext) + udp_len, nh, 64) + V6[0] + V6[1] + ext
        return hdr + udp + vx + frame, True, len(hdr)
    h4 = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, r.u8() & 0xFC, 20 + udp_len, 0, 0x4000,
                               64, 17, 0, V4[0], V4[1]))
    struct.pack_into("!H", h4, 10, 0xFFFF - inet_sum(bytes(h4)))
    return bytes(h4) + udp + vx + frame, False, 20


def udp_at(p: bytes) -> int | None:
    """Where UDP starts in an outer IP packet, walked here (None: not UDP)."""
    if p[0] >> 4 == 4:
        return (p[0] & 15) * 4 if p[9] == 17 else None
    nh, off = p[6], 40
    while nh in (0, 43, 60) and off + 8 <= len(p):
        nh, off = p[off], off + (p[off + 1] + 1) * 8
    return off if nh == 17 else None


def one(data: bytes) -> str:
    r = Reader(data)
    op = r.u8() % 3
    frame = inner_frame(r)
    if op == 0:
        vni = r.uint(3)
        pkt, v6, l4 = outer(r, frame, vni)
        damaged = False
        k = r.u8() % 8
        b = bytearray(pkt)
        if k == 4:
            b = b[:r.below(len(b))]
        elif k == 5:
            b[r.below(len(b))] ^= 1 << (r.u8() % 8)
        elif k == 6:
            i = r.below(min(len(b), l4 + 16))
            b[i:i + 2] = r.take(2)
        elif k == 7:
            b += r.take(r.u8() % 32)             # bytes after the IP packet: not the frame's
        damaged = k in (4, 5, 6)
        pkt = bytes(b)
        try:
            got_vni, inner, info = _vxlan.decap(pkt)
        except ValueError as e:
            expect(damaged, f"valid VXLAN refused: {e}")
            return "decap:" + check_reason(e)
        expect(0 <= got_vni < 1 << 24, "VNI beyond 24 bits")
        expect(len(inner) >= 14, "inner frame shorter than Ethernet")
        u = udp_at(pkt)
        expect(u is not None, "accepted a packet that is not UDP")
        assert u is not None
        ulen = struct.unpack_from("!H", pkt, u + 4)[0]
        expect(inner == pkt[u + 16:u + ulen], "inner frame is not the UDP payload's tail")
        expect(bool(pkt[u + 8] & 0x08), "accepted with the I flag clear")
        expect(got_vni == int.from_bytes(pkt[u + 12:u + 15], "big"), "VNI not from the header")
        if not damaged:
            fam = V6 if v6 else V4
            expect((got_vni, inner) == (vni, frame), "decap differs from what was built")
            expect(info["src"] == ipaddress.ip_address(fam[0])
                   and info["dst"] == ipaddress.ip_address(fam[1]), "outer addresses")
        return "decap:ok"
    if op == 1:
        v6 = r.flag()
        fam = V6 if v6 else V4
        vni = r.uint(3)
        f = frame if r.u8() % 4 else frame[:r.below(len(frame))]
        try:
            out = _vxlan.encap(f, ipaddress.ip_address(fam[0]), ipaddress.ip_address(fam[1]),
                               vni, udp_csum=r.flag())
        except ValueError as e:
            return "encap:" + check_reason(e)
        check_ip(out)
        s = IPv6(out) if v6 else IP(out)
        expect(bool(s.haslayer(VXLAN)), "scapy sees no VXLAN")
        u = s[UDP]
        expect(49152 <= u.sport <= 65535 and u.dport == 4789, f"UDP ports {u.sport}->{u.dport}")
        expect(s[VXLAN].vni == vni and bytes(s[VXLAN].payload) == f, "VXLAN payload")
        if v6 or u.chksum:
            raw = bytes(u)
            ph = (out[8:40] + struct.pack("!IxxxB", len(raw), 17)) if v6 else (
                out[12:20] + struct.pack("!BBH", 0, 17, len(raw)))
            expect(inet_sum(raw, inet_sum(ph)) == 0xFFFF, "outer UDP checksum")
        return "encap:ok"
    k = r.u8() % 4
    fb = bytearray(frame)
    if k == 3 and fb:
        fb[r.below(len(fb))] ^= 1 << (r.u8() % 8)
    elif k == 2:
        fb = fb[:r.below(len(fb) + 1)]
    mtu = r.choice((1280, 1400, 68, 576, 0, 1 << 16, r.uint(2)))
    try:
        rep = _vxlan.icmp_too_big(bytes(fb), mtu)
    except ValueError as e:
        return "icmp:" + check_reason(e)
    if rep is None:
        return "icmp:none"
    expect(len(rep) > 14, "short ICMP reply")
    l2 = 14
    while rep[l2 - 2:l2] in (b"\x81\x00", b"\x88\xa8"):
        l2 += 4
    ip = check_ip(rep[l2:])
    expect(ip is not None, "dpkt cannot parse the ICMP reply")
    assert ip is not None
    icmp = ip.data
    expect(isinstance(icmp, (dpkt.icmp.ICMP, dpkt.icmp6.ICMP6)), "reply is not ICMP")
    l3 = rep[l2:]
    raw = l3[40:] if l3[0] >> 4 == 6 else l3[(l3[0] & 15) * 4:]   # the bytes as sent
    if isinstance(icmp, dpkt.icmp6.ICMP6):
        ph = rep[l2 + 8:l2 + 40] + struct.pack("!IxxxB", len(raw), 58)
        expect(icmp.type == 2 and inet_sum(raw, inet_sum(ph)) == 0xFFFF, "ICMPv6 checksum")
        expect(len(rep) - l2 <= 1280, "ICMPv6 error beyond 1280 bytes")
    else:
        expect(icmp.type == 3 and icmp.code == 4 and inet_sum(raw) == 0xFFFF, "ICMPv4")
        expect(len(rep) - l2 <= 576, "ICMPv4 error beyond 576 bytes")
    quoted = raw[8:]
    expect(bytes(fb[l2:l2 + len(quoted)]) == quoted, "the quote is not the offending packet")
    return "icmp:ok"


SEEDS = [bytes([op, k, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]) + bytes(20) + bytes([v6])
         for op in range(3) for k in range(4) for v6 in (0, 1)]
