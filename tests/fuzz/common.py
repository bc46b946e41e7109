"""Shared pieces of the harnesses: a byte reader that turns fuzz input into choices,
an Internet checksum written here (not softnic's), and checks of packets by dpkt."""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Callable

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


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(1 + rng.randrange(4)):
        k = rng.randrange(7)
        if k == 0 and b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif k == 1 and b:
            b[rng.randrange(len(b))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif k == 2:
            i = rng.randrange(len(b) + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(1 + rng.randrange(8)))
        elif k == 3 and b:
            i = rng.randrange(len(b))
            del b[i:i + 1 + rng.randrange(8)]
        elif k == 4 and pool:
            o = rng.choice(pool)
            i = rng.randrange(len(b) + 1)
            j = rng.randrange(len(o) + 1)
            b = b[:i] + o[j:]
        elif k == 5 and b:
            del b[rng.randrange(len(b)):]
        else:
            b += bytes(rng.randrange(256) for _ in range(rng.randrange(32)))
    return bytes(b[:4096])


def run_for(one: Callable[[bytes], str], seeds: list[bytes], seconds: float,
            seed: int = 0) -> dict[str, int]:
    """A bounded mutation run (for pytest): seeds first, then mutants of the seeds and
    of every input that reached a new outcome label, until `seconds` pass. Returns the
    label counts; a finding raises with the input's hex, so it can be replayed."""
    rng = random.Random(seed)
    pool = list(seeds)
    labels: dict[str, int] = {}
    t_end = time.monotonic() + seconds
    i = 0
    while i < len(seeds) or time.monotonic() < t_end:
        data = seeds[i] if i < len(seeds) else mutate(rng, rng.choice(pool), pool)
        i += 1
        try:
            label = one(data)
        except Exception as e:
            raise AssertionError(f"{e!r} on input {data.hex()}") from e
        if label not in labels:
            pool.append(data)
        labels[label] = labels.get(label, 0) + 1
    return labels
