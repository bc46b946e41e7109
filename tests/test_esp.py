"""ESP (RFC 4303) against independent oracles.

scapy's `SecurityAssociation` (scapy.layers.ipsec, which calls `cryptography`) decrypts
what softnic encrypts and encrypts what softnic decrypts: AES-GCM-128/256, ChaCha20-
Poly1305, AES-CBC + HMAC-SHA-256-128; tunnel and transport; IPv4 and IPv6 inner and outer;
Ethernet kept (l2len=14); ESN on and off; UDP encapsulation. scapy's stock AES-GCM uses
the 16-byte-tag AEAD API only, so for ICV 8 and 12 the test registers a scapy CryptAlgo on
`cryptography`'s GCM mode (truncated tags); framing is still scapy's. Packets with a valid
ICV but a bad trailer are built with `cryptography` directly.
"""

from __future__ import annotations

import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers import ipsec as sipsec
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from softnic import _crypto
from softnic._batch import DROP_REASONS, Batch
from softnic._esp import EspError, SecurityAssociation

sipsec.CRYPT_ALGOS["AES-GCM-T"] = sipsec.CryptAlgo(
    "AES-GCM",
    cipher=algorithms.AES,
    mode=modes.GCM,
    key_size=(16, 32),
    block_size=1,
    iv_size=8,
    salt_size=4,
    icv_size=16,
    format_mode_iv=lambda sa, iv, **kw: sa.crypt_salt + iv,
)

ENGINES = _crypto.engines()

# (name, softnic alg, scapy crypt algo, key length incl. salt, auth key length, icv)
ALGS = [
    ("gcm128", "aes-gcm", "AES-GCM", 20, 0, 16),
    ("gcm256", "aes-gcm", "AES-GCM", 36, 0, 16),
    ("gcm128-icv8", "aes-gcm", "AES-GCM-T", 20, 0, 8),
    ("gcm256-icv12", "aes-gcm", "AES-GCM-T", 36, 0, 12),
    ("chacha", "chacha20-poly1305", "CHACHA20-POLY1305", 36, 0, 16),
    ("cbc128", "aes-cbc-hmac-sha256", "AES-CBC", 16, 32, 16),
    ("cbc256", "aes-cbc-hmac-sha256", "AES-CBC", 32, 32, 16),
]
ALG_IDS = [a[0] for a in ALGS]

V4 = ("192.0.2.1", "198.51.100.7")
V6 = ("2001:db8::1", "2001:db8:ffff::7")


