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

Through a whole data plane (softnic._fastpath.Datapath, kept across cases): VXLAN from
admitted, unadmitted and wrongly-admitted sources to broadcast, multicast, unicast and
unknown MACs of VNIs with one, two or no VFs (rx_burst), and frames switched between
local VFs (tx_burst). Oracle: a model of admission (FDB / flood / accept entries per
VNI) and of delivery written here predicts which VFs get a copy; every copy meets its
VF's mode (an enforce VF never takes clear IP, ARP passes everywhere), copies of one
frame get one parse verdict, and a delivered frame is the inner frame byte for byte.
"""

from __future__ import annotations

import ipaddress
import struct

import dpkt
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.vxlan import VXLAN

import softnic._vxlan as _vxlan

from .common import REASONS, Reader, check_ip, check_reason, expect, inet_sum

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


def _damage(r: Reader, pkt: bytes, l4: int) -> tuple[bytes, bool]:
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
    return bytes(b), k in (4, 5, 6)


def _batches(r: Reader, op: int, frame: bytes) -> str:
    """decap_batch / encap_batch of up to 4 packets must agree, packet by packet, with
    decap / encap (two code paths over the same per-packet function)."""
    from softnic._batch import Batch

    n = 1 + r.u8() % 4
    b = Batch(n, slot_size=2048, headroom=256)
    if op == 3:
        pkts = []
        for i in range(n):
            f = frame if i == 0 else inner_frame(r)
            pkt, _, l4 = outer(r, f, r.uint(3))
            pkts.append(_damage(r, pkt, l4)[0])
            b.push(pkts[-1])
        n_ok, vnis = _vxlan.decap_batch(b)
        expect(len(vnis) == n and n_ok == sum(v is not None for v in vnis), "decap_batch counts")
        for i, pkt in enumerate(pkts):
            try:
                vni, inner, _ = _vxlan.decap(pkt)
                expect(vnis[i] == vni and b.get(i) == inner, f"decap_batch differs at {i}")
            except ValueError as e:
                expect(vnis[i] is None and b.drop_reason(i) == check_reason(e),
                       f"decap_batch verdict differs at {i}")
        return f"decap_batch:{n_ok}/{n}"
    v6 = r.flag()
    fam = V6 if v6 else V4
    loc, rem = ipaddress.ip_address(fam[0]), ipaddress.ip_address(fam[1])
    vni, csum = r.uint(3), r.flag()
    frames = [frame if i == 0 else inner_frame(r) for i in range(n)]
    frames = [f if r.u8() % 4 else f[:r.below(len(f))] for f in frames]
    for f in frames:
        b.push(f)
    n_ok = _vxlan.encap_batch(b, loc, rem, vni, udp_csum=csum)
    for i, f in enumerate(frames):
        try:
            want = _vxlan.encap(f, loc, rem, vni, udp_csum=csum)
            expect(b.drop_reason(i) == "ok" and b.get(i) == want, f"encap_batch differs at {i}")
        except ValueError as e:
            expect(b.drop_reason(i) == check_reason(e), f"encap_batch verdict differs at {i}")
    expect(n_ok == sum(b.drop_reason(i) == "ok" for i in range(n)), "encap_batch count")
    return f"encap_batch:{n_ok}/{n}"


def check_ecn_decap(sent: bytes, got: bytes, outer: int) -> None:
    """The inner frame is the UDP payload's tail, except for RFC 6040 §4.2 (normal mode)
    ECN decapsulation: an outer CE makes an ECT inner CE, an outer ECT(1) makes an inner
    ECT(0) ECT(1); an IPv4 header checksum that was right stays right."""
    expect(len(got) == len(sent), "inner frame length is not the UDP payload's")
    off, et = 14, struct.unpack_from("!H", sent, 12)[0]
    for _ in range(2):
        if et in (0x8100, 0x88A8, 0x9100) and off + 4 <= len(sent):
            et, off = struct.unpack_from("!H", sent, off + 2)[0], off + 4
    v = 4 if et == 0x0800 and off + 20 <= len(sent) and sent[off] >> 4 == 4 else (
        6 if et == 0x86DD and off + 40 <= len(sent) and sent[off] >> 4 == 6 else 0)
    if v == 0:
        expect(got == sent, "a non-IP inner frame was changed")
        return
    ecn_in = (sent[off + 1] & 3) if v == 4 else (sent[off + 1] >> 4) & 3
    want = ecn_in
    if ecn_in and outer == 3:
        want = 3
    elif ecn_in == 2 and outer == 1:
        want = 1
    ecn_out = (got[off + 1] & 3) if v == 4 else (got[off + 1] >> 4) & 3
    expect(ecn_out == want, f"inner ECN {ecn_in} under outer {outer} became {ecn_out}, "
           f"RFC 6040 says {want}")
    mask = 0xFC if v == 4 else 0xCF
    changed = {off + 1} | ({off + 10, off + 11} if v == 4 else set())
    expect(all(got[i] == sent[i] for i in range(len(sent)) if i not in changed)
           and got[off + 1] & mask == sent[off + 1] & mask,
           "inner frame changed beyond its ECN bits")
    if v == 4 and inet_sum(sent[off:off + (sent[off] & 15) * 4]) == 0xFFFF:
        expect(inet_sum(got[off:off + (got[off] & 15) * 4]) == 0xFFFF,
               "inner IPv4 checksum broken by ECN decapsulation")


# ---- admission and delivery through a whole data plane ---------------------------------

LOCAL = "10.99.0.2"
SOURCES = ("10.99.0.1", "10.99.0.3", "10.99.0.66")     # the last is admitted for no VNI
# VF index -> (MAC, VNI, mode)
VFS = {0: (bytes([2, 0, 0, 0, 0, 0x10]), 100, "off"),
       1: (bytes([2, 0, 0, 0, 0, 0x11]), 100, "enforce"),
       2: (bytes([2, 0, 0, 0, 0, 0x12]), 200, "offload"),
       3: (bytes([2, 0, 0, 0, 0, 0x13]), 100, "off")}
# (VNI, source) admitted, and by which kind of entry
ADMITTED = {(100, "10.99.0.1"): "fdb", (200, "10.99.0.3"): "accept",
            (300, "10.99.0.1"): "flood", (100, "10.99.0.3"): "flood"}
VNIS = (100, 200, 300, 400)
_DP: list = []


def _dp():  # type: ignore[no-untyped-def]
    if not _DP:
        from softnic._fastpath import Datapath

        dp = Datapath(LOCAL, 1500)
        for i, (mac, vni, mode) in VFS.items():
            dp.set_vf(i, mac, vni, ipsec=mode)
        for (vni, src), kind in ADMITTED.items():
            if kind == "fdb":
                dp.fdb_add(vni, bytes([2, 0, 0, 0, 0xAA, vni & 0xFF]), src)
            elif kind == "flood":
                dp.fdb_add(vni, None, src)
            else:
                dp.peer_add(vni, src)
        _DP.append(dp)
    return _DP[0]


def _is_clear_ip(f: bytes) -> bool:
    """IP an enforce VF must refuse in the clear: a well-formed IPv4 header, or IPv6
    other than neighbour discovery (ICMPv6 133-137 right after the fixed header)."""
    if len(f) < 14 + 20:
        return False
    et = f[12:14]
    if et == b"\x08\x00":
        ip = f[14:]
        hl = (ip[0] & 15) * 4
        tot = struct.unpack_from("!H", ip, 2)[0]
        return ip[0] >> 4 == 4 and 20 <= hl <= tot <= len(ip)
    if et == b"\x86\xdd" and len(f) >= 14 + 40 and f[14] >> 4 == 6:
        return not (f[20] == 58 and len(f) > 54 and 133 <= f[54] <= 137)
    return False


def _inner_for(r: Reader, macs: list[bytes]) -> bytes:
    f = inner_frame(r)
    dst = r.choice(macs + [b"\xff" * 6, bytes([0x01, 0, 0x5E, 0, 0, 0xFB]),
                           bytes([0x33, 0x33, 0, 0, 0, 1]), bytes([2, 0, 0, 0, 0, 0x77])])
    f = dst + f[6:]
    k = r.u8() % 8
    if k == 6:
        f = f[:max(14, r.below(len(f) + 1))]
    elif k == 7 and len(f) > 14:
        b = bytearray(f)
        b[14 + r.below(len(f) - 14)] ^= 1 << (r.u8() % 8)
        f = bytes(b)
    elif k == 5:                                   # ARP: passes every mode
        f = f[:12] + b"\x08\x06" + bytes([0, 1, 8, 0, 6, 4, 0, 1]) + r.take(20)
    return f


def _check_copy(vf: int, reason: str, got: bytes | None, frame: bytes,
                verdicts: dict[str, int]) -> None:
    mode = VFS[vf][2]
    expect(reason in REASONS or reason == "ok", f"unknown verdict {reason}")
    if reason == "ok":
        assert got is not None
        expect(got[:12] == bytes(12), f"vnet header {got[:12].hex()} on a clear frame")
        expect(got[12:] == frame, "the delivered frame is not the inner frame")
        expect(not (mode == "enforce" and _is_clear_ip(frame)),
               "an enforce VF took clear IP")
    elif reason.startswith("malformed"):
        verdicts[reason] = verdicts.get(reason, 0) + 1
    else:
        expect(reason == "policy" and mode == "enforce",
               f"VF {vf} ({mode}) refused a clear frame: {reason}")
    if reason.startswith("malformed"):
        expect(len(verdicts) == 1, f"copies of one frame parsed differently: {verdicts}")


def rx_admission(r: Reader) -> str:
    """One VXLAN packet into the data plane: admission, then delivery to the VFs the
    model names (each copy through its VF's mode)."""
    from softnic._batch import Batch

    dp = _dp()
    src, vni = r.choice(SOURCES), r.choice(VNIS)
    frame = _inner_for(r, [m for m, _, _ in VFS.values()])
    pkt = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 16 + len(frame), 0, 0x4000,
                                64, 17, 0, ipaddress.ip_address(src).packed,
                                ipaddress.ip_address(LOCAL).packed))
    struct.pack_into("!H", pkt, 10, 0xFFFF - inet_sum(bytes(pkt)))
    pkt += struct.pack("!HHHH", 49152 + r.u8(), 4789, 16 + len(frame), 0)
    pkt += struct.pack("!BxxxI", 0x08, vni << 8) + frame
    inb, extra = Batch(1), Batch(8)
    inb.push(bytes(pkt))
    before = dp.uplink_counters()["drops"].get("unknown_vtep", 0)
    dp.rx_burst(inb, extra)
    first = inb.drop_reason(0)
    if (vni, src) not in ADMITTED:
        expect(first == "unknown_vtep" and len(extra) == 0,
               f"VXLAN from {src} for VNI {vni}, not admitted, got {first}")
        expect(dp.uplink_counters()["drops"]["unknown_vtep"] == before + 1,
               "unknown_vtep not counted on the uplink")
        return "rx:unknown_vtep"
    members = [i for i, (_, v, _) in VFS.items() if v == vni]
    group = bool(frame[0] & 1)
    targets = members if group else [i for i in members if VFS[i][0] == frame[:6]]
    if not members:
        expect(first == "unknown_vni" and len(extra) == 0, f"no VF has VNI {vni}: {first}")
        return "rx:unknown_vni"
    if not targets:
        expect(first == "no_fdb" and len(extra) == 0, f"no VF has that MAC: {first}")
        return "rx:no_fdb"
    copies = [(inb.port(0) if first == "ok" else -1, first,
               inb.get(0) if first == "ok" else None)]
    copies += [(extra.port(i) if extra.drop_reason(i) == "ok" else -1, extra.drop_reason(i),
                extra.get(i) if extra.drop_reason(i) == "ok" else None)
               for i in range(len(extra))]
    expect(len(copies) == len(targets), f"{len(copies)} copies for VFs {targets}")
    verdicts: dict[str, int] = {}
    for (port, reason, got), vf in zip(copies, targets, strict=True):
        expect(reason != "ok" or port == vf, f"copy for VF {vf} went to {port}")
        _check_copy(vf, reason, got, frame, verdicts)
    return "rx:" + ",".join(sorted({c[1] for c in copies})) + (":bum" if group else "")


