"""ESP decapsulation (RFC 4303 §3.4) with valid-but-mutated packets.

Packets are built here with `cryptography`'s AEADs, AES-CBC and HMAC (not with softnic's
encap), from fuzz-chosen parts: SA shape (algorithm, ICV length, tunnel/transport,
IPv4/IPv6, ESN, UDP encapsulation, window), sequence numbers (next, replayed, old,
far-future, across a 2^32 boundary), wrong SPI, bad padding, bad pad length, bad next
header, TFC padding, wrong ICV, and then packet-level damage (truncation at any offset,
a flipped byte, a bad outer length). Each case runs up to four packets through one SA.

Oracle: an RFC 4303 model (Appendix A inference, §3.4.3 window, §2.4 trailer checks)
predicts the exact verdict of every undamaged packet, and the exact bytes on success;
a damaged packet must give a known drop reason, or a packet dpkt accepts.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from softnic._batch import Batch
from softnic._esp import EspError, SecurityAssociation

from .common import Finding, Reader, check_ip, check_reason, expect, inet_sum


# Fixed test keys (derived, never printed): a crashing input replays exactly.
def _key(label: str, n: int) -> bytes:
    return hashlib.sha256(label.encode()).digest()[:n] if n <= 32 else (
        hashlib.sha512(label.encode()).digest()[:n])


# (alg, key length, icv, block, iv)
ALGS = (
    ("aes-gcm", 20, 16, 4, 8),
    ("aes-gcm", 36, 8, 4, 8),
    ("aes-gcm", 20, 12, 4, 8),
    ("chacha20-poly1305", 36, 16, 4, 8),
    ("aes-cbc-hmac-sha256", 16, 16, 16, 16),
)
WINDOWS = (32, 64, 1024)
SPI = 0x1000_0001
V4 = (bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]))
V6 = (bytes.fromhex("20010db8000000000000000000000001"),
      bytes.fromhex("20010db8000000000000000000000002"))
PROTO_ESP, PROTO_UDP = 50, 17


class Model:
    """RFC 4303 receiver model: Appendix A.2.1 seq_hi inference, §3.4.3 window."""

    def __init__(self, window: int, esn: bool, top: int) -> None:
        self.w, self.esn, self.top = window, esn, top
        self.seen: set[int] = set()

    def infer(self, lo: int) -> int:
        if not self.esn:
            return lo
        tl, th, w = self.top & 0xFFFFFFFF, self.top >> 32, self.w
        if tl >= w - 1:
            hi = th if lo >= tl - w + 1 else th + 1
        else:
            if lo >= (tl - w + 1) & 0xFFFFFFFF:
                if th == 0:
                    return 0
                hi = th - 1
            else:
                hi = th
        return (hi << 32) | lo

    def fresh(self, seq: int) -> bool:
        if seq == 0:
            return False
        if seq > self.top:
            return True
        return self.top - seq < self.w and seq not in self.seen

    def accept(self, seq: int) -> None:
        self.top = max(self.top, seq)
        self.seen.add(seq)
        self.seen = {s for s in self.seen if self.top - s < self.w}


class Shape:
    def __init__(self, r: Reader) -> None:
        self.alg, self.klen, self.icv, self.block, self.ivlen = r.choice(ALGS)
        self.tunnel = r.flag()
        self.v6 = r.flag()
        self.esn = r.flag()
        self.encap = r.u8() % 4 == 3
        self.hbh = r.flag()              # IPv6 transport: a hop-by-hop header
        self.window = r.choice(WINDOWS)
        start = r.choice((0, 1, 100, 0xFFFFFFF0, 0x1_0000_0005, 0x2_FFFF_FFF0))
        if not self.esn:
            start &= 0xFFFFFFFF
        self.start = start
        tag = f"{self.alg}/{self.klen}"
        self.key = _key(tag, self.klen)
        self.auth = _key(tag + "/auth", 32) if self.block == 16 else None

    def sa(self) -> SecurityAssociation:
        src, dst = V6 if self.v6 else V4
        import ipaddress
        return SecurityAssociation(
            SPI, "tunnel" if self.tunnel else "transport",
            ipaddress.ip_address(src), ipaddress.ip_address(dst), self.alg, self.key,
            auth_key=self.auth, icv_len=self.icv, esn=self.esn,
            replay_window=self.window, seq=self.start,
            encap=(4500, 4500) if self.encap else None)

    def seal(self, spi: int, seq: int, iv: bytes, pt: bytes) -> bytes:
        lo, hi = seq & 0xFFFFFFFF, seq >> 32
        head = struct.pack("!II", spi, lo)
        if self.block == 16:
            enc = Cipher(algorithms.AES(self.key), modes.CBC(iv)).encryptor()
            ct = enc.update(pt) + enc.finalize()
            mac_in = head + iv + ct + (struct.pack("!I", hi) if self.esn else b"")
            assert self.auth is not None
            return head + iv + ct + hmac.new(self.auth, mac_in, "sha256").digest()[:16]
        aad = struct.pack("!III", spi, hi, lo) if self.esn else head
        k, salt = self.key[:-4], self.key[-4:]
        aead = AESGCM(k) if self.alg == "aes-gcm" else ChaCha20Poly1305(k)
        sealed = aead.encrypt(salt + iv, pt, aad)
        return head + iv + sealed[:len(pt)] + sealed[len(pt):len(pt) + self.icv]


def _inner(r: Reader, v6: bool) -> bytes:
    """An inner IPv4/IPv6 UDP packet with a fuzz-chosen payload."""
    body = r.take(r.below(300))
    udp = struct.pack("!HHHH", 1000 + r.u8(), 53, 8 + len(body), 0) + body
    if v6:
        return struct.pack("!IHBB", 0x60000000, len(udp), PROTO_UDP, 64) + V6[1] + V6[0] + udp
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), r.uint(2), 0, 64,
                                PROTO_UDP, 0, V4[1], V4[0]))
    struct.pack_into("!H", hdr, 10, 0xFFFF - inet_sum(bytes(hdr)))
    return bytes(hdr) + udp


def _outer(sh: Shape, r: Reader, esp: bytes) -> tuple[bytes, int, int]:
    """[IP][UDP]ESP; returns (packet, header length without UDP, offset of next header
    byte in the IP header)."""
    udp = b""
    proto = PROTO_ESP
    if sh.encap:
        udp = struct.pack("!HHHH", 4500, 4500, 8 + len(esp), 0)
        proto = PROTO_UDP
    if sh.v6:
        ext = b""
        nh = proto
        if not sh.tunnel and sh.hbh:
            ext = bytes([proto, 0, 1, 4, 0, 0, 0, 0])
            nh = 0
        hdr = struct.pack("!IHBB", 0x60000000, len(ext) + len(udp) + len(esp), nh, 64)
        hdr += V6[0] + V6[1] + ext
        return hdr + udp + esp, len(hdr), 40 if ext else 6
    h4 = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp) + len(esp), 7,
                               0x4000 if r.flag() else 0, 64, proto, 0, V4[0], V4[1]))
    struct.pack_into("!H", h4, 10, 0xFFFF - inet_sum(bytes(h4)))
    return bytes(h4) + udp + esp, 20, 9


def _pick_seq(r: Reader, top: int, w: int, last: int) -> int:
    """The next sequence number to send, relative to the highest sent so far."""
    k = r.u8() % 8
    if k == 4:
        return last                          # replay the previous one
    if k == 5:
        return max(top - w - r.u8() % 4, 0)  # at or just left of the window
    if k == 6:
        return top + (1 << (r.u8() % 40))    # far future (may cross a 2^32 boundary)
    if k == 7:
        return max(top - r.below(w), 0)      # inside the window
    return top + 1 + k


def _plaintext(sh: Shape, r: Reader, payload: bytes, nh: int) -> tuple[bytes, str | None]:
    """payload || padding || pad length || next header, and the model's verdict on the
    trailer (None: well formed)."""
    pad = (-(len(payload) + 2)) % sh.block + sh.block * (r.u8() % 3)
    padding = bytearray(range(1, pad + 1))
    padlen = pad
    bad = None
    k = r.u8() % 10
    if k == 8 and pad:
        padding[r.below(pad)] ^= 1 + r.u8() % 255
        bad = "bad_trailer"
    elif k == 9:
        padlen = len(payload) + pad + r.u8() % 8   # points before the payload start
        if padlen > 255:
            padlen = 255
        if padlen + 2 > len(payload) + pad + 2 or padlen > pad:
            bad = "bad_trailer" if padlen != pad else None
    return bytes(payload) + bytes(padding) + bytes([padlen, nh]), bad


def _trailer_ok(sh: Shape, pt: bytes) -> bool:
    """§2.4/§2.6 trailer checks plus, in tunnel mode, the inner header against the
    next header (what a receiver must verify before trusting the inner length)."""
    padlen, nh = pt[-2], pt[-1]
    if padlen + 2 > len(pt):
        return False
    pl = len(pt) - 2 - padlen
    if pt[pl:pl + padlen] != bytes(range(1, padlen + 1)):
        return False
    if nh in (59, 0, 255):
        return False
    if not sh.tunnel:
        return True
    if nh == 4:
        if pl < 20 or pt[0] >> 4 != 4 or pt[0] & 15 < 5:
            return False
        n = struct.unpack_from("!H", pt, 2)[0]
        return (pt[0] & 15) * 4 <= n <= pl
    if nh == 41:
        return pl >= 40 and pt[0] >> 4 == 6 and 40 + struct.unpack_from("!H", pt, 4)[0] <= pl
    return False


def _open(sh: Shape, esp: bytes, seq: int) -> bytes:
    """Verify and decrypt one ESP payload as a receiver built on `cryptography` would;
    returns the plaintext (payload || padding || pad length || next header)."""
    lo, hi = seq & 0xFFFFFFFF, seq >> 32
    expect(len(esp) >= 8 + sh.ivlen + sh.icv, "ESP shorter than header + IV + ICV")
    head, iv = esp[:8], esp[8:8 + sh.ivlen]
    ct, icv = esp[8 + sh.ivlen:len(esp) - sh.icv], esp[len(esp) - sh.icv:]
    expect(len(ct) % sh.block == 0 and len(ct) >= 2, "ciphertext not block aligned")
    if sh.block == 16:
        assert sh.auth is not None
        mac_in = head + iv + ct + (struct.pack("!I", hi) if sh.esn else b"")
        expect(hmac.compare_digest(hmac.new(sh.auth, mac_in, "sha256").digest()[:16], icv),
               "HMAC-SHA-256-128 ICV does not verify")
        dec = Cipher(algorithms.AES(sh.key), modes.CBC(iv)).decryptor()
        return dec.update(ct) + dec.finalize()
    aad = struct.pack("!III", struct.unpack("!I", head[:4])[0], hi, lo) if sh.esn else head
    k, salt = sh.key[:-4], sh.key[-4:]
    try:
        if sh.alg == "aes-gcm":
            d = Cipher(algorithms.AES(k), modes.GCM(salt + iv, icv, min_tag_length=8)).decryptor()
            d.authenticate_additional_data(aad)
            return d.update(ct) + d.finalize()
        return ChaCha20Poly1305(k).decrypt(salt + iv, ct + icv, aad)
    except InvalidTag:
        raise Finding("AEAD ICV does not verify") from None


def _encap_case(r: Reader) -> str:
    """protect() of a guest's packet, well formed or not: a drop reason, or ESP that an
    independent receiver opens to exactly the packet's bytes (RFC 4303 §3.1, §2.4)."""
    sh = Shape(r)
    src, dst = V6 if sh.v6 else V4
    import ipaddress
    sa = SecurityAssociation(
        SPI, "tunnel" if sh.tunnel else "transport", ipaddress.ip_address(src),
        ipaddress.ip_address(dst), sh.alg, sh.key, auth_key=sh.auth, icv_len=sh.icv,
        esn=sh.esn, seq=sh.start, encap=(4500, 4500) if sh.encap else None)
    inner_v6 = r.flag() if sh.tunnel else sh.v6
    pkt = bytearray(_inner(r, inner_v6))
    if not sh.tunnel and inner_v6 and sh.hbh:      # ESP goes after the hop-by-hop header
        pkt[6:7] = b"\x00"
        pkt[40:40] = bytes([PROTO_UDP, 0, 1, 4, 0, 0, 0, 0])
        struct.pack_into("!H", pkt, 4, struct.unpack_from("!H", pkt, 4)[0] + 8)
    pkt += r.take(r.u8() % 4) if r.u8() % 4 == 3 else b""     # Ethernet padding
    damaged = False
    k = r.u8() % 6
    if k == 4:
        pkt, damaged = pkt[:r.below(len(pkt))], True
    elif k == 5:
        i = r.below(min(len(pkt), 48))
        pkt[i] ^= 1 << (r.u8() % 8)
        damaged = True
    seq = sh.start + 1
    try:
        out = sa.protect(bytes(pkt))
    except EspError as e:
        reason = check_reason(e)
        expect(damaged or reason == "seq_exhausted", f"a well-formed packet refused: {reason}")
        return "encap:" + reason
    check_ip(out)
    if out[0] >> 4 == 4:
        off, nh = (out[0] & 15) * 4, out[9]
    else:
        nh, off = out[6], 40
        while nh in (0, 43, 60) and off + 8 <= len(out):
            nh, off = out[off], off + (out[off + 1] + 1) * 8
    expect(nh == (PROTO_UDP if sh.encap else PROTO_ESP), f"outer next header {nh}")
    if sh.encap:
        sport, dport, ulen = struct.unpack_from("!HHH", out, off)
        expect((sport, dport, ulen) == (4500, 4500, len(out) - off), "UDP encapsulation")
        off += 8
    esp = out[off:]
    spi, lo = struct.unpack_from("!II", esp)
    expect(spi == SPI and lo == seq & 0xFFFFFFFF, f"ESP header spi={spi:#x} seq={lo}")
    pt = _open(sh, esp, seq)
    padlen, nh_in = pt[-2], pt[-1]
    expect(padlen + 2 <= len(pt) and pt[len(pt) - 2 - padlen:-2] == bytes(range(1, padlen + 1)),
           "padding is not 1, 2, 3, ... (RFC 4303 §2.4)")
    payload = pt[:len(pt) - 2 - padlen]
    if sh.tunnel:
        expect(nh_in == (41 if payload[0] >> 4 == 6 else 4), f"inner next header {nh_in}")
        expect(payload == bytes(pkt[:len(payload)]), "tunnel payload is not the packet")
        if not damaged:
            expect(len(payload) == len(_strip_pad(pkt)), "tunnel payload length")
    else:
        hl = off - (8 if sh.encap else 0)
        expect(payload == bytes(pkt[hl:hl + len(payload)]), "transport payload is not the packet's")
        if not damaged:
            expect(nh_in == PROTO_UDP and hl + len(payload) == len(_strip_pad(pkt)),
                   "transport next header / payload length")
    return "encap:ok"


