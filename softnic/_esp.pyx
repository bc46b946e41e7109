# cython: language_level=3
"""ESP, RFC 4303: encapsulation (§3.1, §3.3) and decapsulation (§3.4) in tunnel and
transport mode, with extended sequence numbers (RFC 4304; inference per RFC 4303
Appendix A), anti-replay (§3.4.3) as an RFC 6479 ring of 64-bit words, UDP encapsulation
(RFC 3948 §2.1), padding (§2.4) and SA lifetimes (RFC 4301 §4.4.2.1).

The cipher itself lives behind softnic._crypto (sn_crypto.h): AES-GCM (RFC 4106),
ChaCha20-Poly1305 (RFC 7634), AES-CBC + HMAC-SHA-256-128 (RFC 3602, RFC 4868).

IVs. AEAD: the explicit IV is the 64-bit sequence number XOR a random 64-bit mask drawn
when the SA is made (as Linux's seqiv): unique per key within the SA as RFC 4106 §3.1 and
RFC 7634 §2 require, and not repeated when a daemon restart brings back a static key with
its sequence numbers starting again at 1. CBC needs an IV the sender's peers cannot
predict (RFC 3602 §3): it is E_K'(seq) -- one block of AES-GCM keystream, under a random
per-SA key K' that never leaves the SA, for nonce = seq. That is the "encrypt a nonce
under a secret key" construction of NIST SP 800-38A Appendix C, with a key independent
of the data key.

Inbound order (RFC 4303 §3.4, and DPDK's check-then-update): framing checks -> ESN
inference -> replay check -> ICV verify + decrypt -> trailer check -> replay update ->
lifetimes. So a forged packet never moves the window.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memmove, memset

from softnic._batch cimport Batch
from softnic._crypto cimport (
    SN_ALG_AES_CBC_HMAC_SHA256,
    SN_ALG_AES_GCM,
    SN_ALG_CHACHA20_POLY1305,
    SN_ENGINE_AUTO,
    SN_ENGINE_IPSECMB,
    SN_ENGINE_OPENSSL,
    xform_block,
    xform_engine,
    xform_free,
    xform_icv_len,
    xform_iv_len,
    xform_new,
    xform_open,
    xform_seal,
)
from softnic._csum cimport (
    sn_csum,
    sn_csum_add16,
    sn_csum_finish,
    sn_csum_partial,
    sn_csum_pseudo6,
)
from softnic._pkt cimport (
    SN_DROP_BAD_TRAILER,
    SN_DROP_CRYPTO,
    SN_DROP_ICV,
    SN_DROP_MALFORMED_ESP,
    SN_DROP_MALFORMED_L2,
    SN_DROP_MALFORMED_L3,
    SN_DROP_MAX,
    SN_DROP_NO_ROOM,
    SN_DROP_NO_SA,
    SN_DROP_REPLAY,
    SN_DROP_SA_EXPIRED,
    SN_DROP_SEQ_EXHAUSTED,
    SN_DROP_TOO_BIG,
    SN_HEADROOM,
    SN_OK,
    SN_PKT_ESP,
    SN_TAILROOM,
    sn_pkt,
)
from softnic._proto cimport sn_ld16, sn_ld32, sn_st16, sn_st32

import ipaddress
import os

from softnic._batch import DROP_REASONS

__all__ = ["EVENTS", "EspError", "SecurityAssociation"]

cdef enum:
    IPPROTO_HOPOPTS = 0
    IPPROTO_IPIP = 4
    IPPROTO_UDP = 17
    IPPROTO_IPV6 = 41
    IPPROTO_ROUTING = 43
    IPPROTO_ESP = 50
    IPPROTO_FRAGMENT = 44
    IPPROTO_NONE = 59
    IPPROTO_DSTOPTS = 60
    MAX_EXT_HDRS = 8          # more IPv6 extension headers than this is hostile

cdef uint64_t SEQ_MAX_32 = 0xFFFFFFFFu
cdef uint64_t SEQ_MAX_ESN = 0xFFFFFFFFFFFFFFFFu

cdef extern from *:
    """
    /* Events are raised by the workers that use the SA and taken by the control plane:
       both sides atomic, so a bit raised while the other side takes them is never lost. */
    static inline void sn_ev_raise(uint32_t *ev, uint32_t bit) {
        __atomic_fetch_or(ev, bit, __ATOMIC_RELEASE); }
    static inline uint32_t sn_ev_take(uint32_t *ev) {
        return __atomic_exchange_n(ev, 0, __ATOMIC_ACQ_REL); }
    """
    void _ev_raise "sn_ev_raise"(uint32_t *ev, uint32_t bit) noexcept nogil
    uint32_t _ev_take "sn_ev_take"(uint32_t *ev) noexcept nogil


cdef extern from *:
    """
    /* Outbound SA state shared by TX workers (see _esp.pxd). Relaxed order throughout:
       each counter is only ever read-modify-written atomically, and nothing else is
       published through it (uniqueness of a sequence number needs atomicity, not
       ordering). */
    static inline uint64_t sn_a_add64(uint64_t *p, uint64_t v) {
        return __atomic_add_fetch(p, v, __ATOMIC_RELAXED); }
    static inline uint8_t sn_a_xchg8(uint8_t *p, uint8_t v) {
        return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
    static inline uint8_t sn_a_load8(const uint8_t *p) {
        return __atomic_load_n(p, __ATOMIC_RELAXED); }
    /* Reserve up to n sequence numbers below or at max: a compare-and-swap loop, not a
       fetch-add, so the counter never passes max (with ESN, max is 2^64-1 and a fetch-add
       past it would wrap to numbers already sent). Returns how many were reserved
       (0 when the space is used up) and the first in *first. */
    static inline uint64_t sn_a_seq_reserve(uint64_t *seq, uint64_t n, uint64_t max,
                                            uint64_t *first) {
        uint64_t old = __atomic_load_n(seq, __ATOMIC_RELAXED), k;
        do {
            if (old >= max)
                return 0;
            k = max - old < n ? max - old : n;
        } while (!__atomic_compare_exchange_n(seq, &old, old + k, 1, __ATOMIC_RELAXED,
                                              __ATOMIC_RELAXED));
        *first = old + 1;
        return k;
    }
    """
    uint64_t _a_add64 "sn_a_add64"(uint64_t *p, uint64_t v) noexcept nogil
    uint8_t _a_xchg8 "sn_a_xchg8"(uint8_t *p, uint8_t v) noexcept nogil
    uint8_t _a_load8 "sn_a_load8"(const uint8_t *p) noexcept nogil
    uint64_t _a_seq_reserve "sn_a_seq_reserve"(uint64_t *seq, uint64_t n, uint64_t max,
                                               uint64_t *first) noexcept nogil


EVENTS = ("soft_expired", "hard_expired", "seq_near_end", "seq_exhausted")


# ---------------------------------------------------------------------------------------
# Checksums (RFC 1071) over softnic._csum; network-order access is softnic._proto's.

cdef inline void _ipv4_csum(uint8_t *h, uint32_t ihl) noexcept nogil:
    h[10] = 0
    h[11] = 0
    sn_st16(h + 10, sn_csum(h, ihl))


cdef inline void _udp6_csum(uint8_t *udp, uint32_t ulen, const uint8_t *src,
                            const uint8_t *dst) noexcept nogil:
    # RFC 8200 §8.1: UDP over IPv6 needs a real checksum (zero is not allowed).
    cdef uint16_t c
    udp[6] = 0
    udp[7] = 0
    c = sn_csum_finish(sn_csum_partial(udp, ulen, sn_csum_pseudo6(src, dst, IPPROTO_UDP, ulen)))
    sn_st16(udp + 6, c if c else 0xFFFF)


cdef int _v6_ext_walk(const uint8_t *ip, uint32_t iplen, uint32_t stop,
                      uint32_t *hdr_len, uint32_t *nh_off) noexcept nogil:
    """Find where ESP goes (or sits) in an IPv6 packet of iplen bytes.

    Walks hop-by-hop (first only), routing and destination-options headers, stopping at
    a destination-options header that follows a routing header (it belongs to the final
    destination and goes inside ESP, as Linux xfrm does), or at offset `stop` when it is
    nonzero. Writes the header length and the offset of the next-header byte that names
    what follows. Returns SN_OK or SN_DROP_MALFORMED_L3 (truncated, too many headers).
    """
    cdef uint32_t off = 40, nh_at = 6, elen, n = 0
    cdef uint8_t nh = ip[6]
    cdef bint seen_rt = False
    while stop == 0 or off < stop:
        if not ((nh == IPPROTO_HOPOPTS and off == 40) or nh == IPPROTO_ROUTING
                or (nh == IPPROTO_DSTOPTS and not seen_rt)):
            break
        n += 1
        if n > MAX_EXT_HDRS or off + 8 > iplen:
            return SN_DROP_MALFORMED_L3
        elen = (<uint32_t>ip[off + 1] + 1) * 8
        if off + elen > iplen:
            return SN_DROP_MALFORMED_L3
        if nh == IPPROTO_ROUTING:
            seen_rt = True
        nh_at = off
        nh = ip[off]
        off += elen
    if stop != 0 and off != stop:
        return SN_DROP_MALFORMED_L3
    hdr_len[0] = off
    nh_off[0] = nh_at
    return SN_OK


cdef void sn_esp_account_out(sn_sa *sa, uint64_t npkts, uint64_t nbytes) noexcept nogil:
    """Count npkts packets of nbytes plaintext bytes in all against the outbound SA's
    lifetimes and counters: one atomic add each (any number of TX workers). Lifetimes as
    Linux xfrm counts them: a packet that reaches a hard limit still goes; the event is
    raised at once (by exactly one worker) and the packets after it are refused."""
    cdef uint64_t pk = _a_add64(&sa.packets, npkts)
    cdef uint64_t by = _a_add64(&sa.bytes, nbytes)
    if ((sa.soft_packets and pk >= sa.soft_packets)
            or (sa.soft_bytes and by >= sa.soft_bytes)):
        if not _a_load8(&sa.soft_done) and not _a_xchg8(&sa.soft_done, 1):
            _ev_raise(&sa.events, SN_SA_EV_SOFT_EXPIRED)
    if ((sa.hard_packets and pk >= sa.hard_packets)
            or (sa.hard_bytes and by >= sa.hard_bytes)):
        if not _a_load8(&sa.dead) and not _a_xchg8(&sa.dead, 1):
            _ev_raise(&sa.events, SN_SA_EV_HARD_EXPIRED)


cdef uint32_t sn_esp_seq_reserve(sn_sa *sa, uint32_t n, uint64_t *first) noexcept nogil:
    """Take up to n consecutive outbound sequence numbers (RFC 4303 §3.3.3: never 0 again,
    never past 2^32-1, or 2^64-1 with ESN), atomically: any number of TX workers may
    share the SA. Returns how many were taken, the first in *first; fewer than n (0 at
    the end) means the space is used up: SEQ_EXHAUSTED is raised. SEQ_NEAR_END is raised
    once, by the worker whose range crosses 3/4 of the space."""
    cdef uint64_t k = _a_seq_reserve(&sa.seq, n, SEQ_MAX_ESN if sa.esn else SEQ_MAX_32,
                                     first)
    if k < n:
        _ev_raise(&sa.events, SN_SA_EV_SEQ_EXHAUSTED)
    if k and first[0] + k - 1 >= sa.seq_near and not _a_load8(&sa.near_done) \
            and not _a_xchg8(&sa.near_done, 1):
        _ev_raise(&sa.events, SN_SA_EV_SEQ_NEAR_END)
    return <uint32_t>k


cdef inline void _account(sn_sa *sa, uint32_t nbytes) noexcept nogil:
    # Inbound: one RX worker per SA (see _esp.pxd), plain updates. Same rules as
    # sn_esp_account_out.
    sa.packets += 1
    sa.bytes += nbytes
    if not sa.soft_done and (
            (sa.soft_packets and sa.packets >= sa.soft_packets)
            or (sa.soft_bytes and sa.bytes >= sa.soft_bytes)):
        sa.soft_done = 1
        _ev_raise(&sa.events, SN_SA_EV_SOFT_EXPIRED)
    if ((sa.hard_packets and sa.packets >= sa.hard_packets)
            or (sa.hard_bytes and sa.bytes >= sa.hard_bytes)):
        sa.dead = 1
        _ev_raise(&sa.events, SN_SA_EV_HARD_EXPIRED)


# ---------------------------------------------------------------------------------------
# Anti-replay and ESN.

cdef uint64_t sn_esp_infer_seq(const sn_sa *sa, uint32_t seq_lo) noexcept nogil:
    """The full sequence number of an inbound packet (RFC 4303 Appendix A.2.1).

    Without ESN the low 32 bits are the number. With ESN, seq_hi is guessed from the
    window position: the packet is either in the window's subspace or just past a wrap.
    Returns 0 (never a valid number) when the guess falls below zero. Pure; no state.
    """
    cdef uint64_t t = sa.replay_top
    cdef uint32_t tl = <uint32_t>t, th = <uint32_t>(t >> 32), w = sa.window
    cdef uint32_t bottom = tl - w + 1     # mod 2^32 on purpose (case B)
    cdef uint32_t hi
    if not sa.esn:
        return seq_lo
    if tl >= w - 1:                       # case A: window within one subspace
        hi = th if seq_lo >= bottom else th + 1
    else:                                 # case B: window spans two subspaces
        if seq_lo >= bottom:
            if th == 0:
                return 0
            hi = th - 1
        else:
            hi = th
    return (<uint64_t>hi << 32) | seq_lo


cdef int sn_replay_check(const sn_sa *sa, uint64_t seq) noexcept nogil:
    """SN_OK if `seq` is new and inside (or right of) the window, else SN_DROP_REPLAY.

    Reads the window only: call sn_replay_update after the ICV has verified.
    """
    cdef uint64_t top = sa.replay_top
    if seq == 0:
        return SN_DROP_REPLAY
    if seq > top:
        return SN_OK
    if top - seq >= sa.window:
        return SN_DROP_REPLAY
    if sa.bitmap[(seq >> 6) & sa.win_mask] & (<uint64_t>1 << (seq & 63)):
        return SN_DROP_REPLAY
    return SN_OK


cdef void sn_replay_update(sn_sa *sa, uint64_t seq) noexcept nogil:
    """Mark `seq` received; slide the window right when it is the new top.

    RFC 6479: the ring has one spare word beyond the window, so sliding only clears
    whole words and never shifts bits. At most win_mask + 1 words are cleared.
    """
    cdef uint64_t top_blk, blk, i, n
    if seq > sa.replay_top:
        top_blk = sa.replay_top >> 6
        blk = seq >> 6
        n = blk - top_blk
        if n > <uint64_t>sa.win_mask + 1:
            n = <uint64_t>sa.win_mask + 1
        i = 1
        while i <= n:
            sa.bitmap[(top_blk + i) & sa.win_mask] = 0
            i += 1
        sa.replay_top = seq
    sa.bitmap[(seq >> 6) & sa.win_mask] |= <uint64_t>1 << (seq & 63)


# ---------------------------------------------------------------------------------------
# Encapsulation.

cdef uint32_t sn_esp_read_spi(const sn_pkt *p, uint32_t esp_off) noexcept nogil:
    """The SPI (host order) of the ESP header at esp_off, or 0 if the packet is short."""
    if esp_off > p.len or p.len - esp_off < SN_ESP_HDR_LEN:
        return 0
    return sn_ld32(p.data + p.off + esp_off)


cdef uint32_t sn_esp_overhead(const sn_sa *sa, uint32_t ip_len, uint32_t hdr_len) noexcept nogil:
    """Bytes sn_esp_encap adds to an IP packet of ip_len bytes (padding included)."""
    cdef uint32_t outer = 0, pl = ip_len, udp = 8 if sa.encap else 0
    if sa.mode == SN_ESP_TUNNEL:
        outer = 20 if sa.family == 4 else 40
    else:
        pl = ip_len - hdr_len if ip_len > hdr_len else 0
    return (outer + udp + SN_ESP_HDR_LEN + sa.iv_len + (sa.block - (pl + 2) % sa.block)
            % sa.block + 2 + sa.icv_len)


cdef uint32_t sn_esp_max_ip_len(const sn_sa *sa, uint32_t mtu, uint32_t hdr_len) noexcept nogil:
    """The largest IP packet whose ESP result fits `mtu` bytes of IP; 0 if none does."""
    cdef uint32_t fixed = (SN_ESP_HDR_LEN + sa.iv_len + sa.icv_len
                           + (8 if sa.encap else 0))
    cdef uint32_t room
    if sa.mode == SN_ESP_TUNNEL:
        fixed += 20 if sa.family == 4 else 40
        hdr_len = 0
    else:
        fixed += hdr_len
    if mtu < fixed + sa.block:
        return 0
    room = (mtu - fixed) & ~(sa.block - 1)     # ciphertext: payload + pad + 2 (block: 2^n)
    return hdr_len + room - 2


cdef int _encap(sn_sa *sa, sn_pkt *p, uint32_t l2len, uint32_t *deferred) noexcept nogil:
    cdef uint8_t *base = p.data + p.off
    cdef uint8_t *ip
    cdef uint8_t *h
    cdef uint8_t *cur
    cdef uint8_t *esp
    cdef uint8_t *pay
    cdef uint8_t *t
    cdef uint8_t nonce[8]
    cdef uint8_t ivbuf[16]
    cdef uint8_t scratch[16]
    cdef uint32_t avail, ver, tot, ihl = 0, hdr_len = 0, nh_off = 0, pl, pad, ct_len
    cdef uint32_t udp, outer_len, ins, tail, esp_total, new_off, i, tos, df = 0
    cdef uint8_t nxt
    cdef uint64_t seq, acc
    cdef int rc

    if _a_load8(&sa.dead):
        return SN_DROP_SA_EXPIRED
    if p.len < l2len or p.off > p.cap or p.len > p.cap - p.off:
        return SN_DROP_MALFORMED_L2
    ip = base + l2len
    avail = p.len - l2len
    if avail < 20:
        return SN_DROP_MALFORMED_L3
    ver = ip[0] >> 4
    if ver == 4:
        ihl = (ip[0] & 0xF) * 4
        tot = sn_ld16(ip + 2)
        if ihl < 20 or tot < ihl or tot > avail:
            return SN_DROP_MALFORMED_L3
        hdr_len = ihl
        nh_off = 9
        tos = ip[1]
        df = sn_ld16(ip + 6) & 0x4000
    elif ver == 6:
        if avail < 40:
            return SN_DROP_MALFORMED_L3
        tot = 40 + sn_ld16(ip + 4)
        if tot > avail:
            return SN_DROP_MALFORMED_L3
        tos = ((ip[0] & 0xF) << 4) | (ip[1] >> 4)
        if sa.mode == SN_ESP_TRANSPORT:
            rc = _v6_ext_walk(ip, tot, 0, &hdr_len, &nh_off)
            if rc != SN_OK:
                return rc
    else:
        return SN_DROP_MALFORMED_L3

    # Transport mode protects whole datagrams only (§3.1.1): no IPv4 fragment, and no
    # IPv6 fragment header where ESP would go.
    if sa.mode == SN_ESP_TRANSPORT and (
            (ver == 4 and sn_ld16(ip + 6) & 0x3FFF)
            or (ver == 6 and ip[nh_off] == IPPROTO_FRAGMENT)):
        return SN_DROP_MALFORMED_L3
    if sa.mode == SN_ESP_TUNNEL:
        pl = tot
        nxt = IPPROTO_IPIP if ver == 4 else IPPROTO_IPV6
        outer_len = 20 if sa.family == 4 else 40
    else:
        pl = tot - hdr_len
        nxt = ip[nh_off]
        outer_len = hdr_len
    pad = (0 - (pl + 2)) & (sa.block - 1)   # block is a power of two: no division here
    ct_len = pl + pad + 2
    udp = 8 if sa.encap else 0
    # Bytes inserted in front of the payload, and appended behind it.
    ins = (outer_len if sa.mode == SN_ESP_TUNNEL else 0) + udp + SN_ESP_HDR_LEN + sa.iv_len
    tail = pad + 2 + sa.icv_len
    esp_total = SN_ESP_HDR_LEN + sa.iv_len + ct_len + sa.icv_len
    if outer_len + udp + esp_total > 65535:
        return SN_DROP_TOO_BIG
    if p.off < ins or <uint64_t>p.off + l2len + tot + tail > p.cap:
        return SN_DROP_NO_ROOM
    # Never send seq 0 again (RFC 4303 §3.3.3): stop at 2^32-1, or 2^64-1 with ESN.
    if sn_esp_seq_reserve(sa, 1, &seq) == 0:
        return SN_DROP_SEQ_EXHAUSTED

    # --- committed: from here on the packet and the SA change ---
    new_off = p.off - ins
    if sa.mode == SN_ESP_TUNNEL:
        memmove(p.data + new_off, base, l2len)
    else:
        memmove(p.data + new_off, base, l2len + hdr_len)
    h = p.data + new_off + l2len
    cur = h + outer_len
    esp = cur + udp
    pay = esp + SN_ESP_HDR_LEN + sa.iv_len       # == base + l2len (+ hdr_len): unmoved
    sn_st32(esp, sa.spi)
    sn_st32(esp + 4, <uint32_t>seq)
    sn_st32(nonce, <uint32_t>(seq >> 32))
    sn_st32(nonce + 4, <uint32_t>seq)
    if sa.ivgen != NULL:
        # CBC: IV = one block of keystream under the SA's secret IV key, nonce = seq.
        memset(ivbuf, 0, 16)
        if xform_seal(sa.ivgen, esp, 0, 0, nonce, ivbuf, 16, scratch) != 0:
            return SN_DROP_CRYPTO
    else:
        sn_st32(ivbuf, <uint32_t>((seq ^ sa.iv_mask) >> 32))
        sn_st32(ivbuf + 4, <uint32_t>(seq ^ sa.iv_mask))
    memcpy(esp + SN_ESP_HDR_LEN, ivbuf, sa.iv_len)
    # Trailer (§2.4): monotonic pad 1, 2, 3, ..., pad length, next header.
    t = pay + pl
    for i in range(pad):
        t[i] = <uint8_t>(i + 1)
    t[pad] = <uint8_t>pad
    t[pad + 1] = nxt
    if xform_seal(sa.xform, esp, <uint32_t>(seq >> 32), sa.esn, esp + SN_ESP_HDR_LEN,
                  pay, ct_len, pay + ct_len) != 0:
        return SN_DROP_CRYPTO

    if sa.mode == SN_ESP_TUNNEL:
        if sa.family == 4:
            h[0] = 0x45
            h[1] = <uint8_t>tos           # DSCP and ECN copied (RFC 4301 §5.1.2, RFC 6040)
            sn_st16(h + 2, 20 + udp + esp_total)
            sn_st16(h + 4, <uint32_t>seq & 0xFFFF)
            sn_st16(h + 6, df)
            h[8] = 64
            h[9] = IPPROTO_UDP if udp else IPPROTO_ESP
            memcpy(h + 12, sa.src, 4)
            memcpy(h + 16, sa.dst, 4)
            # From the values, not by reading back the header just written (a load of
            # fresh narrow stores stalls store forwarding).
            acc = sn_csum_partial(sa.src, 4, 0)
            acc = sn_csum_partial(sa.dst, 4, acc)
            acc = sn_csum_add16(acc, 0x4500 | (tos & 0xFF))
            acc = sn_csum_add16(acc, <uint16_t>(20 + udp + esp_total))
            acc = sn_csum_add16(acc, <uint16_t>(seq & 0xFFFF))
            acc = sn_csum_add16(acc, <uint16_t>df)
            acc = sn_csum_add16(acc, (64 << 8) | (IPPROTO_UDP if udp else IPPROTO_ESP))
            sn_st16(h + 10, sn_csum_finish(acc))
        else:
            h[0] = <uint8_t>(0x60 | (tos >> 4))
            # The flow label carries the inner flow hash when known (RFC 6438).
            h[1] = <uint8_t>(((tos & 0xF) << 4) | ((p.hash >> 16) & 0xF))
            sn_st16(h + 2, p.hash & 0xFFFF)
            sn_st16(h + 4, udp + esp_total)
            h[6] = IPPROTO_UDP if udp else IPPROTO_ESP
            h[7] = 64
            memcpy(h + 8, sa.src, 16)
            memcpy(h + 24, sa.dst, 16)
        if l2len >= 14:
            sn_st16(h - 2, 0x0800 if sa.family == 4 else 0x86DD)
    else:
        h[nh_off] = IPPROTO_UDP if udp else IPPROTO_ESP
        if ver == 4:
            sn_st16(h + 2, hdr_len + udp + esp_total)
            _ipv4_csum(h, ihl)
        else:
            sn_st16(h + 4, hdr_len - 40 + udp + esp_total)
    if udp:
        sn_st16(cur, sa.sport)
        sn_st16(cur + 2, sa.dport)
        sn_st16(cur + 4, udp + esp_total)
        cur[6] = 0                      # RFC 3948 §2.1: zero over IPv4
        cur[7] = 0
        if (sa.family if sa.mode == SN_ESP_TUNNEL else ver) == 6:
            _udp6_csum(cur, udp + esp_total, h + 8, h + 24)
    p.off = new_off
    p.len = l2len + outer_len + udp + esp_total
    p.flags |= SN_PKT_ESP
    if deferred != NULL and not (sa.soft_bytes or sa.hard_bytes or sa.soft_packets
                                 or sa.hard_packets):
        deferred[0] = pl            # the caller accounts for it (sn_esp_encap_deferred)
    else:
        sn_esp_account_out(sa, 1, pl)
    return SN_OK


cdef int sn_esp_encap(sn_sa *sa, sn_pkt *p, uint32_t l2len) noexcept nogil:
    """Protect one packet with the outbound SA `sa`, in place.

    p holds [l2len bytes kept as they are][IP packet]; bytes after the IP packet's own
    length (Ethernet padding) are discarded. Tunnel: [l2][outer IP][UDP][ESP][IV][inner
    IP][trailer][ICV]; transport: ESP goes after the IPv4 header or the IPv6 hop-by-hop/
    routing/destination-options headers. Moves p.off down into the headroom and grows
    p.len into the tailroom. The slot stays the caller's.

    Returns SN_OK or a drop reason, also counted in sa.drops: MALFORMED_L2/L3 (bad IP),
    TOO_BIG (over 64 KB), NO_ROOM, SEQ_EXHAUSTED (and the event), SA_EXPIRED (after a hard
    lifetime), CRYPTO (engine failure; the packet may then be partly rewritten). On every
    other failure p is untouched and no sequence number is consumed.
    """
    cdef int rc = _encap(sa, p, l2len, NULL)
    if rc != SN_OK:
        _a_add64(&sa.drops[rc], 1)
    return rc


cdef int sn_esp_encap_deferred(sn_sa *sa, sn_pkt *p, uint32_t l2len,
                               uint32_t *deferred) noexcept nogil:
    """sn_esp_encap for a caller that accounts for packets in bulk: on SN_OK for an SA
    without lifetime limits, *deferred is the packet's plaintext bytes, not yet counted
    (the caller owes sn_esp_account_out(sa, 1, *deferred), or one call for several);
    otherwise *deferred is 0 and the packet is counted here, as limits are checked per
    packet."""
    cdef int rc
    deferred[0] = 0
    rc = _encap(sa, p, l2len, deferred)
    if rc != SN_OK:
        _a_add64(&sa.drops[rc], 1)
    return rc


# ---------------------------------------------------------------------------------------
# Decapsulation.

cdef int _decap(sn_sa *sa, sn_pkt *p, uint32_t l2len, uint32_t esp_off,
                uint8_t *next_header) noexcept nogil:
    cdef uint8_t *base = p.data + p.off
    cdef uint8_t *ip = base + l2len
    cdef uint8_t *esp
    cdef uint8_t *ct
    cdef uint8_t *h
    cdef uint32_t end, udp = 0, ip_end, hl = 0, nh_off = 0, ihl, tot, esp_len, ct_len
    cdef uint32_t padlen, pl, i, inner_len = 0, new_off
    cdef uint8_t nh, ver = 0
    cdef uint64_t seq
    cdef int rc

    if p.off > p.cap or p.len > p.cap - p.off:
        return SN_DROP_MALFORMED_L2
    if esp_off < l2len or esp_off > p.len:
        return SN_DROP_MALFORMED_ESP
    if sa.dead:
        return SN_DROP_SA_EXPIRED
    # What sits between l2 and ESP: nothing, or an IP header, then UDP when encapsulated.
    if sa.encap and esp_off - l2len >= 8:
        udp = 8
    ip_end = esp_off - udp
    end = p.len
    if ip_end > l2len:
        hl = ip_end - l2len
        ver = ip[0] >> 4
        if ver == 4:
            ihl = (ip[0] & 0xF) * 4
            tot = sn_ld16(ip + 2)
            if hl < 20 or ihl < 20 or ihl > hl or tot < hl + udp or tot > p.len - l2len:
                return SN_DROP_MALFORMED_L3
            if sn_ld16(ip + 6) & 0x3FFF:      # a fragment: ESP is processed reassembled
                return SN_DROP_MALFORMED_L3
            if sa.mode == SN_ESP_TRANSPORT and ihl != hl:
                return SN_DROP_MALFORMED_L3
            nh_off = 9
            end = l2len + tot
        elif ver == 6:
            if hl < 40:
                return SN_DROP_MALFORMED_L3
            tot = 40 + sn_ld16(ip + 4)
            if tot < hl + udp or tot > p.len - l2len:
                return SN_DROP_MALFORMED_L3
            if sa.mode == SN_ESP_TRANSPORT:
                rc = _v6_ext_walk(ip, tot, hl, &ihl, &nh_off)
                if rc != SN_OK:
                    return rc
            end = l2len + tot
        else:
            return SN_DROP_MALFORMED_L3
    # ESP framing (§2): header, IV, ciphertext aligned to the cipher block, ICV.
    esp_len = end - esp_off
    if esp_len < SN_ESP_HDR_LEN + sa.iv_len + sa.icv_len + sa.block:
        return SN_DROP_MALFORMED_ESP
    ct_len = esp_len - SN_ESP_HDR_LEN - sa.iv_len - sa.icv_len
    if ct_len & (sa.block - 1):
        return SN_DROP_MALFORMED_ESP
    esp = base + esp_off
    if sn_ld32(esp) != sa.spi:
        return SN_DROP_NO_SA
    seq = sn_esp_infer_seq(sa, sn_ld32(esp + 4))
    if sn_replay_check(sa, seq) != SN_OK:
        return SN_DROP_REPLAY
    ct = esp + SN_ESP_HDR_LEN + sa.iv_len
    rc = xform_open(sa.xform, esp, <uint32_t>(seq >> 32), sa.esn, esp + SN_ESP_HDR_LEN,
                    ct, ct_len, ct + ct_len)
    if rc == -1:
        return SN_DROP_ICV
    if rc != 0:
        return SN_DROP_CRYPTO
    # Trailer (§2.4, §2.6), authenticated from here on but still the peer's word.
    padlen = ct[ct_len - 2]
    nh = ct[ct_len - 1]
    if padlen + 2 > ct_len:
        return SN_DROP_BAD_TRAILER
    pl = ct_len - 2 - padlen
    for i in range(padlen):
        if ct[pl + i] != <uint8_t>(i + 1):
            return SN_DROP_BAD_TRAILER
    if nh == IPPROTO_NONE or nh == IPPROTO_HOPOPTS or nh == 255:
        return SN_DROP_BAD_TRAILER      # dummy packet (§2.6) or impossible header
    if sa.mode == SN_ESP_TUNNEL:
        # The inner packet must be what the trailer says; TFC padding (§2.4) may follow it.
        if nh == IPPROTO_IPIP:
            if pl < 20 or ct[0] >> 4 != 4 or (ct[0] & 0xF) < 5:
                return SN_DROP_BAD_TRAILER
            inner_len = sn_ld16(ct + 2)
            if inner_len < (ct[0] & 0xFu) * 4 or inner_len > pl:
                return SN_DROP_BAD_TRAILER
        elif nh == IPPROTO_IPV6:
            if pl < 40 or ct[0] >> 4 != 6:
                return SN_DROP_BAD_TRAILER
            inner_len = 40 + sn_ld16(ct + 4)
            if inner_len > pl:
                return SN_DROP_BAD_TRAILER
        else:
            return SN_DROP_BAD_TRAILER
    else:
        inner_len = pl
    # Authentic and well formed: only now does the window move (§3.4.3).
    sn_replay_update(sa, seq)

    if sa.mode == SN_ESP_TUNNEL or hl == 0:
        new_off = p.off + <uint32_t>(ct - base) - l2len
        memmove(p.data + new_off, base, l2len)
        if sa.mode == SN_ESP_TUNNEL and l2len >= 14:
            sn_st16(p.data + new_off + l2len - 2, 0x0800 if nh == IPPROTO_IPIP else 0x86DD)
        p.len = l2len + inner_len
    else:
        new_off = p.off + <uint32_t>(ct - base) - l2len - hl
        memmove(p.data + new_off, base, l2len + hl)
        h = p.data + new_off + l2len
        h[nh_off] = nh
        if ver == 4:
            sn_st16(h + 2, hl + pl)
            _ipv4_csum(h, hl)
        else:
            sn_st16(h + 4, hl - 40 + pl)
        p.len = l2len + hl + pl
    p.off = new_off
    p.flags |= SN_PKT_ESP
    if next_header != NULL:
        next_header[0] = nh
    _account(sa, inner_len)
    return SN_OK


cdef int sn_esp_decap(sn_sa *sa, sn_pkt *p, uint32_t l2len, uint32_t esp_off,
                      uint8_t *next_header) noexcept nogil:
    """Verify and strip ESP with the inbound SA `sa`, in place.

    p holds [l2len kept][outer IP header, or nothing when esp_off == l2len][UDP when the
    SA is UDP-encapsulated][ESP at esp_off]. The ESP end comes from the outer IP length
    when there is one (Ethernet padding is ignored), else from p.len. Result: tunnel
    [l2 with the inner ethertype][inner IP packet]; transport [l2][IP header, protocol =
    next header, lengths and checksum fixed][payload], or [l2][payload] without an IP
    header. *next_header (may be NULL) gets the trailer's next header.

    Returns SN_OK or a drop reason, also counted in sa.drops: MALFORMED_L2/L3/ESP,
    NO_SA (SPI differs), REPLAY, ICV, CRYPTO, BAD_TRAILER, SA_EXPIRED. Up to and
    including an ICV failure p is untouched; after the ICV verified (BAD_TRAILER) the
    payload bytes are already decrypted in place, but offsets, lengths and headers are
    unchanged. The replay window and the lifetimes move only on SN_OK.
    """
    cdef int rc = _decap(sa, p, l2len, esp_off, next_header)
    if rc != SN_OK:
        sa.drops[rc] += 1
    return rc


# ---------------------------------------------------------------------------------------
# Python surface: the management plane and tests. Never on the per-packet path.

class EspError(Exception):
    """An ESP operation refused a packet; `.reason` is its name in DROP_REASONS."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


_ALGS = {
    "aes-gcm": SN_ALG_AES_GCM,
    "rfc4106(gcm(aes))": SN_ALG_AES_GCM,
    "chacha20-poly1305": SN_ALG_CHACHA20_POLY1305,
    "rfc7539esp(chacha20,poly1305)": SN_ALG_CHACHA20_POLY1305,
    "aes-cbc-hmac-sha256": SN_ALG_AES_CBC_HMAC_SHA256,
    "cbc(aes)+hmac(sha256)": SN_ALG_AES_CBC_HMAC_SHA256,
}
_ENGINES = {"auto": SN_ENGINE_AUTO, "openssl": SN_ENGINE_OPENSSL,
            "ipsec-mb": SN_ENGINE_IPSECMB, "ipsecmb": SN_ENGINE_IPSECMB}
_ENGINE_NAMES = {SN_ENGINE_OPENSSL: "openssl", SN_ENGINE_IPSECMB: "ipsec-mb"}
_LIFETIME_KEYS = ("soft_bytes", "hard_bytes", "soft_packets", "hard_packets")


def _find_esp(data, uint32_t l2len, bint encap):
    """Where ESP starts after [l2][IPv4/IPv6 header (+ UDP)]; l2len when no IP header."""
    cdef Py_ssize_t n = len(data)
    if n < l2len + 20:
        return l2len
    ver = data[l2len] >> 4
    if ver == 4:
        off = l2len + (data[l2len] & 0xF) * 4
        proto = data[l2len + 9]
    elif ver == 6 and n >= l2len + 40:
        proto = data[l2len + 6]
        off = l2len + 40
        for _ in range(MAX_EXT_HDRS):
            if proto not in (IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_DSTOPTS) or off + 8 > n:
                break
            proto = data[off]
            off += (data[off + 1] + 1) * 8
    else:
        return l2len
    if proto == IPPROTO_UDP and encap:
        return off + 8
    return off


cdef class SecurityAssociation:
    """One direction of an ESP SA: configuration, keys (inside the crypto engine only),
    sequence number, anti-replay window, lifetimes, counters and events.

    `protect`/`unprotect` handle one packet as bytes (tests, control plane);
    `protect_batch`/`unprotect_batch` run a Batch without the GIL. The `sa` pointer is
    for the data plane (softnic._esp.pxd).

    spi: 1..2^32-1. mode: "tunnel" | "transport". src, dst: tunnel outer addresses (one
    family; may be None in transport mode). alg: "aes-gcm" / "rfc4106(gcm(aes))" (key =
    AES key || 4-byte salt), "chacha20-poly1305" / "rfc7539esp(chacha20,poly1305)" (32 +
    4), "aes-cbc-hmac-sha256" / "cbc(aes)+hmac(sha256)" (16 or 32, auth_key 32).
    icv_len: 8, 12 or 16 (GCM). esn: 64-bit sequence numbers. replay_window: 32..65536.
    seq: outbound, the last number sent; inbound, the highest already received.
    encap: (sport, dport) for UDP encapsulation. lifetime: soft/hard bytes/packets
    (0 or absent: none). engine: "auto", "openssl", "ipsec-mb".
    """

    def __cinit__(self, *args, **kwargs):
        self.sa = <sn_sa *>calloc(1, sizeof(sn_sa))
        if self.sa == NULL:
            raise MemoryError()

    def __init__(self, spi, mode, src, dst, alg, key, auth_key=None, icv_len=16,
                 esn=False, replay_window=64, seq=0, encap=None, lifetime=None,
                 engine="auto"):
        cdef sn_sa *sa = self.sa
        cdef char err[160]
        cdef const uint8_t[::1] k
        cdef const uint8_t[::1] ak
        cdef const uint8_t *akp = NULL
        cdef size_t akl = 0
        cdef uint32_t words
        cdef int ialg, ieng
        if sa.xform != NULL:
            raise RuntimeError("SecurityAssociation is already initialised")
        spi = int(spi)
        if not 0 < spi <= 0xFFFFFFFF:
            raise ValueError("spi must be in 1..2^32-1")
        if mode not in ("tunnel", "transport"):
            raise ValueError("mode must be 'tunnel' or 'transport'")
        try:
            ialg = _ALGS[str(alg).lower()]
        except KeyError:
            raise ValueError(f"unknown algorithm {alg!r}; known: {sorted(_ALGS)}") from None
        try:
            ieng = _ENGINES[engine]
        except KeyError:
            raise ValueError(f"unknown engine {engine!r}") from None
        window = int(replay_window)
        if not 32 <= window <= SN_ESP_MAX_WINDOW:
            raise ValueError(f"replay_window must be in 32..{SN_ESP_MAX_WINDOW}")
        seq = int(seq)
        if not 0 <= seq <= (0xFFFFFFFFFFFFFFFF if esn else 0xFFFFFFFF):
            raise ValueError("seq out of range")
        lifetime = dict(lifetime or {})
        unknown = set(lifetime) - set(_LIFETIME_KEYS)
        if unknown:
            raise ValueError(f"unknown lifetime keys {sorted(unknown)}")
        if encap is not None:
            sport, dport = (int(x) for x in encap)
            if not (0 < sport < 65536 and 0 < dport < 65536):
                raise ValueError("encap ports must be in 1..65535")
            encap = (sport, dport)
        srca = ipaddress.ip_address(src) if src is not None else None
        dsta = ipaddress.ip_address(dst) if dst is not None else None
        if mode == "tunnel":
            if srca is None or dsta is None or srca.version != dsta.version:
                raise ValueError("tunnel mode needs src and dst of one address family")

        k = key
        if auth_key is not None:
            ak = auth_key
            akl = ak.shape[0]
            if akl:
                akp = &ak[0]
        if k.shape[0] == 0:
            raise ValueError("empty key")
        sa.xform = xform_new(ialg, ieng, &k[0], k.shape[0], akp, akl, icv_len, err, sizeof(err))
        if sa.xform == NULL:
            raise ValueError("cannot create the transform: " + err.decode("utf-8", "replace"))
        if ialg == SN_ALG_AES_CBC_HMAC_SHA256:
            ivkey = os.urandom(20)
            k = ivkey
            sa.ivgen = xform_new(SN_ALG_AES_GCM, SN_ENGINE_AUTO, &k[0], 20, NULL, 0, 16,
                                 err, sizeof(err))
            if sa.ivgen == NULL:
                raise ValueError("cannot create the IV generator: "
                                 + err.decode("utf-8", "replace"))
        sa.iv_mask = int.from_bytes(os.urandom(8), "little")
        sa.iv_len = xform_iv_len(sa.xform)
        sa.icv_len = xform_icv_len(sa.xform)
        sa.block = xform_block(sa.xform)
        if sa.block < 4 or sa.block & (sa.block - 1) or sa.iv_len > 16 or sa.icv_len > 16:
            raise ValueError("transform geometry out of range")

        sa.spi = spi
        sa.mode = SN_ESP_TUNNEL if mode == "tunnel" else SN_ESP_TRANSPORT
        sa.esn = 1 if esn else 0
        if srca is not None and dsta is not None:
            sa.family = srca.version
            memcpy(sa.src, <const char *>srca.packed, len(srca.packed))
            memcpy(sa.dst, <const char *>dsta.packed, len(dsta.packed))
        if encap is not None:
            sa.encap = 1
            sa.sport, sa.dport = encap
        # One number, read by direction (an SA is one-way, RFC 4301 §4.1): outbound, the
        # last sequence number sent; inbound, the highest one already received (the
        # window's right edge, as `ip xfrm state ... replay-seq`).
        sa.seq = seq
        sa.replay_top = seq
        sa.seq_near = 0xC000000000000000 if esn else 0xC0000000   # 3/4 of the space
        sa.window = window
        words = (window + 63) // 64 + 1
        n = 1
        while n < words:
            n *= 2
        sa.win_mask = n - 1
        sa.bitmap = <uint64_t *>calloc(n, sizeof(uint64_t))
        if sa.bitmap == NULL:
            raise MemoryError()
        sa.soft_bytes = lifetime.get("soft_bytes", 0) or 0
        sa.hard_bytes = lifetime.get("hard_bytes", 0) or 0
        sa.soft_packets = lifetime.get("soft_packets", 0) or 0
        sa.hard_packets = lifetime.get("hard_packets", 0) or 0

        self.spi = spi
        self.mode = mode
        self.alg = str(alg).lower()
        self.src = srca
        self.dst = dsta
        self.encap = encap

    def __dealloc__(self):
        if self.sa != NULL:
            xform_free(self.sa.xform)
            xform_free(self.sa.ivgen)
            free(self.sa.bitmap)
            memset(self.sa, 0, sizeof(sn_sa))
            free(self.sa)
            self.sa = NULL

    def __repr__(self):
        enc = f", encap={self.encap}" if self.encap else ""
        return (f"SecurityAssociation(spi=0x{self.spi:08x}, mode={self.mode!r}, "
                f"alg={self.alg!r}, src={self.src}, dst={self.dst}, esn={bool(self.sa.esn)}, "
                f"replay_window={self.sa.window}, seq={self.sa.seq}{enc})")

    def __reduce__(self):
        raise TypeError("SecurityAssociation holds keys and cannot be pickled")

    def _need(self):
        if self.sa.xform == NULL:
            raise RuntimeError("SecurityAssociation is not initialised")

    @property
    def seq(self):
        """The last outbound sequence number used (0: none yet)."""
        return self.sa.seq

    @property
    def replay_top(self):
        """The highest inbound sequence number accepted (0: none yet)."""
        return self.sa.replay_top

    @property
    def engine(self):
        self._need()
        return _ENGINE_NAMES.get(xform_engine(self.sa.xform), "unknown")

    def overhead(self, ip_len, hdr_len=20):
        """Bytes protect() adds to an IP packet of ip_len bytes (hdr_len: transport
        mode's IP header, extension headers included)."""
        self._need()
        return sn_esp_overhead(self.sa, ip_len, hdr_len)

    def max_ip_len(self, mtu, hdr_len=20):
        """The largest IP packet whose protected form fits `mtu` (0: none)."""
        self._need()
        return sn_esp_max_ip_len(self.sa, mtu, hdr_len)

    def stats(self):
        cdef int r
        return {
            "spi": self.spi,
            "packets": self.sa.packets,
            "bytes": self.sa.bytes,
            "seq": self.sa.seq,
            "replay_top": self.sa.replay_top,
            "replay_window": self.sa.window,
            "expired": bool(self.sa.dead),
            "events": [EVENTS[i] for i in range(4) if self.sa.events & (1 << i)],
            "drops": {DROP_REASONS[r]: self.sa.drops[r] for r in range(1, SN_DROP_MAX)
                      if self.sa.drops[r]},
        }

    def pop_events(self):
        """The pending events (names from EVENTS), cleared."""
        ev = _ev_take(&self.sa.events)
        return [EVENTS[i] for i in range(4) if ev & (1 << i)]

    def _run(self, packet, uint32_t l2len, bint out, long esp_off):
        cdef const uint8_t[::1] src = packet
        cdef sn_pkt p
        cdef uint8_t nh = 0
        cdef int rc
        cdef uint32_t eo = <uint32_t>esp_off
        cdef size_t n = src.shape[0]
        self._need()
        if n > 0x100000:
            raise ValueError("packet too large")
        memset(&p, 0, sizeof(p))
        # Decap needs no tailroom; with none, a read past the packet is past the buffer
        # (and visible to AddressSanitizer builds).
        p.cap = <uint32_t>(SN_HEADROOM + n + (SN_TAILROOM if out else 0))
        p.data = <uint8_t *>malloc(p.cap)
        if p.data == NULL:
            raise MemoryError()
        p.off = SN_HEADROOM
        p.len = <uint32_t>n
        if n:
            memcpy(p.data + p.off, &src[0], n)
        with nogil:
            if out:
                rc = sn_esp_encap(self.sa, &p, l2len)
            else:
                rc = sn_esp_decap(self.sa, &p, l2len, eo, &nh)
        try:
            if rc != SN_OK:
                raise EspError(DROP_REASONS[rc])
            return PyBytes_FromStringAndSize(<char *>p.data + p.off, p.len)
        finally:
            free(p.data)

    def protect(self, packet, l2len=0):
        """Encrypt one packet [l2len bytes][IP packet]; returns the ESP packet or raises
        EspError(reason)."""
        return self._run(packet, l2len, True, 0)

    def unprotect(self, packet, l2len=0, esp_off=None):
        """Decrypt one packet; esp_off defaults to just after the IP (+UDP) header, or
        l2len when no IP header follows l2 (pass it explicitly for bare ESP)."""
        if esp_off is None:
            esp_off = _find_esp(packet, l2len, self.sa.encap)
        if esp_off < 0:
            raise ValueError("esp_off must be >= 0")
        return self._run(packet, l2len, False, esp_off)

    def protect_batch(self, Batch batch not None, uint32_t l2len=0):
        """Encrypt every live packet of `batch` in place; returns (n_ok, {reason: n})."""
        return _run_batch(self, batch, l2len, True, 0)

    def unprotect_batch(self, Batch batch not None, uint32_t l2len=0, uint32_t esp_off=0):
        """Decrypt every live packet of `batch` in place; returns (n_ok, {reason: n})."""
        return _run_batch(self, batch, l2len, False, esp_off)


cdef object _run_batch(SecurityAssociation self, Batch batch, uint32_t l2len, bint out,
                       uint32_t esp_off):
    cdef uint64_t counts[SN_DROP_MAX]
    cdef int i, rc, n = batch.count
    if n > batch.size:
        n = batch.size              # `count` is writable from Python: never trust it
    cdef sn_pkt *p
    cdef uint8_t nh
    self._need()
    memset(counts, 0, sizeof(counts))
    with nogil:
        for i in range(n):
            p = &batch.pkts[i]
            if p.drop != SN_OK:
                continue                # dropped by an earlier stage
            if out:
                rc = sn_esp_encap(self.sa, p, l2len)
            else:
                rc = sn_esp_decap(self.sa, p, l2len, esp_off, &nh)
            p.drop = <uint16_t>rc
            counts[rc] += 1
    return counts[0], {DROP_REASONS[r]: counts[r] for r in range(1, SN_DROP_MAX)
                       if counts[r]}


# Test hooks for the replay window and ESN inference (no crypto involved).
def _replay_probe(SecurityAssociation sa not None, uint64_t seq):
    return sn_replay_check(sa.sa, seq) == SN_OK


def _replay_accept(SecurityAssociation sa not None, uint64_t seq):
    if sn_replay_check(sa.sa, seq) != SN_OK:
        return False
    sn_replay_update(sa.sa, seq)
    return True


def _infer_seq(SecurityAssociation sa not None, uint32_t seq_lo):
    return sn_esp_infer_seq(sa.sa, seq_lo)


def _encap_hammer(SecurityAssociation sa not None, Batch batch not None, int rounds,
                  uint32_t l2len, uint32_t esp_off):
    """Test hook for concurrent outbound use: `rounds` times, put the batch's packets
    back as they came and protect them all, without the GIL (call from several Python
    threads at once on one SA). Returns (the ESP sequence numbers (low 32 bits, read at
    esp_off + 4 of each protected packet) as a list, {drop reason: count}); the batch
    holds the last round's packets."""
    cdef int n = batch.count
    if n > batch.size:
        n = batch.size
    cdef uint32_t *offs = <uint32_t *>malloc(sizeof(uint32_t) * 2 * (n + 1))
    cdef size_t total = 0
    cdef int i, r, _r, rc
    cdef sn_pkt *p
    sa._need()
    if offs == NULL:
        raise MemoryError()
    for i in range(n):
        offs[2 * i] = batch.pkts[i].off
        offs[2 * i + 1] = batch.pkts[i].len
        total += batch.pkts[i].len
    cdef uint8_t *orig = <uint8_t *>malloc(total + 1)
    cdef uint32_t *seqs = <uint32_t *>malloc(sizeof(uint32_t) * (<size_t>rounds * n + 1))
    cdef uint64_t counts[SN_DROP_MAX]
    cdef size_t pos = 0, got = 0
    if orig == NULL or seqs == NULL:
        free(offs)
        free(orig)
        free(seqs)
        raise MemoryError()
    for i in range(n):
        memcpy(orig + pos, batch.pkts[i].data + offs[2 * i], offs[2 * i + 1])
        pos += offs[2 * i + 1]
    memset(counts, 0, sizeof(counts))
    with nogil:
        for _r in range(rounds):
            pos = 0
            for i in range(n):
                p = &batch.pkts[i]
                p.off = offs[2 * i]
                p.len = offs[2 * i + 1]
                p.drop = SN_OK
                memcpy(p.data + p.off, orig + pos, p.len)
                pos += p.len
                rc = sn_esp_encap(sa.sa, p, l2len)
                p.drop = <uint16_t>rc
                counts[rc] += 1
                if rc == SN_OK:
                    seqs[got] = sn_ld32(p.data + p.off + esp_off + 4)
                    got += 1
    try:
        return ([seqs[i] for i in range(got)],
                {DROP_REASONS[r]: counts[r] for r in range(1, SN_DROP_MAX) if counts[r]})
    finally:
        free(offs)
        free(orig)
        free(seqs)