def local_switch(r: Reader) -> str:
    """A frame from VF 0 switched to the VFs of its VNI here: each copy meets its
    receiver's mode as if it came from the underlay."""
    from softnic._batch import Batch

    dp = _dp()
    frame = _inner_for(r, [VFS[i][0] for i in (1, 2, 3)])
    frame = frame[:6] + VFS[0][0] + frame[12:]
    inb = Batch(1, slot_size=4096, headroom=64)
    inb.push(bytes(12) + frame)
    out, loc = Batch(64, slot_size=2076), Batch(16, slot_size=2076)
    dp.tx_burst(0, inb, 0, out, loc)
    if inb.drop_reason(0) != "ok":
        expect(len(loc) == 0 and inb.drop_reason(0) in REASONS, "a refused frame went on")
        return "local:" + inb.drop_reason(0)
    group = bool(frame[0] & 1)
    want = [i for i in (1, 3) if group or VFS[i][0] == frame[:6]]
    got = sorted((loc.port(i), loc.drop_reason(i), loc.get(i)) for i in range(len(loc)))
    expect(len(got) == len(want), f"local copies {[g[:2] for g in got]} for VFs {want}")
    verdicts: dict[str, int] = {}
    for vf, (port, reason, data) in zip(want, got, strict=True):
        expect(port == vf, f"copy for VF {vf} went to {port}")
        if reason == "ok" and data[12:] != frame and _tcp_syn(frame):
            continue                            # MSS clamped: the tso harness checks it
        _check_copy(vf, reason, data if reason == "ok" else None, frame, verdicts)
    return "local:" + ",".join(sorted({g[1] for g in got}) or ["none"])