def _strip_pad(pkt: bytes | bytearray) -> bytes:
    """The IP packet without bytes past its own length."""
    if pkt[0] >> 4 == 4:
        return bytes(pkt[:struct.unpack_from("!H", pkt, 2)[0]])
    return bytes(pkt[:40 + struct.unpack_from("!H", pkt, 4)[0]])


def one(data: bytes) -> str:
    r = Reader(data)
    if r.u8() % 8 == 7:
        return _encap_case(r)
    sh = Shape(r)
    sa = sh.sa()
    m = Model(sh.window, sh.esn, sh.start)
    use_batch = r.u8() % 4 == 3
    cases = []
    last = top = m.top
    for _ in range(1 + r.u8() % 4):
        seq = _pick_seq(r, top, m.w, last)
        seq &= (1 << 64) - 1 if sh.esn else 0xFFFFFFFF
        last = seq
        top = max(top, seq)
        if sh.tunnel:
            inner_v6 = r.flag()
            payload = _inner(r, inner_v6)
            nh = 41 if inner_v6 else 4
            if r.u8() % 8 == 7:
                payload += r.take(r.u8() % 32)       # TFC padding (§2.4)
        else:
            payload = r.take(r.below(200))
            nh = r.choice((6, 17, 1, 58))
        if r.u8() % 10 == 9:
            nh = r.choice((59, 0, 255, 4, 41, 6, r.u8()))
        pt, _ = _plaintext(sh, r, payload, nh)
        spi = SPI if r.u8() % 12 != 11 else r.choice((SPI ^ 1, 0, 0xFFFFFFFF))
        iv = r.take(sh.ivlen)
        esp = bytearray(sh.seal(spi, seq, iv, pt))
        icv_bad = r.u8() % 12 == 11
        if icv_bad:
            esp[-1 - r.below(sh.icv)] ^= 0x80
        pkt, hl, nh_off = _outer(sh, r, bytes(esp))
        damaged = False
        dmg = r.u8() % 6
        if use_batch:
            dmg = 0                 # a batch shares one esp_off: keep packets whole
        if dmg == 4:
            pkt = pkt[:r.below(len(pkt))]
            damaged = True
        elif dmg == 5:
            b = bytearray(pkt)
            b[r.below(len(b))] ^= 1 << (r.u8() % 8)
            pkt, damaged = bytes(b), True
        cases.append((pkt, damaged, spi, seq, icv_bad, pt, hl, nh_off))

    def verdict(damaged: bool, spi: int, seq: int, icv_bad: bool, pt: bytes) -> str | None:
        """The model's verdict, in the order RFC 4303 §3.4 prescribes."""
        if damaged:
            return None
        if spi != SPI:
            return "no_sa"
        full = m.infer(seq & 0xFFFFFFFF)
        if not m.fresh(full):
            return "replay"
        if full != seq or icv_bad:
            return "icv"
        if not _trailer_ok(sh, pt):
            return "bad_trailer"
        m.accept(full)
        return "ok"

    outcomes = []
    if use_batch:
        wants = [verdict(*c[1:6]) for c in cases]
        b = Batch(len(cases), slot_size=4096, headroom=256)
        for c in cases:
            b.push(c[0])
        off = cases[0][6] + (8 if sh.encap else 0)
        n_ok, drops = sa.unprotect_batch(b, 0, off)
        expect(n_ok + sum(drops.values()) == len(cases), "batch counts do not add up")
        got = [(b.get(i) if b.drop_reason(i) == "ok" else None, b.drop_reason(i))
               for i in range(len(cases))]
    else:
        wants, got = [], []
        for c in cases:
            wants.append(verdict(*c[1:6]))
            try:
                got.append((sa.unprotect(c[0]), "ok"))
            except EspError as e:
                got.append((None, check_reason(e)))
            if c[1] and got[-1][1] == "ok":       # damage the SA did not care about
                m.accept(m.infer(c[3] & 0xFFFFFFFF))
    for (pkt, _, _, _, _, pt, hl, nh_off), want, (out, reason) in zip(cases, wants, got, strict=True):
        if want is not None:
            expect(reason == want, f"verdict {reason!r}, RFC 4303 model says {want!r}")
        if reason == "ok":
            assert out is not None
            _check_out(sh, pkt, pt, hl, nh_off, out, exact=want == "ok")
        outcomes.append(reason)
    return "esp:" + ",".join(sorted(set(outcomes)))


