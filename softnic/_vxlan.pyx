# cython: language_level=3
"""VXLAN, RFC 7348 §5 (frame format) and §4 (VTEP behaviour), plus the flow hash for the
outer UDP source port and the ICMP "too big" reply of a tunnel ingress.

Outer headers: IPv4 per RFC 791 (DF set by default so the underlay never fragments, RFC
7348 §4.3), IPv6 per RFC 8200 with the flow label taken from the inner flow hash (RFC
6438); UDP per RFC 768, checksum zero for IPv4 unless asked (RFC 7348 §5 "SHOULD be
transmitted as zero"), always computed for IPv6 (RFC 8200 §8.1; the RFC 6935 zero-checksum
exception is not used). ECN: copied to the outer header on encapsulation and propagated
back on decapsulation per RFC 6040 §4 (normal mode). ICMP replies: RFC 792 / RFC 1191 §4
and RFC 1812 §4.3.2 for IPv4, RFC 4443 §3.2 and §2.4 for IPv6.
"""

import ipaddress

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from softnic._batch cimport Batch
from softnic._csum cimport (
    sn_csum,
    sn_csum_finish,
    sn_csum_partial,
    sn_csum_pseudo4,
    sn_csum_pseudo6,
    sn_csum_update16,
)
from softnic._pkt cimport (
    SN_DROP_BAD_VXLAN,
    SN_DROP_MALFORMED_L2,
    SN_DROP_MALFORMED_L3,
    SN_DROP_MALFORMED_L4,
    SN_DROP_NO_FDB,
    SN_DROP_NO_ROOM,
    SN_DROP_TOO_BIG,
    SN_OK,
    sn_pkt,
)
from softnic._proto cimport sn_ld16, sn_ld32, sn_st16, sn_st32

from softnic._batch import DROP_REASONS


cdef extern from *:
    """
    #include <stdint.h>
    /* IPv4 ID for datagrams sent without DF (RFC 6864 §4.1: must be unique per
       src/dst/proto within the MSL; a shared wrapping counter is what Linux does too). */
    static uint32_t sn_vx_ipid_ctr;
    static inline uint16_t sn_vx_next_ipid(void) {
        return (uint16_t)__atomic_fetch_add(&sn_vx_ipid_ctr, 1, __ATOMIC_RELAXED);
    }
    """
    uint16_t sn_vx_next_ipid() nogil


cdef enum:
    ETH_HLEN = 14
    ETH_P_IP = 0x0800
    ETH_P_IPV6 = 0x86DD
    ETH_P_8021Q = 0x8100
    ETH_P_8021AD = 0x88A8
    ETH_P_QINQ_OLD = 0x9100
    IPPROTO_HOPOPTS = 0
    IPPROTO_ICMP = 1
    IPPROTO_TCP = 6
    IPPROTO_UDP = 17
    IPPROTO_DCCP = 33
    IPPROTO_ROUTING = 43
    IPPROTO_FRAGMENT = 44
    IPPROTO_ESP = 50
    IPPROTO_AH = 51
    IPPROTO_ICMPV6 = 58
    IPPROTO_DSTOPTS = 60
    IPPROTO_SCTP = 132
    IPPROTO_UDPLITE = 136
    NATT_PORT = 4500
    MAX_VLAN_TAGS = 2          # QinQ; deeper stacks hash as non-IP
    MAX_EXT_HDRS = 8           # bound on the IPv6 extension-header walk
    ICMP4_QUOTE_LIMIT = 576    # RFC 1812 §4.3.2.3: the whole reply fits 576 bytes
    ICMP6_QUOTE_LIMIT = 1280   # RFC 4443 §2.4(c): the whole reply fits the IPv6 minimum MTU
    HASH_SEED = 0x9E3779B9


cdef inline bint _is_vlan(uint16_t et) noexcept nogil:
    """802.1Q, 802.1ad, and the pre-standard QinQ TPID still seen in the field."""
    return et == ETH_P_8021Q or et == ETH_P_8021AD or et == ETH_P_QINQ_OLD


# --- flow hash ------------------------------------------------------------------------
# MurmurHash3 (x86_32) block mixing over the selected header words, then its fmix32
# finaliser: every input bit affects every output bit, which the top-bits port mapping
# relies on. Not keyed: the port only spreads load, it is not a security boundary.

cdef inline uint32_t _rotl(uint32_t x, int r) noexcept nogil:
    return (x << r) | (x >> (32 - r))


cdef inline uint32_t _mix(uint32_t h, uint32_t k) noexcept nogil:
    k *= 0xCC9E2D51u
    k = _rotl(k, 15)
    k *= 0x1B873593u
    h ^= k
    h = _rotl(h, 13)
    return h * 5 + 0xE6546B64u


cdef inline uint32_t _fmix(uint32_t h) noexcept nogil:
    h ^= h >> 16
    h *= 0x85EBCA6Bu
    h ^= h >> 13
    h *= 0xC2B2AE35u
    h ^= h >> 16
    return h if h != 0 else 1     # 0 means "not computed" in sn_pkt.hash