def _tcp_syn(f: bytes) -> bool:
    """IPv4 TCP with SYN set (its MSS option may be clamped on the way)."""
    if len(f) < 34 or f[12:14] != b"\x08\x00" or f[23] != 6:
        return False
    flags = 14 + (f[14] & 15) * 4 + 13
    return flags < len(f) and bool(f[flags] & 2)


def one(data: bytes) -> str:
    r = Reader(data)
    op = r.u8() % 7
    if op == 5:
        return rx_admission(r)
    if op == 6:
        return local_switch(r)
    frame = inner_frame(r)
    if op >= 3:
        return _batches(r, op, frame)
    if op == 0:
        vni = r.uint(3)
        pkt, v6, l4 = outer(r, frame, vni)
        pkt, damaged = _damage(r, pkt, l4)
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
        outer_ecn = (pkt[1] & 3) if pkt[0] >> 4 == 4 else (pkt[1] >> 4) & 3
        check_ecn_decap(pkt[u + 16:u + ulen], inner, outer_ecn)
        expect(bool(pkt[u + 8] & 0x08), "accepted with the I flag clear")
        expect(got_vni == int.from_bytes(pkt[u + 12:u + 15], "big"), "VNI not from the header")
        if not damaged:
            fam = V6 if v6 else V4
            expect(got_vni == vni, "decap VNI differs from what was built")
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
         for op in range(7) for k in range(4) for v6 in (0, 1)]