def inner_packet(family: int, size: int = 100, proto: str = "tcp"):
    payload = Raw(bytes(range(256)) * (size // 256) + bytes(range(size % 256)))
    l4 = TCP(sport=1234, dport=80, flags="PA") if proto == "tcp" else UDP(sport=53, dport=5353)
    if family == 4:
        return IP(src="10.1.0.1", dst="10.2.0.2", tos=0x2E, id=77, flags="DF") / l4 / payload
    return IPv6(src="fd00::1", dst="fd00::2", tc=0x2E, fl=0x12345) / l4 / payload


def as_ip(b: bytes):
    return IP(b) if b[0] >> 4 == 4 else IPv6(b)


def make_pair(alg, mode, outer, esn=False, seq=0, encap=None, engine="auto", **kw):
    """softnic SA + scapy SA on the same keys."""
    _, salg, scrypt, klen, aklen, icv = alg
    key, akey = os.urandom(klen), (os.urandom(aklen) if aklen else None)
    src, dst = (V4 if outer == 4 else V6) if outer else (None, None)
    spi = 0x1000 + int.from_bytes(os.urandom(2), "big")
    ours = SecurityAssociation(spi, mode, src, dst, salg, key, auth_key=akey, icv_len=icv,
                               esn=esn, seq=seq, encap=encap, engine=engine, **kw)
    tunnel = None
    if mode == "tunnel":
        tunnel = IP(src=src, dst=dst) if outer == 4 else IPv6(src=src, dst=dst)
    nat = UDP(sport=encap[0], dport=encap[1]) if encap else None
    theirs = sipsec.SecurityAssociation(
        sipsec.ESP, spi=spi, seq_num=(seq + 1) & 0xFFFFFFFF, crypt_algo=scrypt, crypt_key=key,
        crypt_icv_size=icv if scrypt != "AES-CBC" else None,
        auth_algo="SHA2-256-128" if aklen else None, auth_key=akey,
        tunnel_header=tunnel, nat_t_header=nat, esn_en=esn, esn=(seq + 1) >> 32)
    return ours, theirs


def eth(ethertype: int) -> Ether:
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=ethertype)


def check_ours_to_scapy(ours, theirs, inner, l2len, mode, outer, encap, esn):
    raw_in = bytes(inner)
    frame = bytes(eth(0x0800 if inner.version == 4 else 0x86DD)) + raw_in if l2len else raw_in
    out = ours.protect(frame, l2len=l2len)
    seq = ours.seq
    if l2len:
        assert out[:12] == frame[:12]
        fam = outer if mode == "tunnel" else inner.version
        assert out[12:14] == (b"\x08\x00" if fam == 4 else b"\x86\xdd")
    pkt = as_ip(out[l2len:])
    if pkt.version == 4:
        # Outer IPv4 header checksum valid (scapy recomputes it when deleted).
        ref = pkt.copy()
        del ref.chksum
        assert IP(bytes(ref)).chksum == pkt.chksum
        if mode == "tunnel":
            assert pkt.ttl == 64 and pkt.tos == inner.tos if inner.version == 4 else True
    else:
        assert pkt.plen == len(out) - l2len - 40
    if encap:
        u = pkt[UDP]
        assert (u.sport, u.dport) == encap and u.len == len(u)
        if pkt.version == 6:
            ref = u.copy()
            del ref.chksum
            assert UDP(bytes(ref)).chksum == u.chksum
            u.chksum = 0            # scapy's decrypt rebuilds around the header
    esp = pkt[sipsec.ESP]
    assert esp.spi == ours.spi and esp.seq == seq & 0xFFFFFFFF
    back = theirs.decrypt(pkt, esn_en=esn, esn=seq >> 32)
    assert bytes(back) == raw_in


def check_scapy_to_ours(ours, theirs, inner, l2len, mode, outer, encap, esn, seq):
    enc = theirs.encrypt(inner, seq_num=seq & 0xFFFFFFFF, esn_en=esn, esn=seq >> 32)
    wire = bytes(enc)
    fam = wire[0] >> 4
    if l2len:
        wire = bytes(eth(0x0800 if fam == 4 else 0x86DD)) + wire
    out = ours.unprotect(wire, l2len=l2len)
    if l2len:
        assert out[:12] == wire[:12]
        assert out[12:14] == (b"\x08\x00" if inner.version == 4 else b"\x86\xdd")
    assert out[l2len:] == bytes(inner)


MODES = [("tunnel", 4, 4), ("tunnel", 6, 6), ("tunnel", 4, 6), ("tunnel", 6, 4),
         ("transport", 4, 4), ("transport", 6, 6)]


@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS)
@pytest.mark.parametrize("mode,inner_fam,outer", MODES, ids=[f"{m}-{i}in{o}" for m, i, o in MODES])
def test_interop_both_ways(alg, mode, inner_fam, outer):
    for l2len in (0, 14):
        for size in (1, 61, 200, 1400):
            ours, theirs = make_pair(alg, mode, outer if mode == "tunnel" else None)
            inner = inner_packet(inner_fam, size, "tcp" if size % 2 else "udp")
            check_ours_to_scapy(ours, theirs, inner, l2len, mode, outer, None, False)
            rx, tx = make_pair(alg, mode, outer if mode == "tunnel" else None)
            check_scapy_to_ours(rx, tx, inner, l2len, mode, outer, None, False, 1)