cdef inline uint32_t _mix_l4(uint32_t h, const uint8_t *f, uint32_t l4, uint32_t n,
                             uint8_t proto) noexcept nogil:
    """Mix the transport selector at f[l4:n]: the SPI for ESP and ESP-in-UDP (RFC 3948
    §2.2: UDP 4500 with a non-zero first word), both ports for port-based protocols.
    A truncated transport header contributes nothing (addresses + protocol remain)."""
    if proto == IPPROTO_ESP:
        if l4 + 4 <= n:
            h = _mix(h, sn_ld32(f + l4))
        return h
    if (proto != IPPROTO_TCP and proto != IPPROTO_UDP and proto != IPPROTO_SCTP
            and proto != IPPROTO_UDPLITE and proto != IPPROTO_DCCP):
        return h
    if l4 + 4 > n:
        return h
    if (proto == IPPROTO_UDP and l4 + 12 <= n
            and (sn_ld16(f + l4) == NATT_PORT or sn_ld16(f + l4 + 2) == NATT_PORT)
            and sn_ld32(f + l4 + 8) != 0):
        # NAT-T ports are fixed (or NAT-chosen): the SPI is where the entropy is.
        return _mix(h, sn_ld32(f + l4 + 8) ^ 0x45535055u)
    return _mix(h, sn_ld32(f + l4))


cdef uint32_t sn_flow_hash(const uint8_t *f, uint32_t n) noexcept nogil:
    """Flow hash of the Ethernet frame f[0:n] (VLAN/QinQ aware). Never returns 0.

    IPv4/IPv6: addresses + protocol + (ports | SPI); fragments hash addresses + protocol
    only, so every fragment of a datagram takes the same path. Anything else (or an IP
    header that does not parse): MACs + ethertype. Reads only f[0:n].
    """
    cdef uint32_t h = HASH_SEED
    cdef uint32_t off = ETH_HLEN
    cdef uint32_t hl, l4, i, _i
    cdef uint16_t et
    cdef uint8_t nh
    cdef bint frag = False
    if n < ETH_HLEN:
        for i in range(n):
            h = _mix(h, f[i])
        return _fmix(h ^ n)
    et = sn_ld16(f + 12)
    for _i in range(MAX_VLAN_TAGS):
        if _is_vlan(et) and off + 4 <= n:
            et = sn_ld16(f + off + 2)
            off += 4
        else:
            break
    if et == ETH_P_IP and off + 20 <= n and (f[off] >> 4) == 4:
        hl = (f[off] & 15) * 4
        if hl >= 20 and off + hl <= n:
            h = _mix(h, sn_ld32(f + off + 12))
            h = _mix(h, sn_ld32(f + off + 16))
            nh = f[off + 9]
            h = _mix(h, nh)
            if (sn_ld16(f + off + 6) & 0x3FFF) == 0:      # neither MF nor an offset
                h = _mix_l4(h, f, off + hl, n, nh)
            return _fmix(h ^ 4)
    elif et == ETH_P_IPV6 and off + 40 <= n and (f[off] >> 4) == 6:
        for i in range(8):
            h = _mix(h, sn_ld32(f + off + 8 + 4 * i))
        nh = f[off + 6]
        l4 = off + 40
        for _i in range(MAX_EXT_HDRS):
            if nh == IPPROTO_HOPOPTS or nh == IPPROTO_ROUTING or nh == IPPROTO_DSTOPTS:
                if l4 + 8 > n:
                    break
                nh = f[l4]
                l4 += (<uint32_t>f[l4 + 1] + 1) * 8
            elif nh == IPPROTO_FRAGMENT:
                if l4 + 8 > n:
                    break
                frag = True
                nh = f[l4]
                l4 += 8
            elif nh == IPPROTO_AH:
                if l4 + 8 > n:
                    break
                nh = f[l4]
                l4 += (<uint32_t>f[l4 + 1] + 2) * 4
            else:
                break
        h = _mix(h, nh)
        if not frag and l4 <= n:
            h = _mix_l4(h, f, l4, n, nh)
        return _fmix(h ^ 6)
    h = _mix(h, sn_ld32(f))
    h = _mix(h, sn_ld32(f + 4))
    h = _mix(h, sn_ld32(f + 8))
    h = _mix(h, et)
    return _fmix(h ^ 2)


# --- encapsulation --------------------------------------------------------------------

cdef inline int _inner_ip(const uint8_t *f, uint32_t n, uint32_t *l3) noexcept nogil:
    """IP version (4 or 6) of the frame's payload with *l3 its offset (20 resp. 40 bytes
    present), or 0 when it carries no IP header."""
    cdef uint32_t off = ETH_HLEN
    cdef uint16_t et
    cdef int _i
    if n < ETH_HLEN:
        return 0
    et = sn_ld16(f + 12)
    for _i in range(MAX_VLAN_TAGS):
        if _is_vlan(et) and off + 4 <= n:
            et = sn_ld16(f + off + 2)
            off += 4
    l3[0] = off
    if et == ETH_P_IP and off + 20 <= n and (f[off] >> 4) == 4:
        return 4
    if et == ETH_P_IPV6 and off + 40 <= n and (f[off] >> 4) == 6:
        return 6
    return 0


