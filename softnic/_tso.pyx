# cython: language_level=3
"""virtio-net transmit offloads: checksum completion (virtio 1.x section 5.1.6.2,
VIRTIO_NET_HDR_F_NEEDS_CSUM), TCP segmentation of GSO_TCPV4 / GSO_TCPV6 frames (the
segmentation rules of RFC 9293 section 3.1 applied as NICs do: sequence numbers advance,
FIN/PSH only on the last segment, CWR only on the first, as in RFC 3168 section 6.1.2's
note on TSO), IPv4 identification per segment (RFC 6864 section 4.1), and TCP MSS
clamping (RFC 9293 section 3.7.1, RFC 6691).

GSO_UDP (UFO) and GSO_UDP_L4 (USO) frames are refused with SN_DROP_BAD_VNET_HDR for
now: the guest only sends them when those features are offered, and softnic does not
offer them yet.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from softnic._batch cimport Batch
from softnic._csum cimport (
    sn_csum,
    sn_csum_add16,
    sn_csum_copy,
    sn_csum_finish,
    sn_csum_partial,
    sn_csum_update16,
)
from softnic._parse cimport sn_hdrs, sn_parse_frame
from softnic._pkt cimport (
    SN_DROP_BAD_VNET_HDR,
    SN_DROP_MALFORMED_L3,
    SN_DROP_MAX,
    SN_DROP_NO_ROOM,
    SN_PKT_TSO,
    SN_VNET_HDR_LEN,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    sn_pkt,
    sn_vnet_hdr,
)
from softnic._proto cimport (
    SN_IP4_CSUM,
    SN_IP4_DST,
    SN_IP4_HLEN,
    SN_IP4_ID,
    SN_IP4_SRC,
    SN_IP4_TOT_LEN,
    SN_IP6_DST,
    SN_IP6_HLEN,
    SN_IP6_NXT,
    SN_IP6_PLEN,
    SN_IP6_SRC,
    SN_IPPROTO_FRAGMENT,
    SN_IPPROTO_ROUTING,
    SN_IPPROTO_TCP,
    SN_TCP_CSUM,
    SN_TCP_CWR,
    SN_TCP_FIN,
    SN_TCP_FLAGS,
    SN_TCP_HLEN,
    SN_TCP_PSH,
    SN_TCP_SEQ,
    SN_TCP_SYN,
    SN_TCPOLEN_MSS,
    SN_TCPOPT_EOL,
    SN_TCPOPT_MSS,
    SN_TCPOPT_NOP,
    sn_has,
    sn_ld16,
    sn_ld32,
    sn_st16,
    sn_st32,
)

import struct

from softnic._batch import DROP_REASONS


cdef extern from "<endian.h>" nogil:
    uint16_t le16toh(uint16_t)


cdef enum:
    _IPOPT_END = 0
    _IPOPT_NOP = 1
    _IPOPT_LSRR = 131
    _IPOPT_SSRR = 137
    _IP6_RT_MIP6 = 2        # RFC 6275 type 2: one address, the final destination
    _IP6_RT_SRH = 4         # RFC 8754: Segment List[0] is the final destination


# ---- checksum completion --------------------------------------------------------------

cdef int sn_csum_complete(uint8_t *f, uint32_t len, const sn_vnet_hdr *vh) noexcept nogil:
    """Complete a NEEDS_CSUM frame in place: the ones' complement checksum of
    f[csum_start:len] (the guest left the pseudo-header sum in the checksum field) is
    stored big-endian at csum_start + csum_offset. A result of 0 is stored as 0xFFFF
    (equal in ones' complement, and 0 would mean "no checksum" to UDP, RFC 768).

    Like a NIC, it sums to the end of the frame as given (virtio 1.x 5.1.6.2).
    f[0:len] is the Ethernet frame without the vnet header, owned by the caller.
    Returns 0 (also when NEEDS_CSUM is not set: nothing to do) or SN_DROP_BAD_VNET_HDR
    when the field does not lie inside the frame; the frame is untouched then.
    """
    cdef uint32_t start, off
    cdef uint16_t c
    if not (vh.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM):
        return 0
    start = le16toh(vh.csum_start)
    off = le16toh(vh.csum_offset)
    if start + off + 2 > len:      # 16-bit operands: no overflow in 32 bits
        return SN_DROP_BAD_VNET_HDR
    c = sn_csum_finish(sn_csum_partial(f + start, len - start, 0))
    sn_st16(f + start + off, c if c else 0xFFFF)
    return 0


# ---- TSO --------------------------------------------------------------------------------

cdef int _final_dst(const uint8_t *f, const sn_hdrs *h, const uint8_t **dst) noexcept nogil:
    """The destination address the TCP pseudo-header uses (RFC 9293 3.1, RFC 8200 8.1):
    the last hop of an IPv4 source route option or of an IPv6 routing header with
    segments left, else the IP destination. 0, or SN_DROP_MALFORMED_L3 for a malformed
    option list or a routing header type whose final destination we cannot name.
    The headers were bounds-checked by sn_parse_frame (all of f[l3off:l4off] is in)."""
    cdef uint32_t i, end, olen, elen
    cdef uint8_t kind, nxt
    if h.ipver == 4:
        dst[0] = f + h.l3off + SN_IP4_DST
        i = h.l3off + SN_IP4_HLEN
        end = h.l4off
        while i < end:
            kind = f[i]
            if kind == _IPOPT_END:
                break
            if kind == _IPOPT_NOP:
                i += 1
                continue
            if i + 1 >= end:
                return SN_DROP_MALFORMED_L3
            olen = f[i + 1]
            if olen < 2 or olen > end - i:
                return SN_DROP_MALFORMED_L3
            if kind == _IPOPT_LSRR or kind == _IPOPT_SSRR:
                # type, length, pointer, then route data; the last address is the target
                if olen < 7:
                    return SN_DROP_MALFORMED_L3
                dst[0] = f + i + olen - 4
            i += olen
        return 0
    dst[0] = f + h.l3off + SN_IP6_DST
    i = h.l3off + SN_IP6_HLEN
    nxt = f[h.l3off + SN_IP6_NXT]
    while i < h.l4off:
        elen = 8 if nxt == SN_IPPROTO_FRAGMENT else (<uint32_t>f[i + 1] + 1) * 8
        if nxt == SN_IPPROTO_ROUTING and f[i + 3] != 0:
            if (f[i + 2] != _IP6_RT_MIP6 and f[i + 2] != _IP6_RT_SRH) or elen < 24:
                return SN_DROP_MALFORMED_L3
            dst[0] = f + i + 8
        nxt = f[i]
        i += elen
    return 0


cdef int sn_tso_segment(const uint8_t *f, uint32_t len, const sn_vnet_hdr *vh,
                        uint32_t mss_cap, sn_pkt *out, uint32_t nout,
                        uint32_t *produced) noexcept nogil:
    """Split the GSO_TCPV4/GSO_TCPV6 Ethernet frame f[0:len] (no vnet header) into
    segments of at most mss = min(gso_size, mss_cap) payload bytes (mss_cap 0: no cap).

    Segment i goes to out[i].data + out[i].off (the caller sets off and cap; this sets
    len and ORs SN_PKT_TSO into flags). Each segment carries a copy of all the headers
    (L2 incl. VLAN tags, IP incl. options / extension headers, TCP incl. options) with
    IPv4 total length, ID (+i) and header checksum, or the IPv6 payload length; TCP
    sequence + i*mss; FIN/PSH only on the last, CWR only on the first segment; TCP
    checksum computed while the payload is copied. Bytes after the IP total length
    (Ethernet padding) are not part of any segment. The ECN bit of gso_type needs no
    extra work: CWR is cleared after the first segment either way.

    f is read only; the caller owns f and out. *produced is the number of segments
    written on success, 0 on failure, except for SN_DROP_NO_ROOM because nout is too
    small, where it is the number of segments needed (nothing written).
    Returns 0, or: SN_DROP_BAD_VNET_HDR (gso_type not TCPV4/TCPV6 incl. UDP/UDP_L4, IP
    version not that of gso_type, not TCP, a fragment, hdr_len below the parsed headers
    or beyond the frame, gso_size < SN_TSO_MIN_MSS); SN_DROP_MALFORMED_L2/L3/L4 from
    the parser or the route options; SN_DROP_NO_ROOM (nout too small, or a segment does
    not fit its out slot; nothing written in either case).
    """
    cdef sn_hdrs h
    cdef uint8_t gso = vh.gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    cdef uint32_t hdr_len = le16toh(vh.hdr_len)
    cdef uint32_t mss = le16toh(vh.gso_size)
    cdef uint32_t hl, paylen, nseg, i, chunk, seglen, pos, seq0, ihl
    cdef uint16_t id0
    cdef uint8_t fl0, fl
    cdef const uint8_t *dst
    cdef uint64_t base, acc
    cdef uint8_t *d
    cdef uint8_t *t
    cdef sn_pkt *o
    cdef int rc
    produced[0] = 0
    if gso != VIRTIO_NET_HDR_GSO_TCPV4 and gso != VIRTIO_NET_HDR_GSO_TCPV6:
        return SN_DROP_BAD_VNET_HDR
    rc = sn_parse_frame(f, len, &h)
    if rc:
        return rc
    if (h.ipver != (4 if gso == VIRTIO_NET_HDR_GSO_TCPV4 else 6)
            or h.l4proto != SN_IPPROTO_TCP or h.is_fragment):
        return SN_DROP_BAD_VNET_HDR
    hl = <uint32_t>h.l4off + h.l4hdrlen
    # virtio 1.x 5.1.6.2: without GUEST_HDRLEN, hdr_len is a hint "not less than" the
    # headers (Linux puts skb_headlen there); below the headers it is nonsense.
    if hdr_len < hl or hdr_len > len:
        return SN_DROP_BAD_VNET_HDR
    if mss < SN_TSO_MIN_MSS:
        return SN_DROP_BAD_VNET_HDR
    if mss_cap and mss_cap < mss:
        mss = mss_cap
    paylen = <uint32_t>h.l3off + h.l3len_total - hl   # parser: l4off + l4hdrlen <= IP end
    nseg = (paylen + mss - 1) // mss if paylen else 1
    if nseg > nout:
        produced[0] = nseg
        return SN_DROP_NO_ROOM
    for i in range(nseg):
        chunk = paylen - i * mss if i == nseg - 1 else mss
        if out[i].off > out[i].cap or hl + chunk > out[i].cap - out[i].off:
            return SN_DROP_NO_ROOM
    rc = _final_dst(f, &h, &dst)
    if rc:
        return rc

    # Pseudo-header without its length, which differs per segment.
    if h.ipver == 4:
        ihl = <uint32_t>h.l4off - h.l3off
        id0 = sn_ld16(f + h.l3off + SN_IP4_ID)
        base = sn_csum_partial(f + h.l3off + SN_IP4_SRC, 4, 0)
        base = sn_csum_partial(dst, 4, base)
    else:
        ihl = 0
        id0 = 0
        base = sn_csum_partial(f + h.l3off + SN_IP6_SRC, 16, 0)
        base = sn_csum_partial(dst, 16, base)
    base = sn_csum_add16(base, SN_IPPROTO_TCP)
    seq0 = sn_ld32(f + h.l4off + SN_TCP_SEQ)
    fl0 = f[h.l4off + SN_TCP_FLAGS]

    pos = hl
    for i in range(nseg):
        o = &out[i]
        d = o.data + o.off
        chunk = paylen - i * mss if i == nseg - 1 else mss
        seglen = hl + chunk
        memcpy(d, f, hl)
        if h.ipver == 4:
            sn_st16(d + h.l3off + SN_IP4_TOT_LEN, <uint16_t>(seglen - h.l3off))
            sn_st16(d + h.l3off + SN_IP4_ID, <uint16_t>(id0 + i))
            sn_st16(d + h.l3off + SN_IP4_CSUM, 0)
            sn_st16(d + h.l3off + SN_IP4_CSUM, sn_csum(d + h.l3off, ihl))
        else:
            sn_st16(d + h.l3off + SN_IP6_PLEN, <uint16_t>(seglen - h.l3off - SN_IP6_HLEN))
        t = d + h.l4off
        sn_st32(t + SN_TCP_SEQ, seq0 + i * mss)
        fl = fl0
        if i != nseg - 1:
            fl &= ~(SN_TCP_FIN | SN_TCP_PSH)
        if i != 0:
            fl &= ~SN_TCP_CWR
        t[SN_TCP_FLAGS] = fl
        sn_st16(t + SN_TCP_CSUM, 0)
        acc = sn_csum_add16(base, <uint16_t>(h.l4hdrlen + chunk))
        acc = sn_csum_partial(t, h.l4hdrlen, acc)
        acc = sn_csum_copy(d + hl, f + pos, chunk, acc)
        sn_st16(t + SN_TCP_CSUM, sn_csum_finish(acc))
        o.len = seglen
        o.flags |= SN_PKT_TSO
        pos += chunk
    produced[0] = nseg
    return 0


# ---- MSS clamping -----------------------------------------------------------------------

cdef int sn_tcp_mss_clamp(uint8_t *f, uint32_t len, const sn_hdrs *h,
                          uint16_t mss) noexcept nogil:
    """Lower the MSS option of a SYN (or SYN-ACK) in f[0:len] to mss and update the TCP
    checksum incrementally (RFC 1624 eqn. 3). *h is sn_parse_frame's result for this
    frame. The checksum must be complete (call after sn_csum_complete: a NEEDS_CSUM
    frame's field holds only the pseudo-header sum, which the MSS is not part of).
    Changes f only when it returns 1; 0 = not TCP, not SYN, no MSS option, MSS already
    <= mss, or a malformed option list (left for the receiver to judge)."""
    cdef uint8_t *t
    cdef uint32_t i, end, olen
    cdef uint16_t old, c
    if h.ipver == 0 or h.l4proto != SN_IPPROTO_TCP or h.l4hdrlen < SN_TCP_HLEN:
        return 0
    if not sn_has(len, h.l4off, h.l4hdrlen):
        return 0
    t = f + h.l4off
    if not (t[SN_TCP_FLAGS] & SN_TCP_SYN):
        return 0
    i = SN_TCP_HLEN
    end = h.l4hdrlen
    while i < end:
        if t[i] == SN_TCPOPT_EOL:
            break
        if t[i] == SN_TCPOPT_NOP:
            i += 1
            continue
        if i + 1 >= end:
            break
        olen = t[i + 1]
        if olen < 2 or olen > end - i:
            break
        if t[i] == SN_TCPOPT_MSS and olen == SN_TCPOLEN_MSS:
            old = sn_ld16(t + i + 2)
            if old <= mss:
                return 0
            sn_st16(t + i + 2, mss)
            c = sn_ld16(t + SN_TCP_CSUM)
            if (i + 2) & 1:
                # At an odd offset the two bytes fall in different 16-bit words, where
                # they weigh as the byte-swapped value.
                c = sn_csum_update16(c, _bswap16(old), _bswap16(mss))
            else:
                c = sn_csum_update16(c, old, mss)
            sn_st16(t + SN_TCP_CSUM, c)
            return 1
        i += olen
    return 0


cdef inline uint16_t _bswap16(uint16_t v) noexcept nogil:
    return <uint16_t>((v >> 8) | (v << 8))


# ---- Python surface (tests, benchmarks) -------------------------------------------------

def make_vnet_hdr(int flags=0, int gso_type=0, int hdr_len=0, int gso_size=0,
                  int csum_start=0, int csum_offset=0):
    """A 12-byte little-endian virtio-net header (num_buffers 0)."""
    return struct.pack("<BBHHHHH", flags, gso_type, hdr_len, gso_size, csum_start,
                       csum_offset, 0)


cdef int _load_vnet(const uint8_t[::1] b, sn_vnet_hdr *vh) except -1:
    if b.shape[0] < SN_VNET_HDR_LEN:
        raise ValueError(DROP_REASONS[SN_DROP_BAD_VNET_HDR])
    memcpy(vh, &b[0], SN_VNET_HDR_LEN)
    return 0


def csum_complete(const uint8_t[::1] vnet_hdr not None, const uint8_t[::1] frame not None):
    """The frame with its NEEDS_CSUM checksum completed; ValueError(drop reason)."""
    cdef sn_vnet_hdr vh
    cdef int rc
    _load_vnet(vnet_hdr, &vh)
    buf = bytearray(frame)
    cdef uint8_t[::1] b = buf
    cdef uint8_t *p = &b[0] if b.shape[0] else NULL
    cdef uint32_t n = <uint32_t>b.shape[0]
    if p == NULL:
        if vh.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            raise ValueError(DROP_REASONS[SN_DROP_BAD_VNET_HDR])
        return b""
    with nogil:
        rc = sn_csum_complete(p, n, &vh)
    if rc:
        raise ValueError(DROP_REASONS[rc])
    return bytes(buf)


def segment(const uint8_t[::1] vnet_hdr not None, const uint8_t[::1] frame not None,
            uint32_t mss_cap=0):
    """TSO of one frame: the list of segments; ValueError(drop reason name) if refused."""
    cdef sn_vnet_hdr vh
    cdef uint32_t produced = 0
    cdef uint32_t n = <uint32_t>frame.shape[0]
    cdef const uint8_t *p = &frame[0] if n else <const uint8_t *>b""
    cdef int rc
    cdef Batch out
    cdef sn_hdrs h
    cdef uint32_t mss
    _load_vnet(vnet_hdr, &vh)
    # First pass with no room: validates everything and says how many segments.
    with nogil:
        rc = sn_tso_segment(p, n, &vh, mss_cap, NULL, 0, &produced)
    if rc != SN_DROP_NO_ROOM:
        raise ValueError(DROP_REASONS[rc if rc else SN_DROP_NO_ROOM])
    # Slots just big enough for headers + mss (the frame parsed in the first pass).
    sn_parse_frame(p, n, &h)
    mss = le16toh(vh.gso_size)
    if mss_cap and mss_cap < mss:
        mss = mss_cap
    out = Batch(produced, slot_size=min(n, <uint32_t>h.l4off + h.l4hdrlen + mss) + 64,
                headroom=64)
    with nogil:
        rc = sn_tso_segment(p, n, &vh, mss_cap, out.pkts, produced, &produced)
    if rc:
        raise ValueError(DROP_REASONS[rc])
    out.count = produced
    return [out.get(i) for i in range(produced)]


cdef uint32_t _segment_batch(Batch inb, Batch outb, uint32_t mss_cap,
                             uint32_t *drops) noexcept nogil:
    """Offload every packet of inb (12-byte vnet header + frame) into outb from
    outb.count on: GSO frames are segmented, others copied and checksum-completed.
    Each input packet's drop field gets its reason. Returns the packets appended."""
    cdef int i, j = outb.count
    cdef int k
    cdef sn_pkt *p
    cdef sn_pkt *o
    cdef sn_vnet_hdr vh
    cdef uint8_t *f
    cdef uint32_t flen, produced
    cdef int rc
    for k in range(j, outb.size):
        outb.pkts[k].off = outb.headroom
        outb.pkts[k].flags = 0
        outb.pkts[k].drop = 0
    for i in range(inb.count):
        p = &inb.pkts[i]
        if p.len < SN_VNET_HDR_LEN:
            rc = SN_DROP_BAD_VNET_HDR
        else:
            memcpy(&vh, p.data + p.off, SN_VNET_HDR_LEN)
            f = p.data + p.off + SN_VNET_HDR_LEN
            flen = p.len - SN_VNET_HDR_LEN
            if vh.gso_type == VIRTIO_NET_HDR_GSO_NONE:
                if j >= outb.size or flen > outb.pkts[j].cap - outb.pkts[j].off:
                    rc = SN_DROP_NO_ROOM
                else:
                    o = &outb.pkts[j]
                    memcpy(o.data + o.off, f, flen)
                    rc = sn_csum_complete(o.data + o.off, flen, &vh)
                    if rc == 0:
                        o.len = flen
                        o.port = p.port
                        j += 1
            else:
                rc = sn_tso_segment(f, flen, &vh, mss_cap, &outb.pkts[j],
                                    <uint32_t>(outb.size - j), &produced)
                if rc == 0:
                    for k in range(j, j + <int>produced):
                        outb.pkts[k].port = p.port
                    j += <int>produced
        p.drop = <uint16_t>rc
        drops[rc] += 1
    produced = <uint32_t>(j - outb.count)
    outb.count = j
    return produced


def segment_batch(Batch inb not None, Batch outb not None, uint32_t mss_cap=0):
    """TX offload of a batch (each packet = 12-byte vnet header + frame) into outb,
    appended after outb.count. Returns (n_out, {drop reason name: count})."""
    cdef uint32_t drops[SN_DROP_MAX]
    cdef uint32_t n
    cdef int r
    for r in range(SN_DROP_MAX):
        drops[r] = 0
    with nogil:
        n = _segment_batch(inb, outb, mss_cap, drops)
    return n, {DROP_REASONS[r]: drops[r] for r in range(1, SN_DROP_MAX) if drops[r]}


def mss_clamp(const uint8_t[::1] frame not None, uint16_t mss):
    """The frame with a SYN's MSS option lowered to mss (unchanged otherwise)."""
    cdef sn_hdrs h
    buf = bytearray(frame)
    cdef uint8_t[::1] b = buf
    cdef uint32_t n = <uint32_t>b.shape[0]
    if n == 0 or sn_parse_frame(&b[0], n, &h) != 0:
        return bytes(buf)
    sn_tcp_mss_clamp(&b[0], n, &h, mss)
    return bytes(buf)


cdef double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


def bench_tso(const uint8_t[::1] vnet_frame not None, uint32_t mss_cap, int iters=2000):
    """TSO of one frame (vnet header + frame) `iters` times into a Batch, and, in the
    same run, memcpy of the same output bytes into the same slots. Returns a dict of
    GB/s (frame bytes per second) for both, and the segment count."""
    cdef Batch inb = Batch(1, slot_size=vnet_frame.shape[0] + 128, headroom=64)
    cdef Batch outb = Batch(64)
    cdef uint32_t drops[SN_DROP_MAX]
    cdef uint32_t n = 0
    cdef int _it, k
    cdef double t0, t_tso, t_cpy
    cdef uint32_t flen = <uint32_t>vnet_frame.shape[0] - SN_VNET_HDR_LEN
    cdef uint32_t pos, ln
    cdef const uint8_t *src
    for k in range(SN_DROP_MAX):
        drops[k] = 0
    inb.push(vnet_frame)
    with nogil:
        t0 = _now()
        for _it in range(iters):
            outb.count = 0
            n = _segment_batch(inb, outb, mss_cap, drops)
        t_tso = _now() - t0
    if n == 0:
        raise ValueError(DROP_REASONS[inb.pkts[0].drop])
    with nogil:
        t0 = _now()
        src = inb.pkts[0].data + inb.pkts[0].off + SN_VNET_HDR_LEN
        for _it in range(iters):
            pos = 0
            for k in range(<int>n):
                # the same bytes out, read from across the frame as TSO reads them
                ln = outb.pkts[k].len
                memcpy(outb.pkts[k].data + outb.pkts[k].off,
                       src + (pos if pos + ln <= flen else flen - ln), ln)
                pos += ln
        t_cpy = _now() - t0
    return {"segments": n, "frame_bytes": flen,
            "tso_gbps": flen * iters / t_tso / 1e9,
            "memcpy_gbps": flen * iters / t_cpy / 1e9}