@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS)
@pytest.mark.parametrize("mode", ["tunnel", "transport"])
@pytest.mark.parametrize("fam", [4, 6])
def test_interop_esn_and_udp_encap(alg, mode, fam):
    start = (7 << 32) + 0xFFFFFFFC         # crosses a low-32 wrap within the loop
    outer = fam if mode == "tunnel" else None
    for encap in (None, (4500, 4500)):
        ours, theirs = make_pair(alg, mode, outer, esn=True, seq=start, encap=encap)
        rx, tx = make_pair(alg, mode, outer, esn=True, seq=start, encap=encap)
        for i in range(1, 8):
            inner = inner_packet(fam, 30 + i)
            check_ours_to_scapy(ours, theirs, inner, 14, mode, fam, encap, True)
            if (start + i) & 0xFFFFFFFF:         # scapy reads seq_num=0 as "not given"
                check_scapy_to_ours(rx, tx, inner, 14, mode, fam, encap, True, start + i)
        assert ours.seq > 8 << 32            # the outbound counter crossed into seq_hi 8


def test_esn_off_udp_encap_v4_tunnel_v6_inner():
    alg = ALGS[0]
    ours, theirs = make_pair(alg, "tunnel", 4, encap=(4500, 4500))
    check_ours_to_scapy(ours, theirs, inner_packet(6, 300), 14, "tunnel", 4, (4500, 4500), False)
    rx, tx = make_pair(alg, "tunnel", 4, encap=(4500, 4500))
    check_scapy_to_ours(rx, tx, inner_packet(6, 300), 14, "tunnel", 4, (4500, 4500), False, 1)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("alg", [ALGS[0], ALGS[4]], ids=["gcm128", "chacha"])
def test_each_engine(engine, alg):
    ours, theirs = make_pair(alg, "tunnel", 4, engine=engine)
    assert ours.engine == engine
    check_ours_to_scapy(ours, theirs, inner_packet(4, 500), 0, "tunnel", 4, None, False)
    rx, tx = make_pair(alg, "tunnel", 4, engine=engine)
    check_scapy_to_ours(rx, tx, inner_packet(4, 500), 0, "tunnel", 4, None, False, 1)


def test_transport_ipv6_extension_headers():
    """ESP goes after hop-by-hop, destination options and routing, before the destination
    options that follow a routing header (the Linux and scapy placement)."""
    for alg in (ALGS[0], ALGS[5]):
        inner = (IPv6(src="2001:db8::1", dst="2001:db8::2")
                 / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
                 / IPv6ExtHdrRouting(addresses=["2001:db8::9"], segleft=0)
                 / IPv6ExtHdrDestOpt() / UDP(sport=1, dport=2) / Raw(b"x" * 33))
        ours, theirs = make_pair(alg, "transport", None)
        out = ours.protect(bytes(inner))
        p = IPv6(out)
        assert isinstance(p[IPv6ExtHdrRouting].payload, sipsec.ESP)
        assert bytes(theirs.decrypt(p)) == bytes(inner)
        rx, tx = make_pair(alg, "transport", None)
        assert rx.unprotect(bytes(tx.encrypt(inner))) == bytes(inner)


def test_transport_ipv4_options_and_ethernet_padding():
    inner = IP(src="10.0.0.1", dst="10.0.0.2", options=b"\x94\x04\x00\x00") / UDP() / b"hi"
    ours, theirs = make_pair(ALGS[0], "transport", None)
    frame = bytes(eth(0x0800) / inner) + b"\0" * 6   # Ethernet minimum-size padding
    out = ours.protect(frame, l2len=14)
    assert bytes(theirs.decrypt(IP(out[14:]))) == bytes(inner)
    rx, tx = make_pair(ALGS[0], "transport", None)
    wire = bytes(eth(0x0800)) + bytes(tx.encrypt(inner)) + b"\0" * 9
    assert rx.unprotect(wire, l2len=14) == bytes(eth(0x0800)) + bytes(inner)