cdef inline uint8_t _inner_ecn(const uint8_t *f, uint32_t n) noexcept nogil:
    """ECN bits of the inner IP header, 0 (Not-ECT) when there is none."""
    cdef uint32_t off = 0
    cdef int v = _inner_ip(f, n, &off)
    if v == 4:
        return f[off + 1] & 3
    if v == 6:
        return (f[off + 1] >> 4) & 3
    return 0


cdef inline void _ecn_decap(uint8_t *f, uint32_t n, uint8_t outer) noexcept nogil:
    """RFC 6040 §4.2, normal mode: an outer CE marks an ECN-capable inner header CE, and
    an outer ECT(1) turns an inner ECT(0) into ECT(1); the IPv4 header checksum follows
    (RFC 1624). A Not-ECT inner is left alone (RFC 6040 would drop it under an outer CE;
    there is no drop reason for that yet)."""
    cdef uint32_t off = 0
    cdef int v = _inner_ip(f, n, &off)
    cdef uint8_t inner, new
    cdef uint16_t old_w
    outer &= 3
    if v == 0 or outer == 0:
        return
    inner = (f[off + 1] & 3) if v == 4 else ((f[off + 1] >> 4) & 3)
    if inner == 0:
        return
    if outer == 3:
        new = 3
    elif outer == 1 and inner == 2:
        new = 1
    else:
        return
    if new == inner:
        return
    if v == 4:
        old_w = sn_ld16(f + off)
        f[off + 1] = (f[off + 1] & 0xFC) | new
        sn_st16(f + off + 10, sn_csum_update16(sn_ld16(f + off + 10), old_w, sn_ld16(f + off)))
    else:
        f[off + 1] = (f[off + 1] & 0xCF) | (new << 4)


cdef int sn_vxlan_encap(sn_pkt *p, const sn_vxlan_tx *t) noexcept nogil:
    """Prepend outer IP + UDP + VXLAN to the inner Ethernet frame at p, in the headroom.

    Ownership: writes only p.data[p.off - overhead : p.off] and p.off/p.len/p.hash; the
    frame is not moved. p.hash is computed (sn_flow_hash) when 0 and kept.
    Returns SN_OK; SN_DROP_MALFORMED_L2 (frame < 14 bytes or outside its slot);
    SN_DROP_TOO_BIG (outer lengths would not fit 16 bits); SN_DROP_NO_ROOM (headroom);
    SN_DROP_NO_FDB (t has no valid family). The packet is untouched on failure.
    """
    cdef uint32_t hl, ol, ulen, h
    cdef uint8_t *o
    cdef uint8_t *u
    cdef uint8_t *v
    cdef uint8_t tos
    cdef uint16_t c
    cdef uint64_t acc
    if t.family == SN_AF_INET:
        hl = 20
    elif t.family == SN_AF_INET6:
        hl = 40
    else:
        return SN_DROP_NO_FDB
    if p.len < ETH_HLEN or p.off > p.cap or p.len > p.cap - p.off:
        return SN_DROP_MALFORMED_L2
    ulen = p.len + 16
    if ulen > 0xFFFF or (hl == 20 and ulen + 20 > 0xFFFF):
        return SN_DROP_TOO_BIG
    ol = hl + 16
    if p.off < ol:
        return SN_DROP_NO_ROOM
    h = p.hash
    if h == 0:
        h = sn_flow_hash(p.data + p.off, p.len)
        p.hash = h
    tos = t.tos
    if t.flags & SN_VXLAN_F_ECN:
        tos = (tos & 0xFC) | _inner_ecn(p.data + p.off, p.len)
    o = p.data + p.off - ol
    u = o + hl
    v = u + 8
    if hl == 20:
        o[0] = 0x45
        o[1] = tos
        sn_st16(o + 2, <uint16_t>(ulen + 20))
        if t.flags & SN_VXLAN_F_DF:
            sn_st32(o + 4, 0x00004000u)       # atomic datagram: ID 0 (RFC 6864 §4.1)
        else:
            sn_st16(o + 4, sn_vx_next_ipid())
            sn_st16(o + 6, 0)
        o[8] = t.ttl if t.ttl else 64
        o[9] = IPPROTO_UDP
        o[10] = 0
        o[11] = 0
        memcpy(o + 12, t.local, 4)
        memcpy(o + 16, t.remote, 4)
        sn_st16(o + 10, sn_csum(o, 20))
    else:
        sn_st32(o, 0x60000000u | (<uint32_t>tos << 20) | (h & 0xFFFFFu))
        sn_st16(o + 4, <uint16_t>ulen)
        o[6] = IPPROTO_UDP
        o[7] = t.ttl if t.ttl else 64
        memcpy(o + 8, t.local, 16)
        memcpy(o + 24, t.remote, 16)
    sn_st16(u, sn_flow_port(h))
    sn_st16(u + 2, t.dport if t.dport else SN_VXLAN_PORT)
    sn_st16(u + 4, <uint16_t>ulen)
    u[6] = 0
    u[7] = 0
    sn_st32(v, 0x08000000u)                   # I flag; reserved bits zero (RFC 7348 §5)
    sn_st32(v + 4, (t.vni & 0xFFFFFFu) << 8)
    if hl == 40 or (t.flags & SN_VXLAN_F_UDP_CSUM):
        if hl == 20:
            acc = sn_csum_pseudo4(o + 12, o + 16, IPPROTO_UDP, ulen)
        else:
            acc = sn_csum_pseudo6(o + 8, o + 24, IPPROTO_UDP, ulen)
        c = sn_csum_finish(sn_csum_partial(u, ulen, acc))
        sn_st16(u + 6, c if c != 0 else 0xFFFF)        # 0 means "no checksum" in UDP
    p.off -= ol
    p.len += ol
    return SN_OK


