"""Shared pieces of the harnesses: a byte reader that turns fuzz input into choices,
an Internet checksum written here (not softnic's), and checks of packets by dpkt."""

from __future__ import annotations

import struct

import dpkt

from softnic._batch import DROP_REASONS

REASONS = frozenset(DROP_REASONS[1:])


class Finding(AssertionError):
    """The compiled code produced an outcome its contract forbids."""


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise Finding(what)


class Reader:
    """Deterministic choices from fuzz bytes; past the end every read is 0, so any
    input (even empty) is a valid case and a shorter input is a simpler one."""

    __slots__ = ("d", "i")

    def __init__(self, data: bytes) -> None:
        self.d = data
        self.i = 0

    def u8(self) -> int:
        if self.i >= len(self.d):
            return 0
        self.i += 1
        return self.d[self.i - 1]

    def uint(self, nbytes: int) -> int:
        v = 0
        for _ in range(nbytes):
            v = (v << 8) | self.u8()
        return v

    def below(self, n: int) -> int:
        """An int in [0, n)."""
        if n <= 1:
            return 0
        nbytes = 1 if n <= 256 else 2 if n <= 65536 else 4 if n <= 1 << 32 else 8
        return self.uint(nbytes) % n

    def flag(self) -> bool:
        return bool(self.u8() & 1)

    def choice(self, seq):  # type: ignore[no-untyped-def]
        return seq[self.below(len(seq))]

    def take(self, n: int) -> bytes:
        b = self.d[self.i:self.i + n]
        self.i += len(b)
        return b + bytes(n - len(b))

    def rest(self) -> bytes:
        b = self.d[self.i:]
        self.i = len(self.d)
        return b


def inet_sum(data: bytes, start: int = 0) -> int:
    """RFC 1071 one's-complement sum, folded to 16 bits (not complemented)."""
    if len(data) & 1:
        data += b"\0"
    s = start + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def pseudo_sum(ip: bytes, proto: int, l4len: int) -> int:
    if ip[0] >> 4 == 4:
        ph = ip[12:20] + struct.pack("!BBH", 0, proto, l4len)
    else:
        ph = ip[8:40] + struct.pack("!IxxxB", l4len, proto)
    return inet_sum(ph)


def check_ip(pkt: bytes, *, l4: bool = False) -> dpkt.Packet | None:
    """An IP packet as an independent parser sees it: dpkt parses it, its lengths match
    the bytes, an IPv4 header checksum verifies; with l4, a TCP/UDP checksum verifies.
    Returns the dpkt packet, or None when only the IP header could be checked (the
    payload is opaque bytes that dpkt cannot dissect, e.g. transport-mode ESP's)."""
    expect(len(pkt) >= 20, f"IP packet of {len(pkt)} bytes")
    ver = pkt[0] >> 4
    if ver == 4:
        hl = (pkt[0] & 15) * 4
        expect(hl >= 20 and struct.unpack_from("!H", pkt, 2)[0] == len(pkt),
               f"IPv4 header/total length vs {len(pkt)} bytes")
        expect(inet_sum(pkt[:hl]) == 0xFFFF, "IPv4 header checksum")
    elif ver == 6:
        expect(len(pkt) >= 40 and 40 + struct.unpack_from("!H", pkt, 4)[0] == len(pkt),
               f"IPv6 payload length vs {len(pkt)} bytes")
    else:
        raise Finding(f"IP version {ver}")
    try:
        ip = dpkt.ip.IP(pkt) if ver == 4 else dpkt.ip6.IP6(pkt)
    except (dpkt.UnpackError, IndexError):
        expect(not l4, "dpkt cannot parse the packet")
        return None
    if l4:
        seg = ip.data
        proto = ip.p                     # dpkt: past IPv6 extension headers too
        if isinstance(seg, (dpkt.tcp.TCP, dpkt.udp.UDP)):
            raw = bytes(seg)
            expect(inet_sum(raw, pseudo_sum(pkt, proto, len(raw))) == 0xFFFF,
                   f"L4 checksum (proto {proto})")
    return ip


def check_reason(err: Exception) -> str:
    """The reason of a documented refusal; anything else is a finding."""
    reason = getattr(err, "reason", None) or (err.args[0] if err.args else "")
    expect(reason in REASONS, f"refusal with an unknown reason: {err!r}")
    return str(reason)