def test_bare_esp_and_read_padding():
    """Tunnel decap with no outer header at all (esp_off == l2len) and the trailer layout:
    pad 1, 2, 3, ... aligned to 4 (AEAD) and 16 (CBC)."""
    for alg, align in ((ALGS[0], 4), (ALGS[5], 16)):
        ours, theirs = make_pair(alg, "tunnel", 4)
        inner = inner_packet(4, 13)
        out = ours.protect(bytes(inner))
        esp = out[20:]
        rx = theirs
        plain = rx.crypt_algo.decrypt(rx, sipsec.ESP(esp), rx.crypt_key,
                                      rx.crypt_icv_size or rx.crypt_algo.icv_size
                                      or rx.auth_algo.icv_size)
        assert plain.padding == bytes(range(1, plain.padlen + 1))
        assert (len(bytes(inner)) + plain.padlen + 2) % align == 0 and plain.nh == 4
        rx2, tx2 = make_pair(alg, "tunnel", 4)
        wire = bytes(tx2.encrypt(inner))[20:]
        assert rx2.unprotect(wire, esp_off=0) == bytes(inner)


def test_tampering_reasons():
    alg = ALGS[0]
    rx, tx = make_pair(alg, "tunnel", 4)
    inner = inner_packet(4, 64)
    good = bytearray(bytes(tx.encrypt(inner, seq_num=5)))
    n = len(good)

    def reason(b, **kw):
        with pytest.raises(EspError) as ei:
            rx.unprotect(bytes(b), **kw)
        return ei.value.reason

    for pos in (24, 28, 40, n - 20, n - 1):          # seq, IV, ciphertext, ICV
        bad = bytearray(good)
        bad[pos] ^= 0x40
        assert reason(bad) == "icv"
    bad = bytearray(good)
    bad[20] ^= 1                                      # SPI
    assert reason(bad) == "no_sa"
    assert reason(good[:20 + 8 + 8 + 16 + 3]) == "malformed_l3"   # IP length disagrees
    short = IP(bytes(good[:n - 6]))
    short.len = n - 6
    del short.chksum
    assert reason(bytes(short)) == "malformed_esp"   # ciphertext not 4-aligned
    tiny = IP(src="1.1.1.1", dst="2.2.2.2", proto=50) / good[20:20 + 30]
    assert reason(bytes(tiny)) == "malformed_esp"
    assert rx.unprotect(bytes(good)) == bytes(inner)
    assert reason(good) == "replay"
    st_ = rx.stats()
    assert st_["drops"]["icv"] == 5 and st_["drops"]["replay"] == 1 and st_["packets"] == 1


def _gcm_esp(key, spi, seq, plaintext, icv=16):
    iv = os.urandom(8)
    aad = struct.pack(">II", spi, seq)
    ct = AESGCM(key[:-4]).encrypt(key[-4:] + iv, plaintext, aad)
    return aad + iv + ct[: len(plaintext) + icv]


def test_bad_trailer_with_valid_icv():
    """ICV verifies but the trailer lies: dropped as bad_trailer, window unmoved."""
    key = os.urandom(20)
    rx = SecurityAssociation(0x77, "tunnel", *V4, "aes-gcm", key)
    inner = bytes(inner_packet(4, 12))              # 52 bytes: + 2 pad + 2 = 56
    cases = [
        inner + b"\x01\x03\x02\x04",                # pad bytes not 1, 2
        inner + b"\x01\x02\x02\x3b",                # next header 59 (dummy)
        inner + b"\x01\x02\x02\x06",                # tunnel but next header TCP
        inner[:2] + b"\x00\x60" + inner[4:] + b"\x01\x02\x02\x04",   # inner len > payload
        b"\x00\x00" + b"\xfe\x04",                  # pad length beyond the payload
        inner[:-2] + b"\x01\x02\x03\x04\x04\x29",   # says IPv6, is IPv4
    ]
    for i, pt in enumerate(cases):
        with pytest.raises(EspError) as ei:
            rx.unprotect(_gcm_esp(key, 0x77, 100 + i, pt), esp_off=0)
        assert ei.value.reason == "bad_trailer", i
    assert rx.replay_top == 0
    ok = _gcm_esp(key, 0x77, 3, inner + b"\x01\x02\x02\x04")
    assert rx.unprotect(ok, esp_off=0) == inner and rx.replay_top == 3
    # TFC padding (§2.4) after the inner packet is allowed and removed.
    tfc = _gcm_esp(key, 0x77, 4, inner + b"\0" * 4 + b"\x01\x02\x02\x04")
    assert rx.unprotect(tfc, esp_off=0) == inner