# --- decapsulation --------------------------------------------------------------------

cdef int sn_vxlan_decap(sn_pkt *p, sn_vxlan_rx *info) noexcept nogil:
    """Validate [outer IPv4/IPv6][UDP][VXLAN][inner Ethernet] at p and strip to the frame.

    The outer IP and UDP checksums are not re-verified: the kernel checked them when the
    datagram reached the UDP socket, and the I/O layer rebuilt these headers. The UDP
    destination port is not checked either (the socket it arrived on decides that); it is
    reported in info. Fragments are refused (the kernel reassembles before the socket).
    Ownership: reads p.data[p.off : p.off+p.len]; on success moves p.off/p.len to the
    inner frame, fills info and applies RFC 6040 ECN decapsulation to the inner IP
    header (outer CE -> inner CE); on failure neither p nor info is changed.
    Returns SN_OK; SN_DROP_MALFORMED_L3 (IP version, header/total length, fragment,
    not UDP); SN_DROP_MALFORMED_L4 (UDP header/length); SN_DROP_BAD_VXLAN (truncated
    VXLAN header, I flag clear; reserved bits are ignored per RFC 7348 §5);
    SN_DROP_MALFORMED_L2 (inner frame < 14 bytes).
    """
    cdef const uint8_t *b
    cdef const uint8_t *v
    cdef uint32_t n = p.len
    cdef uint32_t hl, end, l4, ulen, _i
    cdef uint8_t nh
    cdef uint8_t ver
    if p.off > p.cap or n > p.cap - p.off or n < 1:
        return SN_DROP_MALFORMED_L3
    b = p.data + p.off
    ver = b[0] >> 4
    if ver == 4:
        if n < 20:
            return SN_DROP_MALFORMED_L3
        hl = (b[0] & 15) * 4
        end = sn_ld16(b + 2)
        if hl < 20 or end < hl or end > n:
            return SN_DROP_MALFORMED_L3
        if (sn_ld16(b + 6) & 0x3FFF) != 0 or b[9] != IPPROTO_UDP:
            return SN_DROP_MALFORMED_L3
        l4 = hl
    elif ver == 6:
        if n < 40:
            return SN_DROP_MALFORMED_L3
        end = 40 + <uint32_t>sn_ld16(b + 4)
        if end > n:
            return SN_DROP_MALFORMED_L3
        nh = b[6]
        l4 = 40
        for _i in range(MAX_EXT_HDRS):
            if nh != IPPROTO_HOPOPTS and nh != IPPROTO_ROUTING and nh != IPPROTO_DSTOPTS:
                break
            if l4 + 8 > end:
                return SN_DROP_MALFORMED_L3
            nh = b[l4]
            l4 += (<uint32_t>b[l4 + 1] + 1) * 8
        if nh != IPPROTO_UDP or l4 > end:
            return SN_DROP_MALFORMED_L3
    else:
        return SN_DROP_MALFORMED_L3
    if end - l4 < 8:
        return SN_DROP_MALFORMED_L4
    ulen = sn_ld16(b + l4 + 4)
    if ulen < 8 or ulen > end - l4:
        return SN_DROP_MALFORMED_L4
    if ulen < 16:
        return SN_DROP_BAD_VXLAN
    v = b + l4 + 8
    if (v[0] & 0x08) == 0:
        return SN_DROP_BAD_VXLAN
    if ulen - 16 < ETH_HLEN:
        return SN_DROP_MALFORMED_L2
    info.vni = sn_ld32(v + 4) >> 8
    memset(info.src, 0, 16)
    memset(info.dst, 0, 16)
    if ver == 4:
        info.family = SN_AF_INET
        memcpy(info.src, b + 12, 4)
        memcpy(info.dst, b + 16, 4)
        info.tos = b[1]
    else:
        info.family = SN_AF_INET6
        memcpy(info.src, b + 8, 16)
        memcpy(info.dst, b + 24, 16)
        info.tos = <uint8_t>(sn_ld16(b) >> 4)
    info.sport = sn_ld16(b + l4)
    info.dport = sn_ld16(b + l4 + 2)
    _ecn_decap(p.data + p.off + l4 + 16, ulen - 16, info.tos)
    p.off += l4 + 16
    p.len = ulen - 16
    return SN_OK


