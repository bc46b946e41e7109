"""The TX offloads and the frame parser (virtio 1.x §5.1.6.2, RFC 9293 §3.1 as NICs
segment, RFC 791 / RFC 8200 headers): softnic._parse.parse, softnic._tso.csum_complete,
segment, segment_batch and mss_clamp, and the one-pass TSO -> ESP -> VXLAN of
softnic._tsoesp inside the data plane, with hostile virtio-net headers.

Frames are built here (Ethernet with up to two VLAN tags, IPv4 with options or IPv6 with
hop-by-hop / destination-options headers, TCP with options, payload, Ethernet padding),
so the harness knows every offset. Then the vnet header is made hostile field by field
and the frame may be damaged (truncated, a flipped bit, a wrong IP length).

Oracles: for an undamaged frame and a sane header, the exact parse, and segments that
dpkt parses with valid IPv4 and TCP checksums (our own RFC 1071 sum), sequence numbers
that advance by the payload, FIN/PSH only last, CWR only first, payloads that
reassemble to the original. For anything else: a drop reason, or output that is still
valid per segment. csum_complete may change only the two checksum bytes, and their
RFC 1071 sum over [csum_start:] must verify. The one-pass path must do exactly what the
stage-by-stage path does with the same frame: the same drop reason and counters, the
same packets up to the ESP sequence number, and ciphertexts that `cryptography`'s
AES-GCM opens to the same plaintexts.
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import softnic._parse as _parse
import softnic._tso as _tso
import softnic._tsoesp as _tsoesp
from softnic._batch import Batch

from .common import REASONS, Reader, check_ip, check_reason, expect, inet_sum

NEEDS_CSUM, TCPV4, TCPV6, ECN = 1, 1, 4, 0x80
MIN_MSS = 48


class Frame:
    """A frame built from fuzz choices, with its known layout."""

    def __init__(self, r: Reader) -> None:
        tags = r.u8() % 3
        l2 = bytes(6) + bytes([2, 0, 0, 0, 0, 1])
        for i in range(tags):
            l2 += struct.pack("!HH", 0x88A8 if i == 0 and tags == 2 else 0x8100, r.uint(2) & 0xFFF)
        self.v6 = r.flag()
        l2 += struct.pack("!H", 0x86DD if self.v6 else 0x0800)
        self.l2len = len(l2)
        opt_words = r.u8() % 11
        tcp_opts = bytes([1]) * (4 * opt_words - 4) + (struct.pack("!BBH", 2, 4, 1460)
                                                        if opt_words else b"")
        self.tcp_hl = 20 + len(tcp_opts)
        n = r.below(4000) if r.u8() % 4 else r.below(200)
        salt = r.u8()
        self.payload = bytes((i * 7 + salt) & 0xFF for i in range(n))
        self.flags = r.u8() & 0xDB | 0x10          # no SYN/RST; ACK set
        self.seq = r.uint(4)
        tcp = bytearray(struct.pack("!HHIIBBHHH", 40000 + r.u8(), 80, self.seq, r.uint(4),
                                    (self.tcp_hl // 4) << 4, self.flags, 65535, 0, 0))
        tcp += tcp_opts
        if self.v6:
            # hop-by-hop first, then destination options, each padded with PadN
            ext_list: list[bytes] = []
            nxt = 6
            ks = [0, 60][: r.u8() % 3]
            for idx in reversed(range(len(ks))):
                ln = r.u8() % 2
                body = bytes([1, 6 + 8 * ln - 2]) + bytes(6 + 8 * ln - 2)
                ext_list.insert(0, bytes([nxt, ln]) + body)
                nxt = ks[idx]
            chain = b"".join(ext_list)
            self.l3hl = 40 + len(chain)
            ip = struct.pack("!IHBB", 0x60000000, len(chain) + self.tcp_hl + n, nxt, 64)
            ip += bytes.fromhex("20010db8" + "00" * 11 + "01") + bytes.fromhex(
                "20010db8" + "00" * 11 + "02") + chain
        else:
            ow = r.u8() % 6
            opts = bytes([0x94, 4, 0, 0]) * ow      # router alert: harmless, no route
            self.l3hl = 20 + len(opts)
            ip4 = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45 + ow, 0, self.l3hl + self.tcp_hl + n,
                                        r.uint(2), 0x4000, 64, 6, 0, bytes([10, 0, 0, 1]),
                                        bytes([10, 0, 0, 2]))) + opts
            struct.pack_into("!H", ip4, 10, 0xFFFF - inet_sum(bytes(ip4)))
            ip = bytes(ip4)
        ipb = bytes(ip)
        ph = pseudo(ipb, self.tcp_hl + n)
        struct.pack_into("!H", tcp, 16, ph)        # Linux leaves the pseudo sum for NEEDS_CSUM
        self.l4off = self.l2len + self.l3hl
        self.hdr = l2 + ipb + bytes(tcp)
        self.pad = bytes(r.u8() % 4 * 3) if r.u8() % 5 == 4 else b""
        self.bytes = self.hdr + self.payload + self.pad

    def vnet(self, r: Reader, mss: int) -> tuple[bytes, bool]:
        """A sane header for this frame, then maybe hostile fields; (hdr, sane)."""
        f = [NEEDS_CSUM, (TCPV6 if self.v6 else TCPV4) | (ECN if r.u8() % 4 == 3 else 0),
             len(self.hdr), mss, self.l4off, 16]
        sane = True
        for _ in range(r.u8() % 4 if r.u8() % 3 == 2 else 0):
            i = r.below(6)
            v = r.choice((0, 1, 2, 3, 5, 0x7F, 0xFF, 0xFFFF, len(self.bytes), len(self.hdr) - 1,
                          self.l4off + 17, MIN_MSS - 1, r.uint(2)))
            f[i] = v & (0xFF if i < 2 else 0xFFFF)
            sane = False
        return struct.pack("<BBHHHHH", *f, 0), sane


def pseudo(ip: bytes, l4len: int) -> int:
    if ip[0] >> 4 == 4:
        return inet_sum(ip[12:20] + struct.pack("!BBH", 0, 6, l4len))
    return inet_sum(ip[8:40] + struct.pack("!IxxxB", l4len, 6))


def damage(r: Reader, b: bytes) -> tuple[bytes, bool]:
    k = r.u8() % 8
    if k == 5 and b:
        return b[:r.below(len(b))], True
    if k == 6 and b:
        x = bytearray(b)
        x[r.below(len(x))] ^= 1 << (r.u8() % 8)
        return bytes(x), True
    if k == 7 and b:
        x = bytearray(b)
        i = r.below(min(len(x), 80))
        x[i:i + 2] = r.take(2)[: len(x) - i]
        return bytes(x), True
    return b, False


def layout(s: bytes) -> tuple[int, int]:
    """(l2 length, headers length) of an Ethernet/IP/TCP frame, walked here."""
    off = 12
    while off + 2 <= len(s) and s[off:off + 2] in (b"\x81\x00", b"\x88\xa8", b"\x91\x00"):
        off += 4
    expect(off + 2 <= len(s), "segment without an ethertype")
    l2 = off + 2
    expect(len(s) >= l2 + 20, "segment without an IP header")
    if s[l2] >> 4 == 4:
        l4 = l2 + (s[l2] & 15) * 4
    else:
        nh, l4 = s[l2 + 6], l2 + 40
        while nh in (0, 43, 60) and l4 + 2 <= len(s):
            nh, l4 = s[l4], l4 + (s[l4 + 1] + 1) * 8
    expect(l4 + 13 <= len(s), "segment without a TCP header")
    return l2, l4 + (s[l4 + 12] >> 4) * 4


def check_segments(fr: Frame, segs: list[bytes], mss: int, exact: bool) -> None:
    total = b""
    for i, s in enumerate(segs):
        l2, hl = layout(s)
        expect(len(s) >= hl, f"segment {i} shorter than the headers")
        ip = s[l2:]
        check_ip(ip, l4=exact)
        pl = s[hl:]
        expect(len(pl) <= mss, f"segment {i} payload {len(pl)} > mss {mss}")
        total += pl
        if exact:
            seq, fl = struct.unpack_from("!I", s, fr.l4off + 4)[0], s[fr.l4off + 13]
            expect(seq == (fr.seq + len(total) - len(pl)) & 0xFFFFFFFF, f"segment {i} seq")
            last, first = i == len(segs) - 1, i == 0
            expect(bool(fl & 0x09) == bool(fr.flags & 0x09) if last else not fl & 0x09,
                   f"FIN/PSH on segment {i}")
            expect(bool(fl & 0x80) == bool(fr.flags & 0x80) if first else not fl & 0x80,
                   f"CWR on segment {i}")
    if exact:
        expect(total == fr.payload, "segments do not reassemble to the payload")


def n_in(drops: dict[str, int], n: int, inb: Batch, outb: Batch) -> bool:
    """Each input packet is dropped with one reason or produced at least one packet."""
    ok = sum(1 for i in range(inb.count) if inb.drop_reason(i) == "ok")
    return ok + sum(drops.values()) == inb.count and (ok == 0) == (n == 0)


def one(data: bytes) -> str:
    r = Reader(data)
    op = r.u8() % 6
    fr = Frame(r)
    mss = r.choice((536, 1448, 1460, 8960, MIN_MSS, 100)) if r.u8() % 4 else r.uint(2)
    cap = 0 if r.u8() % 3 else r.choice((MIN_MSS, 1000, 1400, r.uint(2)))
    vh, sane = fr.vnet(r, mss)
    frame, damaged = damage(r, fr.bytes)
    if op == 0:
        try:
            h = _parse.parse(frame)
        except ValueError as e:
            expect(damaged, "an undamaged frame does not parse")
            return "parse:" + check_reason(e)
        n = len(frame)
        expect(h["l3off"] == h["l2len"] <= h["l4off"] <= n, f"offsets {h}")
        if h["ipver"]:
            end = h["l3off"] + h["l3len_total"]
            expect(end <= n and h["l4off"] + h["l4hdrlen"] <= end, f"lengths {h} vs {n}")
        if not damaged:
            want = {"l2len": fr.l2len, "l4off": fr.l4off, "ipver": 6 if fr.v6 else 4,
                    "l4proto": 6, "l4hdrlen": fr.tcp_hl, "is_fragment": False,
                    "l3len_total": fr.l3hl + fr.tcp_hl + len(fr.payload)}
            got = {k: h[k] for k in want}
            expect(got == want, f"parse {got} != {want}")
        return "parse:ok"
    if op == 1:
        # Checksum completion of a non-GSO frame with the same (maybe hostile) fields.
        hdr = bytearray(vh)
        hdr[1] = 0
        try:
            out = _tso.csum_complete(bytes(hdr), frame)
        except ValueError as e:
            return "csum:" + check_reason(e)
        expect(len(out) == len(frame), "csum_complete changed the length")
        cs, co = struct.unpack_from("<HH", hdr, 6)
        if hdr[0] & NEEDS_CSUM:
            at = cs + co
            expect(at + 2 <= len(frame), "checksum stored outside the frame")
            expect(out[:at] == frame[:at] and out[at + 2:] == frame[at + 2:],
                   "csum_complete wrote outside its field")
            # virtio 5.1.6.2: the one's complement of the sum of frame[cs:] as the guest
            # left it (pseudo-header sum in the field), 0 sent as 0xFFFF.
            want_c = 0xFFFF - inet_sum(frame[cs:]) or 0xFFFF
            got_c = struct.unpack_from("!H", out, at)[0]
            expect(got_c == want_c, f"checksum {got_c:#06x}, RFC 1071 says {want_c:#06x}")
        else:
            expect(out == frame, "frame changed without NEEDS_CSUM")
        return "csum:ok"
    if op == 2:
        try:
            segs = _tso.segment(vh, frame, cap)
        except ValueError as e:
            reason = check_reason(e)
            expect(damaged or not sane or mss < MIN_MSS, f"sane TSO refused: {reason}")
            return "tso:" + reason
        gso = struct.unpack_from("<H", vh, 4)[0]     # the header's, hostile or not
        eff = min(gso, cap) if cap else gso
        check_segments(fr, segs, eff, exact=not damaged and sane)
        return "tso:ok"
    if op == 3:
        # A batch of this frame and fuzz-chosen others, hostile headers included.
        inb = Batch(4, slot_size=8192, headroom=64)
        frames = [vh + frame]
        for _ in range(r.u8() % 4):
            f2 = Frame(r)
            v2, _ = f2.vnet(r, r.choice((536, 1448, MIN_MSS)))
            frames.append(damage(r, v2 + f2.bytes)[0][:8000])
        for f in frames:
            inb.push(f[:8000])
        outb = Batch(r.choice((1, 8, 64, 200)), slot_size=r.choice((2048, 9000)), headroom=64)
        n, drops = _tso.segment_batch(inb, outb, cap)
        expect(n == outb.count, "segment_batch count")
        expect(set(drops) <= REASONS, f"unknown drop reasons {drops}")
        expect(n_in(drops, n, inb, outb), "every input packet has a verdict")
        # The batch path must agree with the single-frame entry points, input by input.
        want_segs: list[bytes] = []
        for i in range(inb.count):
            if inb.drop_reason(i) == "ok":
                f = inb.get(i)
                if f[1] & 0x7F == 0:
                    want_segs.append(_tso.csum_complete(f[:12], f[12:]))
                else:
                    segs = _tso.segment(f[:12], f[12:], cap)
                    check_segments(fr, segs, 65535, exact=False)
                    want_segs += segs
        got_segs = [outb.get(i) for i in range(outb.count)]
        expect(got_segs == want_segs, "segment_batch disagrees with segment/csum_complete")
        return "batch:" + ",".join(sorted(drops)) if drops else "batch:ok"
    if op == 5:
        return one_pass(vh, frame)
    try:
        out = _tso.mss_clamp(frame, r.uint(2))
    except ValueError as e:
        return "clamp:" + check_reason(e)
    expect(len(out) == len(frame), "mss_clamp changed the length")
    return "clamp:ok"


SEEDS = [bytes([op, tags, v6, 3, 5, 1, 100, 9, 0x18, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 1, 1, 1,
                1, 1, 1]) + bytes(16)
         for op in range(6) for tags in (0, 1, 2) for v6 in (0, 1)]


# ---- the one-pass path beside the stages ------------------------------------------------

SPI, KEY = 0x1000, bytes(range(20))            # AES-128 key || salt (RFC 4106)
_HOSTS: list = []


def _hosts() -> list:
    """Two data planes alike (kept across cases: both see the same sequence of frames),
    the frames' addresses protected by a tunnel-mode SA, their MAC behind a VTEP."""
    if not _HOSTS:
        from softnic._esp import SecurityAssociation
        from softnic._fastpath import Datapath

        for _ in range(2):
            dp = Datapath("10.99.0.1", 1500)
            dp.set_vf(0, "02:00:00:00:00:01", 100, ipsec="offload")
            dp.fdb_add(100, "00:00:00:00:00:00", "10.99.0.2")
            sa = SecurityAssociation(SPI, "tunnel", "10.0.0.1", "10.0.0.2", "aes-gcm", KEY)
            dp.sa_add(0, "out", sa)
            dp.policy_set(0, [{"dir": "out", "src": "10.0.0.1", "dst": "10.0.0.2",
                               "action": "protect", "spi": SPI}])
            _HOSTS.append((dp, sa))
    return _HOSTS