def _check_out(sh: Shape, pkt: bytes, pt: bytes, hl: int, nh_off: int, out: bytes,
               exact: bool) -> None:
    pl = len(pt) - 2 - pt[-2]
    if sh.tunnel:
        ip = check_ip(out)
        expect(len(out) <= pl, "inner packet longer than the decrypted payload")
        if exact:
            expect(out == pt[:len(out)], "inner packet differs from what was sealed")
        del ip
        return
    check_ip(out)
    if exact:
        expect(out[hl:] == pt[:pl], "transport payload differs from what was sealed")
        hdr = bytearray(pkt[:hl])
        hdr[nh_off] = pt[-1]
        if sh.v6:
            struct.pack_into("!H", hdr, 4, hl - 40 + pl)
        else:
            struct.pack_into("!H", hdr, 2, hl + pl)
            hdr[10:12] = out[10:12]              # checksum verified by check_ip
        expect(out[:hl] == bytes(hdr), "transport header not restored as RFC 4303 §3.4.4")


# Shapes: alg, tunnel, v6, esn, encap, hbh, window, start, batch, n packets; the rest 0.
# Decap shapes: 0, alg, tunnel, v6, esn, encap, hbh, window, start, batch, n packets;
# encap shapes: 7, alg, tunnel, v6, esn, encap, hbh, window, start, inner v6; the rest 0.
SEEDS = [bytes([0, a, t, v, e, c, 1, 1, s, b, 3]) + bytes(48)
         for a in range(5) for t in (0, 1) for v in (0, 1) for e in (0, 1)
         for c, s, b in ((0, 0, 0), (3, 3, 3), (0, 4, 3))]
SEEDS += [bytes([7, a, t, v, e, c, 1, 1, 2, v]) + bytes(48)
          for a in range(5) for t in (0, 1) for v in (0, 1) for e in (0, 1) for c in (0, 3)]