# --- ICMP too big ---------------------------------------------------------------------

cdef inline bint _v4_bad_source(uint32_t a) noexcept nogil:
    """Not a single host (RFC 1812 §4.3.2.7, RFC 1122 §3.2.2): 0/8, 127/8, 224/4, 240/4."""
    cdef uint32_t top = a >> 24
    return top == 0 or top == 127 or top >= 224


cdef inline uint32_t _l2_reply(const uint8_t *f, uint32_t off, uint8_t *o) noexcept nogil:
    """Ethernet (+ VLAN tags) header of the reply: MACs swapped, tags and type kept."""
    memcpy(o, f + 6, 6)
    memcpy(o + 6, f, 6)
    memcpy(o + 12, f + 12, off - 12)
    return off


cdef int _too_big4(const uint8_t *f, uint32_t n, uint32_t off, uint32_t mtu,
                   sn_pkt *out) noexcept nogil:
    cdef const uint8_t *ip = f + off
    cdef uint32_t avail = n - off
    cdef uint32_t hl, tot, q
    cdef uint16_t fo
    cdef uint8_t *r
    cdef uint8_t *c
    if avail < 20 or (ip[0] >> 4) != 4:
        return SN_DROP_MALFORMED_L3
    hl = (ip[0] & 15) * 4
    tot = sn_ld16(ip + 2)
    if hl < 20 or tot < hl or tot > avail:
        return SN_DROP_MALFORMED_L3
    fo = sn_ld16(ip + 6)
    # DF clear: the sender allowed fragmentation, so this is no PMTU event (RFC 1191 §4).
    # A non-first fragment gets no ICMP error (RFC 1122 §3.2.2).
    if (fo & 0x4000) == 0 or (fo & 0x1FFF) != 0:
        return SN_DROP_TOO_BIG
    if (f[0] | f[6]) & 1 or _v4_bad_source(sn_ld32(ip + 12)) or ip[16] >= 224:
        return SN_DROP_TOO_BIG        # link/IP broadcast or multicast, bad source
    if ip[9] == IPPROTO_ICMP:
        # Never an error about an error (RFC 1122 §3.2.2); unreadable type: assume error.
        if tot < hl + 1:
            return SN_DROP_TOO_BIG
        fo = ip[hl]
        if fo == 3 or fo == 4 or fo == 5 or fo == 11 or fo == 12:
            return SN_DROP_TOO_BIG
    if mtu < 68 or mtu > 0xFFFF:      # RFC 791 minimum; the field is 16 bits
        return SN_DROP_TOO_BIG
    q = tot
    if q > ICMP4_QUOTE_LIMIT - 28:
        q = ICMP4_QUOTE_LIMIT - 28
    if out.off > out.cap or off + 28 + q > out.cap - out.off:
        return SN_DROP_NO_ROOM
    r = out.data + out.off
    _l2_reply(f, off, r)
    r += off
    r[0] = 0x45
    r[1] = 0xC0                       # precedence "internetwork control" (RFC 1812 §4.3.2.5)
    sn_st16(r + 2, <uint16_t>(28 + q))
    sn_st32(r + 4, 0x00004000u)         # ID 0, DF: an atomic datagram (RFC 6864)
    r[8] = 64
    r[9] = IPPROTO_ICMP
    r[10] = 0
    r[11] = 0
    memcpy(r + 12, ip + 16, 4)
    memcpy(r + 16, ip + 12, 4)
    sn_st16(r + 10, sn_csum(r, 20))
    c = r + 20
    c[0] = 3                          # destination unreachable
    c[1] = 4                          # fragmentation needed and DF set
    sn_st32(c + 2, 0)                   # checksum + unused
    sn_st16(c + 6, <uint16_t>mtu)       # next-hop MTU (RFC 1191 §4)
    memcpy(c + 8, ip, q)
    sn_st16(c + 2, sn_csum(c, 8 + q))
    out.len = off + 28 + q
    return SN_OK


