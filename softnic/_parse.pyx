# cython: language_level=3
"""Frame parsing: Ethernet II with IEEE 802.1Q / 802.1ad tags, IPv4 (RFC 791 section 3.1,
RFC 6864 for fragments), IPv6 with extension headers (RFC 8200 sections 4 and 4.5), TCP
(RFC 9293 section 3.1) and UDP (RFC 768) headers.

The parser locates headers and checks that every length it follows stays inside the
frame; it does not verify checksums (the TX path recomputes them, the RX path's ESP ICV
comes first). Also the Python surface for tests of this module and of softnic/_csum.pxd.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from softnic._csum cimport (
    SN__CSUM_AVX2,
    _sn_csum_fold_raw,
    sn__csum_copy_avx2,
    sn__csum_copy_base,
    sn__csum_sum_avx2,
    sn__csum_sum_base,
    sn_csum,
    sn_csum_copy,
    sn_csum_finish,
    sn_csum_partial,
    sn_csum_pseudo4,
    sn_csum_pseudo6,
    sn_csum_update16,
    sn_csum_update32,
)
from softnic._pkt cimport SN_DROP_MALFORMED_L2, SN_DROP_MALFORMED_L3, SN_DROP_MALFORMED_L4
from softnic._proto cimport (
    SN_ETH_HLEN,
    SN_ETH_P_8021AD,
    SN_ETH_P_8021Q,
    SN_ETH_P_IPV4,
    SN_ETH_P_IPV6,
    SN_ETH_P_QINQ_OLD,
    SN_ETH_TYPE_OFF,
    SN_IP4_FRAG,
    SN_IP4_HLEN,
    SN_IP4_MF,
    SN_IP4_OFFMASK,
    SN_IP4_PROTO,
    SN_IP4_TOT_LEN,
    SN_IP6_FRAG_HLEN,
    SN_IP6_HLEN,
    SN_IP6_MAX_EXT,
    SN_IP6_NXT,
    SN_IP6_PLEN,
    SN_IPPROTO_FRAGMENT,
    SN_IPPROTO_HOPOPTS,
    SN_IPPROTO_TCP,
    SN_IPPROTO_UDP,
    SN_MAX_VLAN_TAGS,
    SN_TCP_DOFF,
    SN_TCP_HLEN,
    SN_UDP_HLEN,
    SN_UDP_LEN,
    sn_has,
    sn_ip6_is_ext,
    sn_ld16,
)

from softnic._batch import DROP_REASONS


cdef inline bint _is_vlan_tpid(uint16_t t) noexcept nogil:
    return t == SN_ETH_P_8021Q or t == SN_ETH_P_8021AD or t == SN_ETH_P_QINQ_OLD


cdef int _parse_l4(const uint8_t *f, uint32_t l4end, sn_hdrs *h) noexcept nogil:
    """TCP/UDP header inside [l4off, l4end). 0 or SN_DROP_MALFORMED_L4. Other protocols
    (ESP, ICMP, ...) are opaque here: l4hdrlen stays 0."""
    cdef uint32_t avail = l4end - h.l4off   # the caller guarantees l4off <= l4end
    cdef uint32_t doff, ulen
    if h.l4proto == SN_IPPROTO_TCP:
        if avail < SN_TCP_HLEN:
            return SN_DROP_MALFORMED_L4
        doff = <uint32_t>(f[h.l4off + SN_TCP_DOFF] >> 4) * 4
        if doff < SN_TCP_HLEN or doff > avail:
            return SN_DROP_MALFORMED_L4
        h.l4hdrlen = <uint16_t>doff
    elif h.l4proto == SN_IPPROTO_UDP:
        if avail < SN_UDP_HLEN:
            return SN_DROP_MALFORMED_L4
        # The UDP length must cover its header and stay inside the IP payload (RFC 768).
        ulen = sn_ld16(f + h.l4off + SN_UDP_LEN)
        if ulen < SN_UDP_HLEN or ulen > avail:
            return SN_DROP_MALFORMED_L4
        h.l4hdrlen = SN_UDP_HLEN
    return 0


cdef int _parse_ip4(const uint8_t *f, uint32_t len, sn_hdrs *h) noexcept nogil:
    """IPv4 header at l3off. 0 or SN_DROP_MALFORMED_L3/L4."""
    cdef uint32_t off = h.l3off
    cdef uint32_t ihl, tot, frag
    if not sn_has(len, off, SN_IP4_HLEN):
        return SN_DROP_MALFORMED_L3
    if (f[off] >> 4) != 4:
        return SN_DROP_MALFORMED_L3
    ihl = <uint32_t>(f[off] & 0x0F) * 4
    tot = sn_ld16(f + off + SN_IP4_TOT_LEN)
    # Bytes past the total length are Ethernet padding (a 60-byte minimum frame); bytes
    # missing before it are a truncated packet.
    if ihl < SN_IP4_HLEN or tot < ihl or tot > len - off:
        return SN_DROP_MALFORMED_L3
    h.ipver = 4
    h.l3len_total = <uint16_t>tot
    h.l4off = <uint16_t>(off + ihl)
    h.l4proto = f[off + SN_IP4_PROTO]
    frag = sn_ld16(f + off + SN_IP4_FRAG)
    if frag & (SN_IP4_MF | SN_IP4_OFFMASK):
        h.is_fragment = 1
        if frag & SN_IP4_OFFMASK:
            return 0        # a later fragment carries no L4 header
    # A first fragment too short for its L4 header is the RFC 1858 tiny-fragment attack:
    # it fails the same check as a truncated packet.
    return _parse_l4(f, off + tot, h)


cdef int _parse_ip6(const uint8_t *f, uint32_t len, sn_hdrs *h) noexcept nogil:
    """IPv6 header and extension header chain at l3off. 0 or SN_DROP_MALFORMED_L3/L4.
    The chain is bounded (SN_IP6_MAX_EXT headers), hop-by-hop is accepted only first
    (RFC 8200 section 4.3), and ESP/AH/anything unknown ends it as the L4 protocol."""
    cdef uint32_t off = h.l3off
    cdef uint32_t end, cur, elen
    cdef uint8_t nxt
    cdef int n = 0
    if not sn_has(len, off, SN_IP6_HLEN):
        return SN_DROP_MALFORMED_L3
    if (f[off] >> 4) != 6:
        return SN_DROP_MALFORMED_L3
    end = SN_IP6_HLEN + <uint32_t>sn_ld16(f + off + SN_IP6_PLEN)
    if end > len - off:
        return SN_DROP_MALFORMED_L3
    if end > 0xFFFF:
        return SN_DROP_MALFORMED_L3   # 40 + payload must fit the 16-bit l3len_total
    h.ipver = 6
    h.l3len_total = <uint16_t>end
    end += off
    cur = off + SN_IP6_HLEN
    nxt = f[off + SN_IP6_NXT]
    while sn_ip6_is_ext(nxt):
        if n == SN_IP6_MAX_EXT or (nxt == SN_IPPROTO_HOPOPTS and n != 0):
            return SN_DROP_MALFORMED_L3
        n += 1
        if not sn_has(end, cur, 2):
            return SN_DROP_MALFORMED_L3
        if nxt == SN_IPPROTO_FRAGMENT:
            elen = SN_IP6_FRAG_HLEN
            if not sn_has(end, cur, elen):
                return SN_DROP_MALFORMED_L3
            if sn_ld16(f + cur + 2) & 0xFFF9:       # offset (13 bits) or M flag
                h.is_fragment = 1
                if sn_ld16(f + cur + 2) & 0xFFF8:
                    if cur + elen > 0xFFFF:
                        return SN_DROP_MALFORMED_L3
                    h.l4proto = f[cur]
                    h.l4off = <uint16_t>(cur + elen)
                    return 0                        # no L4 header in a later fragment
        else:
            elen = (<uint32_t>f[cur + 1] + 1) * 8
            if not sn_has(end, cur, elen):
                return SN_DROP_MALFORMED_L3
        nxt = f[cur]
        cur += elen
    if cur > 0xFFFF:
        return SN_DROP_MALFORMED_L3     # l4off is 16-bit; only a hostile chain gets here
    h.l4proto = nxt
    h.l4off = <uint16_t>cur
    return _parse_l4(f, end, h)


cdef int sn_parse_frame(const uint8_t *f, uint32_t len, sn_hdrs *h) noexcept nogil:
    """Locate the headers of the Ethernet frame f[0:len] into *h (always fully written).

    Reads only f[0:len]; writes only *h. Returns 0, or SN_DROP_MALFORMED_L2 (runt frame,
    more than two VLAN tags, truncated tag), SN_DROP_MALFORMED_L3 (IP version, header
    length, total/payload length beyond the frame, extension chain too long or
    truncated), SN_DROP_MALFORMED_L4 (TCP/UDP header truncated, bad data offset or UDP
    length). Non-IP ethertypes (ARP, LLDP, 802.3 length fields) parse OK with ipver 0.
    """
    cdef uint32_t off = SN_ETH_TYPE_OFF
    cdef uint16_t et
    cdef int tags = 0
    h.l2len = 0
    h.ethertype = 0
    h.l3off = 0
    h.l4off = 0
    h.l3len_total = 0
    h.ipver = 0
    h.l4proto = 0
    h.l4hdrlen = 0
    h.is_fragment = 0
    if len < SN_ETH_HLEN or len > 0xFFFF + 64:
        return SN_DROP_MALFORMED_L2
    et = sn_ld16(f + off)
    while _is_vlan_tpid(et):
        if tags == SN_MAX_VLAN_TAGS or not sn_has(len, off + 4, 2):
            return SN_DROP_MALFORMED_L2
        tags += 1
        off += 4
        et = sn_ld16(f + off)
    off += 2
    h.l2len = <uint16_t>off
    h.l3off = <uint16_t>off
    h.l4off = <uint16_t>off
    h.ethertype = et
    if et == SN_ETH_P_IPV4:
        return _parse_ip4(f, len, h)
    if et == SN_ETH_P_IPV6:
        return _parse_ip6(f, len, h)
    return 0


# ---- Python surface (tests, management plane); never on the data path ----------------

def parse(const uint8_t[::1] frame not None):
    """Parse one Ethernet frame; a dict of sn_hdrs fields, or ValueError(drop reason)."""
    cdef sn_hdrs h
    cdef uint32_t n = <uint32_t>frame.shape[0]
    cdef const uint8_t *p = &frame[0] if n else <const uint8_t *>b""
    cdef int rc
    with nogil:
        rc = sn_parse_frame(p, n, &h)
    if rc:
        raise ValueError(DROP_REASONS[rc])
    return {
        "l2len": h.l2len, "ethertype": h.ethertype, "l3off": h.l3off, "l4off": h.l4off,
        "l3len_total": h.l3len_total, "ipver": h.ipver, "l4proto": h.l4proto,
        "l4hdrlen": h.l4hdrlen, "is_fragment": bool(h.is_fragment),
    }


cdef const uint8_t *_ptr(const uint8_t[::1] b) noexcept:
    return &b[0] if b.shape[0] else <const uint8_t *>b""


def checksum(const uint8_t[::1] data not None):
    """Internet checksum (RFC 1071) of data, as an int in host order."""
    return sn_csum(_ptr(data), <size_t>data.shape[0])


def checksum_chain(chunks):
    """Checksum of the concatenation of chunks, summed chunk by chunk (every chunk but
    the last must be of even length)."""
    cdef uint64_t acc = 0
    cdef const uint8_t[::1] c
    for obj in chunks:
        c = obj
        acc = sn_csum_partial(_ptr(c), <size_t>c.shape[0], acc)
    return sn_csum_finish(acc)


def checksum_copy(const uint8_t[::1] data not None):
    """(copy of data, its checksum) from the one-pass copy-and-checksum."""
    cdef size_t n = <size_t>data.shape[0]
    out = bytearray(n)
    cdef uint8_t[::1] o = out
    cdef uint16_t c = sn_csum_finish(sn_csum_copy(&o[0] if n else NULL, _ptr(data), n, 0))
    return bytes(out), c


def checksum_update16(uint16_t csum, uint16_t old, uint16_t new):
    """RFC 1624 eqn. 3 for one 16-bit word."""
    return sn_csum_update16(csum, old, new)


def checksum_update32(uint16_t csum, uint32_t old, uint32_t new):
    """RFC 1624 eqn. 3 for one 32-bit field."""
    return sn_csum_update32(csum, old, new)


def l4_checksum(const uint8_t[::1] src not None, const uint8_t[::1] dst not None,
                uint8_t proto, const uint8_t[::1] segment not None):
    """Checksum of an L4 segment (its checksum field as given) with the IPv4 or IPv6
    pseudo-header (by the address length)."""
    cdef uint64_t acc
    cdef uint32_t n = <uint32_t>segment.shape[0]
    if src.shape[0] == 4 and dst.shape[0] == 4:
        acc = sn_csum_pseudo4(&src[0], &dst[0], proto, n)
    elif src.shape[0] == 16 and dst.shape[0] == 16:
        acc = sn_csum_pseudo6(&src[0], &dst[0], proto, n)
    else:
        raise ValueError("addresses must be 4 or 16 bytes")
    return sn_csum_finish(sn_csum_partial(_ptr(segment), n, acc))


def checksum_bulk_variants(const uint8_t[::1] data not None):
    """{variant: (folded sum of the 4-byte words, (copy ok, folded sum of the 8-byte
    words))} for each bulk loop this CPU can run; tests compare them with a reference."""
    cdef size_t n = <size_t>data.shape[0]
    out = bytearray(n)
    cdef uint8_t[::1] o = out
    cdef uint8_t *d = &o[0] if n else NULL
    res = {}
    res["base"] = (_sn_csum_fold_raw(sn__csum_sum_base(_ptr(data), n >> 2)),
                   _sn_csum_fold_raw(sn__csum_copy_base(d, _ptr(data), n >> 3)),
                   bytes(out[:n & ~7]) == bytes(data[:n & ~7]))
    if SN__CSUM_AVX2():
        out[:] = bytes(n)
        res["avx2"] = (_sn_csum_fold_raw(sn__csum_sum_avx2(_ptr(data), n >> 2)),
                       _sn_csum_fold_raw(sn__csum_copy_avx2(d, _ptr(data), n >> 3)),
                       bytes(out[:n & ~7]) == bytes(data[:n & ~7]))
    return res