def test_no_room_and_malformed_input_leave_packet_and_seq():
    ours = SecurityAssociation(9, "tunnel", *V6, "aes-gcm", os.urandom(20))
    b = Batch(2, slot_size=256 + 200, headroom=256)
    b.push(bytes(inner_packet(4, 150)))            # 190 B + trailer and ICV > 200
    b.push(b"\x45" + bytes(30))                    # IPv4 with total length 0
    n_ok, drops = ours.protect_batch(b)
    assert n_ok == 0 and drops == {"no_room": 1, "malformed_l3": 1}
    assert b.drop_reason(0) == "no_room" and b.get(0) == bytes(inner_packet(4, 150))
    assert ours.seq == 0


def test_batches_round_trip():
    for alg in (ALGS[0], ALGS[4], ALGS[5]):
        key = os.urandom(alg[3])
        akey = os.urandom(32) if alg[4] else None
        tx = SecurityAssociation(5, "tunnel", *V4, alg[1], key, auth_key=akey,
                                 encap=(4500, 4500))
        rx = SecurityAssociation(5, "tunnel", *V4, alg[1], key, auth_key=akey,
                                 encap=(4500, 4500))
        b = Batch(64)
        frames = [bytes(eth(0x86DD) / inner_packet(6, 10 * i)) for i in range(64)]
        for f in frames:
            b.push(f)
        assert tx.protect_batch(b, 14) == (64, {})
        for i in range(64):
            p = Ether(b.get(i))
            assert p.type == 0x0800 and p[UDP].dport == 4500 and p[sipsec.ESP].seq == i + 1
        assert rx.unprotect_batch(b, 14, 14 + 20 + 8) == (64, {})
        assert [b.get(i) for i in range(64)] == frames
        assert rx.stats()["packets"] == 64 == tx.stats()["packets"]


def test_cbc_iv_unpredictable_and_unique():
    ours = SecurityAssociation(5, "tunnel", *V4, "aes-cbc-hmac-sha256", os.urandom(16),
                               auth_key=os.urandom(32))
    ivs = {ours.protect(bytes(inner_packet(4, 10)))[28:44] for _ in range(200)}
    assert len(ivs) == 200
    other = SecurityAssociation(5, "tunnel", *V4, "aes-cbc-hmac-sha256", os.urandom(16),
                                auth_key=os.urandom(32))
    assert other.protect(bytes(inner_packet(4, 10)))[28:44] not in ivs


def test_gcm_iv_is_the_sequence_number_under_a_per_sa_mask():
    """IV = seq XOR a random per-SA mask (Linux's seqiv): unique per packet within an SA,
    and a second SA with the same key and the same sequence numbers (a restart with a
    static key) does not repeat a single (key, IV) pair."""
    key = os.urandom(20)
    ivs = []
    for _ in range(2):
        sa = SecurityAssociation(5, "tunnel", *V4, "aes-gcm", key, esn=True, seq=(3 << 32) + 9)
        a = struct.unpack(">Q", sa.protect(bytes(inner_packet(4, 10)))[28:36])[0]
        b = struct.unpack(">Q", sa.protect(bytes(inner_packet(4, 10)))[28:36])[0]
        assert a ^ b == ((3 << 32) + 10) ^ ((3 << 32) + 11)
        ivs.append(a)
    assert ivs[0] != ivs[1]


def test_repr_and_errors_never_show_keys():
    key = bytes.fromhex("8899aabbccddeeff00112233445566778899aabb")
    sa = SecurityAssociation(0xABC, "tunnel", *V4, "rfc4106(gcm(aes))", key, icv_len=16)
    text = repr(sa) + str(sa.stats())
    assert key.hex() not in text and "8899" not in text and "0x00000abc" in text
    with pytest.raises(ValueError) as ei:
        SecurityAssociation(1, "tunnel", *V4, "aes-gcm", key[:7])
    assert key[:7].hex() not in str(ei.value)
    with pytest.raises(ValueError):
        SecurityAssociation(1, "tunnel", "10.0.0.1", "2001:db8::1", "aes-gcm", key)
    with pytest.raises(ValueError):
        SecurityAssociation(1, "tunnel", *V4, "aes-gcm", key, replay_window=16)
    with pytest.raises(TypeError):
        __import__("pickle").dumps(sa)