cdef int _too_big6(const uint8_t *f, uint32_t n, uint32_t off, uint32_t mtu,
                   sn_pkt *out) noexcept nogil:
    cdef const uint8_t *ip = f + off
    cdef uint32_t avail = n - off
    cdef uint32_t tot, pos, q, i, _i
    cdef uint8_t nh
    cdef uint8_t *r
    cdef uint8_t *c
    cdef uint64_t acc
    if avail < 40 or (ip[0] >> 4) != 6:
        return SN_DROP_MALFORMED_L3
    tot = 40 + <uint32_t>sn_ld16(ip + 4)
    if tot > avail:
        return SN_DROP_MALFORMED_L3
    # Source must be a unicast host (RFC 4443 §2.4(e.6)): not ::, not multicast.
    # Multicast destinations may get a PTB (§2.4(e.3)) but the reply then needs a unicast
    # source of ours, which a tunnel ingress does not have: no reply.
    if ip[8] == 0xFF or ip[24] == 0xFF or f[6] & 1:
        return SN_DROP_TOO_BIG
    for i in range(16):
        if ip[8 + i] != 0:
            break
    else:
        return SN_DROP_TOO_BIG
    nh = ip[6]
    pos = 40
    for _i in range(MAX_EXT_HDRS):
        if nh == IPPROTO_HOPOPTS or nh == IPPROTO_ROUTING or nh == IPPROTO_DSTOPTS:
            if pos + 8 > tot:
                return SN_DROP_MALFORMED_L3
            nh = ip[pos]
            pos += (<uint32_t>ip[pos + 1] + 1) * 8
        elif nh == IPPROTO_FRAGMENT:
            if pos + 8 > tot:
                return SN_DROP_MALFORMED_L3
            if (sn_ld16(ip + pos + 2) & 0xFFF8) != 0:
                return SN_DROP_TOO_BIG    # not the first fragment (RFC 4443 §2.4(e))
            nh = ip[pos]
            pos += 8
        elif nh == IPPROTO_AH:
            if pos + 8 > tot:
                return SN_DROP_MALFORMED_L3
            nh = ip[pos]
            pos += (<uint32_t>ip[pos + 1] + 2) * 4
        else:
            break
    if nh == IPPROTO_ICMPV6:
        # Errors are types 0..127 (RFC 4443 §2.1); an unreadable type counts as one.
        if pos + 1 > tot or ip[pos] < 128:
            return SN_DROP_TOO_BIG
    if mtu < 1280:                    # RFC 8200 §5: no link below the IPv6 minimum
        return SN_DROP_TOO_BIG
    q = tot
    if q > ICMP6_QUOTE_LIMIT - 48:
        q = ICMP6_QUOTE_LIMIT - 48
    if out.off > out.cap or off + 48 + q > out.cap - out.off:
        return SN_DROP_NO_ROOM
    r = out.data + out.off
    _l2_reply(f, off, r)
    r += off
    sn_st32(r, 0x60000000u)
    sn_st16(r + 4, <uint16_t>(8 + q))
    r[6] = IPPROTO_ICMPV6
    r[7] = 64
    memcpy(r + 8, ip + 24, 16)
    memcpy(r + 24, ip + 8, 16)
    c = r + 40
    c[0] = 2                          # Packet Too Big
    c[1] = 0
    c[2] = 0
    c[3] = 0
    sn_st32(c + 4, mtu)
    memcpy(c + 8, ip, q)
    acc = sn_csum_pseudo6(r + 8, r + 24, IPPROTO_ICMPV6, 8 + q)   # RFC 8200 §8.1
    sn_st16(c + 2, sn_csum_finish(sn_csum_partial(c, 8 + q, acc)))
    out.len = off + 48 + q
    return SN_OK


cdef int sn_icmp_too_big(const uint8_t *f, uint32_t n, uint32_t mtu,
                         sn_pkt *out) noexcept nogil:
    """Build at out.data[out.off:] the ICMP reply to the too-large Ethernet frame f[0:n].

    mtu: the largest inner IP packet (L3 bytes) the tunnel carries. ICMPv4 3/4 with
    next-hop MTU (only for DF-set, first-fragment datagrams) or ICMPv6 2 (Packet Too
    Big); MACs and addresses swapped, VLAN tags kept, as much of the original quoted as
    fits 576 (v4) / 1280 (v6) bytes of reply, checksums valid.
    Ownership: reads f[0:n], writes out.data[out.off : out.off+out.len] and out.len;
    f must not overlap out's slot. Returns SN_OK when a reply was built; SN_DROP_TOO_BIG
    when no reply is due (ICMP error, group/invalid address, non-first fragment, DF
    clear, MTU out of range, non-IP); SN_DROP_MALFORMED_L2/L3 for a frame that does not
    parse; SN_DROP_NO_ROOM when out's slot is too small. out.len is untouched then.
    """
    cdef uint32_t off = ETH_HLEN
    cdef uint16_t et
    cdef int _i
    if n < ETH_HLEN:
        return SN_DROP_MALFORMED_L2
    et = sn_ld16(f + 12)
    for _i in range(MAX_VLAN_TAGS):
        if _is_vlan(et):
            if off + 4 > n:
                return SN_DROP_MALFORMED_L2
            et = sn_ld16(f + off + 2)
            off += 4
    if et == ETH_P_IP:
        return _too_big4(f, n, off, mtu, out)
    if et == ETH_P_IPV6:
        return _too_big6(f, n, off, mtu, out)
    return SN_DROP_TOO_BIG


# --- bursts -----------------------------------------------------------------------------

cdef int sn_vxlan_encap_burst(sn_pkt *pkts, int n, const sn_vxlan_tx *t) noexcept nogil:
    """sn_vxlan_encap over the live packets of pkts[0:n], one VTEP for all; refused
    packets get .drop set (they stay in place). Returns the number encapsulated."""
    cdef int i, r, ok = 0
    for i in range(n):
        if pkts[i].drop != SN_OK:
            continue
        r = sn_vxlan_encap(&pkts[i], t)
        if r != SN_OK:
            pkts[i].drop = <uint16_t>r
        else:
            ok += 1
    return ok