def _esp_at(pkt: bytes) -> int:
    """Offset of the ESP header in outer IPv4 / UDP / VXLAN / Ethernet (+VLAN) / IPv4
    (tunnel mode's outer header: no options), or -1 if the packet carries no ESP."""
    off = 36 + 12
    while pkt[off:off + 2] in (b"\x81\x00", b"\x88\xa8", b"\x91\x00"):
        off += 4
    if pkt[9] != 17 or pkt[off:off + 2] != b"\x08\x00" or len(pkt) < off + 2 + 20 + 16 \
            or pkt[off + 2 + 9] != 50:
        return -1
    return off + 2 + 20


def _open(pkt: bytes) -> bytes:
    """The plaintext of the packet's ESP, by `cryptography`'s AES-GCM (RFC 4106)."""
    e = _esp_at(pkt)
    nonce = KEY[16:] + pkt[e + 8:e + 16]
    return AESGCM(KEY[:16]).decrypt(nonce, pkt[e + 16:], pkt[e:e + 8])


def one_pass(vh: bytes, frame: bytes) -> str:
    res = []
    taken = _tsoesp.frames()
    for on, (dp, sa) in zip((False, True), _hosts(), strict=True):
        inb = Batch(1, slot_size=8192 + 64, headroom=64)
        inb.push((vh + frame)[:8192])
        out = Batch(512, slot_size=1500 + 576)
        loc = Batch(8, slot_size=1500 + 576)
        _tsoesp.set_enabled(on)
        try:
            expect(dp.tx_burst(0, inb, 0, out, loc) == 1, "tx_burst left the frame")
        finally:
            _tsoesp.set_enabled(True)
        pkts = [out.get(i) for i in range(out.count)]
        res.append((inb.drop_reason(0), pkts, dp.vf_counters(0), sa.stats()["seq"]))
    (g_reason, g_pkts, g_count, g_seq), (f_reason, f_pkts, f_count, f_seq) = res
    expect(f_reason == g_reason, f"one pass: {f_reason}, stages: {g_reason}")
    expect(f_count == g_count and f_seq == g_seq, f"counters {f_count} != {g_count}")
    expect([len(p) for p in f_pkts] == [len(p) for p in g_pkts], "packet lengths differ")
    for f, g in zip(f_pkts, g_pkts, strict=True):
        e = _esp_at(g)
        if e >= 0:
            expect(f[:e + 8] == g[:e + 8], "headers differ up to the ESP sequence number")
            expect(_open(f) == _open(g), "plaintexts differ")
        else:
            expect(f == g, "unprotected packets differ")
    # Which path the "on" run took: the one-pass module, or (not covered) the stages.
    return f"onepass:{g_reason}:" + ("fused" if _tsoesp.frames() > taken else "stages")