# ---------------------------------------------------------------- hostile input

_RX_KEY = os.urandom(20)


def _valid(seq, encap=False):
    tx = sipsec.SecurityAssociation(
        sipsec.ESP, spi=0x4242, crypt_algo="AES-GCM", crypt_key=_RX_KEY,
        tunnel_header=IP(src=V4[0], dst=V4[1]),
        nat_t_header=UDP(sport=4500, dport=4500) if encap else None)
    return bytes(tx.encrypt(inner_packet(4, seq % 50), seq_num=seq))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300), l2len=st.sampled_from([0, 14]),
       esp_off=st.integers(0, 80), mode=st.sampled_from(["tunnel", "transport"]),
       encap=st.booleans())
def test_random_bytes_are_counted_drops(data, l2len, esp_off, mode, encap):
    rx = SecurityAssociation(0x4242, mode, *V4, "aes-gcm", _RX_KEY,
                             encap=(4500, 4500) if encap else None)
    with pytest.raises(EspError) as ei:
        rx.unprotect(data, l2len=l2len, esp_off=esp_off)
    assert ei.value.reason in DROP_REASONS[1:]
    assert rx.stats()["drops"] == {ei.value.reason: 1}
    tx = SecurityAssociation(0x4242, mode, *V4, "aes-gcm", _RX_KEY)
    try:
        tx.protect(data, l2len=l2len)
    except EspError as e:
        assert tx.stats()["drops"] == {e.reason: 1}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seq=st.integers(1, 1000), cut=st.integers(0, 200), flips=st.lists(
    st.tuples(st.integers(0, 200), st.integers(1, 255)), max_size=3),
    encap=st.booleans())
def test_corrupted_or_truncated_esp_is_a_counted_drop(seq, cut, flips, encap):
    rx = SecurityAssociation(0x4242, "tunnel", *V4, "aes-gcm", _RX_KEY,
                             encap=(4500, 4500) if encap else None)
    wire = bytearray(_valid(seq, encap))
    wire = wire[: max(0, len(wire) - cut)]
    for pos, x in flips:
        if pos < len(wire):
            wire[pos] ^= x
    try:
        out = rx.unprotect(bytes(wire))
    except EspError as e:
        assert rx.stats()["drops"] == {e.reason: 1} and rx.replay_top == 0
        return
    # Only bytes outside the authenticated part may change and still pass.
    assert out == bytes(inner_packet(4, seq % 50)) and rx.replay_top == seq


def test_transport_refuses_fragments_tunnel_takes_them():
    frag4 = IP(src="10.0.0.1", dst="10.0.0.2", flags="MF") / UDP() / (b"x" * 40)
    frag6 = IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrFragment(m=1) / UDP() / (b"x" * 40)
    for frag in (frag4, frag6):
        tr, _ = make_pair(ALGS[0], "transport", None)
        with pytest.raises(EspError) as ei:
            tr.protect(bytes(frag))
        assert ei.value.reason == "malformed_l3" and tr.seq == 0
        tu, theirs = make_pair(ALGS[0], "tunnel", 6)
        assert bytes(theirs.decrypt(IPv6(tu.protect(bytes(frag))))) == bytes(frag)


def test_batch_failures_leave_packets_as_they_came():
    rx, tx = make_pair(ALGS[0], "tunnel", 4)
    inner = inner_packet(4, 80)
    good = [bytes(tx.encrypt(inner, seq_num=i)) for i in (1, 2, 3)]
    bad = bytearray(good[1])
    bad[-5] ^= 1
    b = Batch(4)
    for f in (good[0], bytes(bad), good[2], good[0]):
        b.push(f)
    n_ok, drops = rx.unprotect_batch(b, 0, 20)
    assert n_ok == 2 and drops == {"icv": 1, "replay": 1}
    assert [b.drop_reason(i) for i in range(4)] == ["ok", "icv", "ok", "replay"]
    assert b.get(1) == bytes(bad) and b.get(3) == good[0]
    assert b.get(0) == b.get(2) == bytes(inner)