cdef int sn_vxlan_decap_burst(sn_pkt *pkts, int n, sn_vxlan_rx *infos) noexcept nogil:
    """sn_vxlan_decap over the live packets of pkts[0:n]; infos[i] belongs to pkts[i]
    (untouched for dropped ones). Returns the number decapsulated."""
    cdef int i, r, ok = 0
    for i in range(n):
        if pkts[i].drop != SN_OK:
            continue
        r = sn_vxlan_decap(&pkts[i], &infos[i])
        if r != SN_OK:
            pkts[i].drop = <uint16_t>r
        else:
            ok += 1
    return ok


# --- control plane --------------------------------------------------------------------

cdef int sn_vxlan_tx_init(sn_vxlan_tx *t, object local, object remote, uint32_t vni,
                          uint16_t dport=SN_VXLAN_PORT, uint8_t ttl=64, uint8_t tos=0,
                          bint df=True, bint udp_csum=False, bint ecn=True) except -1:
    la = ipaddress.ip_address(local)
    ra = ipaddress.ip_address(remote)
    if la.version != ra.version:
        raise ValueError("local and remote VTEP addresses differ in family")
    if vni > 0xFFFFFF:
        raise ValueError("VNI must fit 24 bits")
    memset(t, 0, sizeof(sn_vxlan_tx))
    lb = la.packed
    rb = ra.packed
    memcpy(t.local, <const char *>lb, len(lb))
    memcpy(t.remote, <const char *>rb, len(rb))
    t.family = SN_AF_INET if la.version == 4 else SN_AF_INET6
    t.vni = vni
    t.dport = dport if dport else SN_VXLAN_PORT
    t.ttl = ttl if ttl else 64
    t.tos = tos
    t.flags = ((SN_VXLAN_F_DF if df else 0) | (SN_VXLAN_F_UDP_CSUM if udp_csum else 0)
               | (SN_VXLAN_F_ECN if ecn else 0))
    return 0


# --- Python surface (tests, management plane; not the data path) -----------------------

cdef class _Slot:
    """One packet slot with headroom, for the Python wrappers."""
    cdef bytearray buf
    cdef sn_pkt pkt

    def __cinit__(self, const uint8_t[::1] frame, uint32_t headroom=256, uint32_t extra=0):
        cdef uint32_t n = frame.shape[0]
        self.buf = bytearray(headroom + n + extra)
        self.pkt.data = <uint8_t *>(<char *>self.buf)
        self.pkt.cap = len(self.buf)
        self.pkt.off = headroom
        self.pkt.len = n
        self.pkt.hash = 0
        if n:
            memcpy(self.pkt.data + headroom, &frame[0], n)

    cdef bytes bytes(self):
        return bytes(self.buf[self.pkt.off:self.pkt.off + self.pkt.len])


cdef object _addr(const uint8_t *a, uint8_t family):
    if family == SN_AF_INET:
        return ipaddress.IPv4Address(bytes(a[:4]))
    return ipaddress.IPv6Address(bytes(a[:16]))


def encap(frame, local, remote, uint32_t vni, *, uint16_t dport=SN_VXLAN_PORT,
          uint8_t ttl=64, uint8_t tos=0, bint df=True, udp_csum=None, bint ecn=True,
          uint32_t flow_hash=0, uint32_t _headroom=256):
    """Encapsulate an Ethernet frame; returns the outer IP packet (bytes).

    udp_csum: IPv4 UDP checksum on/off (default off, RFC 7348 §5); IPv6 always computes.
    flow_hash: a precomputed sn_pkt.hash (0 = compute from the frame).
    Raises ValueError with the drop-reason name on a refused frame.
    """
    cdef sn_vxlan_tx t
    cdef _Slot s = _Slot(bytes(frame), _headroom)
    cdef int r
    sn_vxlan_tx_init(&t, local, remote, vni, dport, ttl, tos, df, bool(udp_csum), ecn)
    s.pkt.hash = flow_hash
    r = sn_vxlan_encap(&s.pkt, &t)
    if r != SN_OK:
        raise ValueError(DROP_REASONS[r])
    return s.bytes()


def decap(packet):
    """Decapsulate an outer IP packet; returns (vni, inner frame, info dict).

    Raises ValueError with the drop-reason name on a refused packet.
    """
    cdef _Slot s = _Slot(bytes(packet), 0)
    cdef sn_vxlan_rx info
    cdef int r = sn_vxlan_decap(&s.pkt, &info)
    if r != SN_OK:
        raise ValueError(DROP_REASONS[r])
    d = {
        "vni": info.vni,
        "family": 4 if info.family == SN_AF_INET else 6,
        "src": _addr(info.src, info.family),
        "dst": _addr(info.dst, info.family),
        "sport": info.sport,
        "dport": info.dport,
        "tos": info.tos,
    }
    return info.vni, s.bytes(), d


def flow_hash(frame):
    """sn_flow_hash of an Ethernet frame (never 0)."""
    cdef const uint8_t[::1] f = bytes(frame)
    cdef const uint8_t *pf = &f[0] if f.shape[0] else NULL
    return sn_flow_hash(pf, f.shape[0])


def flow_port(uint32_t h):
    """sn_flow_port: a flow hash mapped into 49152..65535."""
    return sn_flow_port(h)


def icmp_too_big(frame, uint32_t mtu):
    """The ICMP too-big reply frame for an Ethernet frame, or None when none is due.

    Raises ValueError with the drop-reason name when the frame does not parse.
    """
    cdef const uint8_t[::1] f = bytes(frame)
    cdef const uint8_t *pf = &f[0] if f.shape[0] else NULL
    cdef bytearray buf = bytearray(2048)
    cdef sn_pkt out
    cdef int r
    out.data = <uint8_t *>(<char *>buf)
    out.cap = len(buf)
    out.off = 64
    out.len = 0
    r = sn_icmp_too_big(pf, f.shape[0], mtu, &out)
    if r == SN_DROP_TOO_BIG:
        return None
    if r != SN_OK:
        raise ValueError(DROP_REASONS[r])
    return bytes(buf[out.off:out.off + out.len])


def encap_batch(Batch b not None, local, remote, uint32_t vni, *, bint udp_csum=False):
    """Encapsulate every live packet of a Batch in place (GIL released); returns the
    number encapsulated. Drop reasons are in b.drop_reason(i)."""
    cdef sn_vxlan_tx t
    cdef int ok
    sn_vxlan_tx_init(&t, local, remote, vni, SN_VXLAN_PORT, 64, 0, True, udp_csum, True)
    with nogil:
        ok = sn_vxlan_encap_burst(b.pkts, b.count, &t)
    return ok


def decap_batch(Batch b not None):
    """Decapsulate every live packet of a Batch in place; returns (n_ok, [vni or None])."""
    cdef sn_vxlan_rx *infos = <sn_vxlan_rx *>calloc(max(b.count, 1), sizeof(sn_vxlan_rx))
    cdef int ok, i
    if infos == NULL:
        raise MemoryError()
    try:
        with nogil:
            ok = sn_vxlan_decap_burst(b.pkts, b.count, infos)
        return ok, [infos[i].vni if b.pkts[i].drop == SN_OK else None for i in range(b.count)]
    finally:
        free(infos)


def _ratelimit_trace(uint32_t per_second, uint32_t burst, times_ns):
    """Which of the (monotonic, ns) times a fresh sn_ratelimit lets through (tests)."""
    cdef sn_ratelimit r
    sn_ratelimit_init(&r, per_second, burst)
    return [bool(sn_ratelimit_take(&r, t)) for t in times_ns]


def _bench_encap_batch(Batch b not None, local, remote, uint32_t vni, long rounds):
    """ns per packet of sn_vxlan_encap_burst (hash included) over the batch, repeated."""
    cdef sn_vxlan_tx t
    cdef timespec a, c
    cdef long _r
    cdef int i, n = b.count
    cdef uint32_t off0 = b.headroom
    cdef uint32_t *lens = <uint32_t *>calloc(max(n, 1), sizeof(uint32_t))
    if lens == NULL:
        raise MemoryError()
    sn_vxlan_tx_init(&t, local, remote, vni, SN_VXLAN_PORT, 64, 0, True, False, True)
    for i in range(n):
        lens[i] = b.pkts[i].len
    with nogil:
        clock_gettime(CLOCK_MONOTONIC, &a)
        for _r in range(rounds):
            for i in range(n):
                b.pkts[i].off = off0
                b.pkts[i].len = lens[i]
                b.pkts[i].hash = 0
                b.pkts[i].drop = 0
            sn_vxlan_encap_burst(b.pkts, n, &t)
        clock_gettime(CLOCK_MONOTONIC, &c)
    free(lens)
    return ((c.tv_sec - a.tv_sec) * 1e9 + (c.tv_nsec - a.tv_nsec)) / (rounds * max(n, 1))


def _bench_encap(frame, local, remote, uint32_t vni, long n, bint udp_csum=False):
    """ns per (flow hash + encap) of one frame, over n iterations without the GIL."""
    cdef sn_vxlan_tx t
    cdef _Slot s = _Slot(bytes(frame))
    cdef uint32_t off0 = s.pkt.off
    cdef uint32_t len0 = s.pkt.len
    cdef timespec a, b
    cdef long _i
    cdef uint64_t sink = 0
    sn_vxlan_tx_init(&t, local, remote, vni, SN_VXLAN_PORT, 64, 0, True, udp_csum, True)
    with nogil:
        clock_gettime(CLOCK_MONOTONIC, &a)
        for _i in range(n):
            s.pkt.off = off0
            s.pkt.len = len0
            s.pkt.hash = 0
            sn_vxlan_encap(&s.pkt, &t)
            sink += s.pkt.hash
        clock_gettime(CLOCK_MONOTONIC, &b)
    return ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n