@pytest.mark.parametrize("alg", [ALGS[0], ALGS[2], ALGS[5]], ids=["gcm", "gcm-icv8", "cbc"])
@pytest.mark.parametrize("mode,fam,outer", [("tunnel", 4, 4), ("tunnel", 6, 4),
                                            ("tunnel", 4, 6), ("transport", 6, 6),
                                            ("transport", 4, 4)])
@pytest.mark.parametrize("encap", [None, (4500, 4500)])
def test_overhead_and_max_ip_len_are_exact(alg, mode, fam, outer, encap):
    ours, _ = make_pair(alg, mode, outer if mode == "tunnel" else None, encap=encap)
    hdr = 20 if fam == 4 else 40
    for size in range(0, 40):
        ip = bytes(inner_packet(fam, size, "udp"))
        assert len(ours.protect(ip)) - len(ip) == ours.overhead(len(ip), hdr)
    for mtu in (1280, 1400, 1500, 1501, 1502, 1503, 9000):
        best = ours.max_ip_len(mtu, hdr)
        assert best + ours.overhead(best, hdr) <= mtu
        assert best + 1 + ours.overhead(best + 1, hdr) > mtu
        ip = bytes(inner_packet(fam, best - hdr - 8, "udp"))
        assert len(ours.protect(ip)) <= mtu


_EXT = {0: IPv6ExtHdrHopByHop, 43: IPv6ExtHdrRouting, 60: IPv6ExtHdrDestOpt,
        44: IPv6ExtHdrFragment}


@st.composite
def ip_packets(draw):
    """Well-formed but unusual IP packets: IPv4 options, IPv6 chains of extension
    headers in any order, Ethernet-style trailing bytes."""
    # 20 more bytes so scapy can re-dissect the payload after its decrypt.
    payload = draw(st.binary(max_size=120))
    pkt: Packet
    if draw(st.booleans()):
        opts = b"\x01" * draw(st.integers(0, 40)) if draw(st.booleans()) else b""
        pkt = IP(src="10.0.0.1", dst="10.0.0.2", proto=draw(st.sampled_from([6, 17, 253])),
                 ttl=draw(st.integers(1, 255)), options=opts) / Raw(payload + bytes(20))
    else:
        # The last next header is one scapy can re-dissect after decrypting (its IPv6
        # transport decrypt re-guesses the layer from it).
        last = draw(st.sampled_from([6, 17, 253]))
        pkt = IPv6(src="fd00::1", dst="fd00::2", nh=last)
        chain = draw(st.lists(st.sampled_from([0, 43, 60, 60, 44]), max_size=4))
        for h in chain:
            ext = _EXT[h](addresses=["fd00::9"], segleft=0) if h == 43 else _EXT[h]()
            pkt = pkt / ext
            pkt.lastlayer().nh = last
        pkt = pkt / Raw(payload + bytes(20))
    return bytes(pkt), draw(st.binary(max_size=8))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pkt=ip_packets(), mode=st.sampled_from(["tunnel", "transport"]),
       alg=st.sampled_from([ALGS[0], ALGS[5]]), outer=st.sampled_from([4, 6]),
       l2=st.booleans())
def test_encap_any_ip_packet_roundtrips_through_scapy(pkt, mode, alg, outer, l2):
    ip, trailer = pkt
    ours, theirs = make_pair(alg, mode, outer if mode == "tunnel" else None)
    l2len = 14 if l2 else 0
    frame = (bytes(eth(0x0800)) if l2 else b"") + ip + trailer
    try:
        out = ours.protect(frame, l2len=l2len)
    except EspError as e:
        # Only transport mode refuses: fragments, and IPv6 chains it cannot pass.
        assert mode == "transport" and e.reason == "malformed_l3"
        assert ours.stats()["drops"] == {"malformed_l3": 1}
        return
    back = theirs.decrypt(as_ip(out[l2len:]))
    assert bytes(back) == ip
