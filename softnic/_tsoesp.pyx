# cython: language_level=3
"""TSO, ESP and VXLAN in one pass over a GSO frame, for the TX path's common cases
(DESIGN.md): host-terminated, "the NIC segments the overlay TCP packet first, then
encrypts each segment, then encapsulates it in VXLAN"; device-terminated, TSO, then
VXLAN, then ESP with the uplink SA around the VXLAN packet. The output is the same, byte
for byte, as softnic._tso.sn_tso_segment followed per segment by softnic._esp.
sn_esp_encap and softnic._vxlan.sn_vxlan_encap in the pipeline's order
(tests/test_tsoesp.py holds the two side by side).

Why a second path: run stage by stage, every segment is copied out of the frame (with
its TCP checksum), then its headers are moved and rebuilt twice (ESP, VXLAN), each stage
re-checking what the one before wrote: that was a third of the per-packet cost beside
AES-GCM. Here the whole header stack (outer IPv4/UDP/VXLAN, inner Ethernet, ESP tunnel
IPv4 or the transport-mode IP header, optional UDP encapsulation of RFC 3948, ESP header
and IV, inner IPv4 and TCP) is built once per frame as a template, with the partial
checksum of every header; per segment the template is copied and only lengths, IP IDs,
the TCP sequence number and flags, the ESP sequence number and IV and the checksums
(incremental from the template's sums, RFC 1071 / RFC 1624) are patched. The flow hash,
sequence-number reservation and SA accounting happen once per frame, not per segment.

The payload is copied into the output slot with its TCP checksum summed in the same
pass (sn_csum_copy), then sealed in place by one one-shot AES-GCM call. Measured here
(issue 2), and so not done: encrypting straight from the frame through ipsec-mb's
init / update / finalize calls saves the copy but costs ~30 ns more per segment (init
and finalize are far dearer than inside the one-shot), and a checksum-only pass costs
as much as the copy, the frame being read from beyond L2 either way. What does help is
prefetching the next segment's payload while this one is encrypted (-8 ns per segment).

Covered: GSO_TCPV4 frames without IPv4 options; one outbound AEAD SA (8-byte IV, 4-byte
alignment), in tunnel mode over IPv4 or in transport mode, with or without UDP
encapsulation: the VF's (host-terminated, no uplink ESP) or the uplink's (device-
terminated, no VF SA); one IPv4 VTEP with DF set and no outer UDP checksum (the
defaults). Everything else (IPv6, CBC, both SAs at once, flooding, local delivery)
answers SN_TSOESP_GENERIC and takes the stage-by-stage path.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from softnic._crypto cimport xform_seal
from softnic._csum cimport sn_csum_add16, sn_csum_copy, sn_csum_finish, sn_csum_partial
from softnic._esp cimport (
    SN_ESP_TUNNEL,
    sn_esp_account_out,
    sn_esp_seq_reserve,
    sn_sa,
)
from softnic._parse cimport sn_hdrs
from softnic._pkt cimport (
    SN_DROP_CRYPTO,
    SN_DROP_SEQ_EXHAUSTED,
    SN_OK,
    SN_PKT_ESP,
    SN_PKT_TSO,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV4,
    sn_pkt,
    sn_vnet_hdr,
)
from softnic._proto cimport (
    SN_IP4_CSUM,
    SN_IP4_ID,
    SN_IP4_TOT_LEN,
    SN_IPPROTO_ESP,
    SN_IPPROTO_TCP,
    SN_IPPROTO_UDP,
    SN_TCP_CSUM,
    SN_TCP_CWR,
    SN_TCP_FIN,
    SN_TCP_FLAGS,
    SN_TCP_PSH,
    SN_TCP_SEQ,
    sn_ld16,
    sn_ld32,
    sn_st16,
    sn_st32,
)
from softnic._tso cimport SN_TSO_MIN_MSS
from softnic._vxlan cimport (
    SN_AF_INET,
    SN_VXLAN_F_DF,
    SN_VXLAN_F_ECN,
    SN_VXLAN_F_UDP_CSUM,
    SN_VXLAN_PORT,
    sn_flow_hash,
    sn_flow_port,
    sn_vxlan_tx,
)


cdef extern from "<endian.h>" nogil:
    uint16_t le16toh(uint16_t)


cdef extern from *:
    """
    /* Ask for the next segment's payload while this one is encrypted: AES-GCM keeps
       the core busy and the loads from a frame that left L2 overlap it (measured: -8 ns
       per 1.4 KB segment here; prefetching the output slot too, or two segments ahead,
       measured no better). A prefetch never faults, so n may run past the frame. */
    static inline void sn_tsoesp_prefetch(const uint8_t *src, uint32_t n) {
        uint32_t k;
        for (k = 0; k < n; k += 64)
            __builtin_prefetch(src + k, 0, 3);
    }
    static inline void sn_tsoesp_add64(uint64_t *p, uint64_t v) {
        __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
    /* Frames this path took on the calling thread (frames()): per thread, so TX
       workers never share the line. */
    static __thread uint64_t sn_tsoesp_frames;
    static inline void sn_tsoesp_count(void) { sn_tsoesp_frames++; }
    static inline uint64_t sn_tsoesp_counted(void) { return sn_tsoesp_frames; }
    """
    void _atomic_add "sn_tsoesp_add64"(uint64_t *p, uint64_t v) noexcept nogil
    void _count "sn_tsoesp_count"() noexcept nogil
    uint64_t _counted "sn_tsoesp_counted"() noexcept nogil
    void _prefetch "sn_tsoesp_prefetch"(const uint8_t *src, uint32_t n) noexcept nogil


cdef bint _enabled = True      # set_enabled() below; read without the GIL

cdef enum:
    _VX = 36                  # outer IPv4 20 + UDP 8 + VXLAN 8
    _IPPROTO_IPIP = 4
    # Template bytes, copied whole per segment (a fixed size: a few vector moves). The
    # longest header stack is 36 + L2 22 + 20 + 8 + 16 + inner IPv4 20 + TCP 60 = 182.
    _TMPL = 192


cdef struct _geo:
    # One frame's header geometry (offsets into a finished packet), for _put_lengths.
    uint32_t l2, thl, udp, icv, pl_extra, o_vx, o_vu, o_ip, o_iip, o_esp
    uint64_t vxbase
    bint device, tunnel


cdef inline uint32_t _put_lengths(uint8_t *d, const _geo *g, uint32_t c, uint32_t *pad,
                                  uint16_t *tip_tot, uint16_t *iip_tot) noexcept nogil:
    """Write the length fields of a packet carrying c payload bytes at d (the template,
    or a packet copied from it): VXLAN's IPv4 length and checksum, its UDP length, the
    ESP tunnel IPv4 and inner IPv4 lengths, the UDP-encap length. Returns the ESP length
    (header, IV, ciphertext, ICV); *pad, and the two IPv4 lengths for their checksums."""
    cdef uint32_t fl_len = g.l2 + 20 + g.thl + c         # the guest's segment, L2 included
    cdef uint32_t pl = g.pl_extra + g.thl + c
    cdef uint32_t esp_total, vx_tot
    pad[0] = (0 - (pl + 2)) & 3
    esp_total = 16 + pl + pad[0] + 2 + g.icv
    if g.device and not g.tunnel:
        vx_tot = 20 + g.udp + esp_total
    elif g.device:
        vx_tot = _VX + fl_len
    else:
        vx_tot = g.o_esp + esp_total
    sn_st16(d + g.o_vx + 2, <uint16_t>vx_tot)
    sn_st16(d + g.o_vx + 10, sn_csum_finish(sn_csum_add16(g.vxbase, <uint16_t>vx_tot)))
    sn_st16(d + g.o_vu + 4, <uint16_t>(16 + fl_len if g.device else vx_tot - 20))
    tip_tot[0] = <uint16_t>(20 + g.udp + esp_total)
    if g.tunnel:
        sn_st16(d + g.o_ip + 2, tip_tot[0])
    iip_tot[0] = <uint16_t>(20 + g.thl + c if g.tunnel or g.device else tip_tot[0])
    sn_st16(d + g.o_iip + SN_IP4_TOT_LEN, iip_tot[0])
    if g.udp:
        sn_st16(d + g.o_ip + 24, <uint16_t>(g.udp + esp_total))
    return esp_total


cdef inline uint64_t _trailer(uint32_t pad, uint8_t nxt) noexcept nogil:
    """The ESP trailer (RFC 4303 section 2.4) for pad <= 3 as 8 bytes to store at once:
    pad bytes 1, 2, 3, pad length, next header; the bytes after it land where the ICV
    is written next."""
    cdef uint8_t b[8]
    cdef uint64_t v
    memset(b, 0, 8)
    b[0] = 1
    b[1] = 2
    b[2] = 3
    b[pad] = <uint8_t>pad
    b[pad + 1] = nxt
    memcpy(&v, b, 8)
    return v


cdef int sn_tso_esp_vxlan(const uint8_t *f, uint32_t flen, const sn_vnet_hdr *vh,
                          const sn_hdrs *h, uint32_t mss_cap, sn_sa *sa, bint device,
                          uint32_t hash, const sn_vxlan_tx *tx, uint32_t vtep, sn_pkt *out,
                          uint32_t nout, uint32_t headroom, uint32_t *produced,
                          uint64_t *drops, uint64_t *drops2) noexcept nogil:
    """See softnic/_tsoesp.pxd. Ownership: f is read only; out's slots and the SA are
    the caller's; the SA is shared (its sequence numbers and counters are updated
    atomically, once per frame)."""
    cdef uint8_t t[_TMPL]
    cdef uint32_t l2 = h.l2len, l3 = h.l3off, l4 = h.l4off, thl = h.l4hdrlen
    cdef uint32_t mss = le16toh(vh.gso_size), hdr_len = le16toh(vh.hdr_len)
    cdef uint32_t udp = 8 if sa.encap else 0
    cdef bint tunnel = sa.mode == SN_ESP_TUNNEL
    cdef uint32_t o_vx, o_vu, o_eth, o_ip, o_esp, o_iv, o_iip, o_tcp, o_pay, o_enc
    cdef uint32_t paylen, nseg, k, i, c, pl, pad, ct_len, esp_total, off, pos
    cdef uint32_t icv = sa.icv_len, seq_tcp, seq0, n_ok = 0, pl_extra
    cdef uint16_t id0
    cdef uint8_t fl0, fl, tos, vtos, ecn, nxt
    cdef uint64_t first, seq, vxbase, tbase, ibase, tcpbase, acc, nbytes = 0
    cdef uint8_t *d
    cdef sn_pkt *p
    cdef _geo g
    cdef uint32_t c_full, pad_full, esp_full
    cdef uint16_t tip_tot, iip_tot
    cdef uint64_t tb_full, ib_full, tb, ib, trail_full, trail
    produced[0] = 0

    # --- covered? (nothing changes before this is settled) ---
    if not _enabled:
        return SN_TSOESP_GENERIC
    if ((vh.gso_type & ~VIRTIO_NET_HDR_GSO_ECN) != VIRTIO_NET_HDR_GSO_TCPV4
            or h.ipver != 4 or h.l4proto != SN_IPPROTO_TCP or h.is_fragment
            or l4 - l3 != 20 or thl < 20 or l2 < 14 or l2 > 22):
        return SN_TSOESP_GENERIC
    if (sa.dead or sa.ivgen != NULL or sa.iv_len != 8 or sa.block != 4 or icv > 16 or icv < 8
            or (tunnel and sa.family != 4)):
        return SN_TSOESP_GENERIC
    if (tx.family != SN_AF_INET or not (tx.flags & SN_VXLAN_F_DF)
            or (tx.flags & SN_VXLAN_F_UDP_CSUM)):
        return SN_TSOESP_GENERIC
    if hdr_len < l4 + thl or hdr_len > flen or mss < SN_TSO_MIN_MSS:
        return SN_TSOESP_GENERIC
    if mss_cap and mss_cap < mss:
        mss = mss_cap
    paylen = <uint32_t>l3 + h.l3len_total - l4 - thl
    if paylen == 0:
        return SN_TSOESP_GENERIC
    nseg = (paylen + mss - 1) // mss

    # Where everything goes in a finished packet. Host-terminated (the VF's SA):
    #   [VXLAN IPv4][UDP][VXLAN][L2] [ESP IPv4 (tunnel) | inner IPv4 (transport)]
    #   [UDP-encap?][ESP][IV] ([inner IPv4] in tunnel mode)[TCP][payload][trailer][ICV]
    # Device-terminated (the uplink SA, around the VXLAN packet):
    #   [ESP IPv4 (tunnel) | VXLAN IPv4 (transport)][UDP-encap?][ESP][IV]
    #   ([VXLAN IPv4] in tunnel mode)[UDP][VXLAN][L2][inner IPv4][TCP][payload][...]
    if device:
        o_ip = 0
        o_esp = 20 + udp
        o_iv = o_esp + 8
        o_enc = o_iv + 8
        o_vx = o_enc if tunnel else 0
        o_vu = o_vx + 20 if tunnel else o_enc
        o_eth = o_vu + 16
        o_iip = o_eth + l2
        o_tcp = o_iip + 20
        # ESP protects the whole VXLAN packet (tunnel) or what follows its IPv4 header
        pl_extra = _VX + l2 + 20 if tunnel else 16 + l2 + 20
        nxt = _IPPROTO_IPIP if tunnel else SN_IPPROTO_UDP
    else:
        o_vx = 0
        o_vu = 20
        o_eth = _VX
        o_ip = o_eth + l2
        o_esp = o_ip + 20 + udp
        o_iv = o_esp + 8
        o_enc = o_iv + 8
        o_iip = o_enc if tunnel else o_ip
        o_tcp = o_iip + 20 if tunnel else o_enc
        pl_extra = 20 if tunnel else 0
        nxt = _IPPROTO_IPIP if tunnel else SN_IPPROTO_TCP
    o_pay = o_tcp + thl
    if o_pay > _TMPL:
        return SN_TSOESP_GENERIC
    # Packets start where the stage-by-stage path leaves them: the frame at `headroom`,
    # pushed down by VXLAN and by what ESP inserts in front of what it protects.
    if headroom + l2 + 20 < o_tcp:
        return SN_TSOESP_GENERIC
    off = headroom + l2 + 20 - o_tcp
    # Short of slots or slot room: the generic stages name the drop.
    if nseg > nout:
        return SN_TSOESP_GENERIC
    c = mss if nseg > 1 else paylen
    pl = pl_extra + thl + c
    pad = (0 - (pl + 2)) & 3
    if o_enc + pl + pad + 2 + icv > 65535:      # 16-bit lengths: the generic stages refuse
        return SN_TSOESP_GENERIC
    if (<uint64_t>off + o_enc + pl + pad + 2 + icv > out[0].cap
            or <uint64_t>off + _TMPL > out[0].cap):
        return SN_TSOESP_GENERIC
    for i in range(1, nseg):
        if out[i].cap != out[0].cap:
            return SN_TSOESP_GENERIC

    # --- the template: every header, with the per-segment fields zero ---
    memset(t, 0, _TMPL)
    tos = f[l3 + 1]
    ecn = tos & 3
    vtos = ((tx.tos & 0xFC) | ecn) if tx.flags & SN_VXLAN_F_ECN else tx.tos
    # VXLAN's IPv4 (RFC 791), DF and ID 0 (RFC 6864 section 4.1), as sn_vxlan_encap; in
    # device transport mode ESP follows it (RFC 4303 section 3.1.1)
    t[o_vx] = 0x45
    t[o_vx + 1] = vtos
    t[o_vx + 6] = 0x40
    t[o_vx + 8] = tx.ttl if tx.ttl else 64
    t[o_vx + 9] = SN_IPPROTO_UDP
    if device and not tunnel:
        t[o_vx + 9] = SN_IPPROTO_UDP if udp else SN_IPPROTO_ESP
    memcpy(t + o_vx + 12, tx.local, 4)
    memcpy(t + o_vx + 16, tx.remote, 4)
    vxbase = sn_csum_partial(t + o_vx, 20, 0)
    # VXLAN's UDP (source port from the flow hash, below; checksum 0) and header (RFC 7348)
    sn_st16(t + o_vu + 2, tx.dport if tx.dport else SN_VXLAN_PORT)
    sn_st32(t + o_vu + 8, 0x08000000u)
    sn_st32(t + o_vu + 12, (tx.vni & 0xFFFFFFu) << 8)
    # inner Ethernet, and the guest's IPv4 and TCP headers
    memcpy(t + o_eth, f, l2)
    memcpy(t + o_iip, f + l3, 20)
    memcpy(t + o_tcp, f + l4, thl)
    id0 = sn_ld16(f + l3 + SN_IP4_ID)
    t[o_iip + SN_IP4_TOT_LEN] = 0
    t[o_iip + SN_IP4_TOT_LEN + 1] = 0
    t[o_iip + SN_IP4_ID] = 0
    t[o_iip + SN_IP4_ID + 1] = 0
    t[o_iip + SN_IP4_CSUM] = 0
    t[o_iip + SN_IP4_CSUM + 1] = 0
    seq0 = sn_ld32(f + l4 + SN_TCP_SEQ)
    fl0 = f[l4 + SN_TCP_FLAGS]
    memset(t + o_tcp + SN_TCP_SEQ, 0, 4)
    t[o_tcp + SN_TCP_FLAGS] = 0
    t[o_tcp + SN_TCP_CSUM] = 0
    t[o_tcp + SN_TCP_CSUM + 1] = 0
    # The TCP checksum's frame-wide part: pseudo-header (RFC 9293 section 3.1) without
    # its length, and the TCP header without sequence number, flags and checksum.
    tcpbase = sn_csum_partial(f + l3 + 12, 8, 0)
    tcpbase = sn_csum_add16(tcpbase, SN_IPPROTO_TCP)
    tcpbase = sn_csum_partial(t + o_tcp, thl, tcpbase)
    tbase = 0
    if tunnel:
        # ESP tunnel IPv4 (RFC 4303 section 3.1.2): DSCP/ECN and DF of the header it
        # carries (RFC 4301 section 5.1.2, RFC 6040), ID = the sequence number's low bits.
        t[o_ip] = 0x45
        t[o_ip + 1] = vtos if device else tos
        t[o_ip + 6] = 0x40 if device else f[l3 + 6] & 0x40
        t[o_ip + 8] = 64
        t[o_ip + 9] = SN_IPPROTO_UDP if udp else SN_IPPROTO_ESP
        memcpy(t + o_ip + 12, sa.src, 4)
        memcpy(t + o_ip + 16, sa.dst, 4)
        tbase = sn_csum_partial(t + o_ip, 20, 0)
        if not device:
            sn_st16(t + o_eth + l2 - 2, 0x0800)
    elif not device:
        t[o_iip + 9] = SN_IPPROTO_UDP if udp else SN_IPPROTO_ESP
    ibase = sn_csum_partial(t + o_iip, 20, 0)
    if udp:
        sn_st16(t + o_ip + 20, sa.sport)           # RFC 3948 section 2.1; checksum 0
        sn_st16(t + o_ip + 22, sa.dport)
    sn_st32(t + o_esp, sa.spi)
    # One flow hash per frame: host-terminated, over what sn_flow_hash reads of the
    # protected inner packet (addresses, protocol, SPI); device-terminated, the caller's
    # (of the guest's frame, which chose the SA). The stage-by-stage path's values.
    if not device:
        hash = sn_flow_hash(t + o_eth, o_iv - o_eth)
    sn_st16(t + o_vu, sn_flow_port(hash))
    # Every segment but the last has mss bytes: its lengths and the checksum parts they
    # feed are the template's; only a shorter last segment rewrites them.
    g.l2 = l2
    g.thl = thl
    g.udp = udp
    g.icv = icv
    g.pl_extra = pl_extra
    g.o_vx = o_vx
    g.o_vu = o_vu
    g.o_ip = o_ip
    g.o_iip = o_iip
    g.o_esp = o_esp
    g.vxbase = vxbase
    g.device = device
    g.tunnel = tunnel
    c_full = mss if nseg > 1 else paylen
    esp_full = _put_lengths(t, &g, c_full, &pad_full, &tip_tot, &iip_tot)
    tb_full = sn_csum_add16(tbase, tip_tot)
    ib_full = sn_csum_add16(ibase, iip_tot)
    trail_full = _trailer(pad_full, nxt)

    # --- sequence numbers for the whole frame, at once ---
    k = sn_esp_seq_reserve(sa, nseg, &first)
    if k < nseg:
        drops[<int>SN_DROP_SEQ_EXHAUSTED] += nseg - k
        if drops2 != NULL:
            drops2[<int>SN_DROP_SEQ_EXHAUSTED] += nseg - k
        _atomic_add(&sa.drops[<int>SN_DROP_SEQ_EXHAUSTED], nseg - k)

    pos = l4 + thl
    for i in range(k):
        p = &out[n_ok]
        d = p.data + off
        c = paylen - i * mss if i == nseg - 1 else mss
        if i + 1 < k:
            _prefetch(f + pos + c, mss)
        seq = first + i
        memcpy(d, t, _TMPL)              # the payload overwrites what is beyond o_pay
        if c == c_full:
            pad = pad_full
            esp_total = esp_full
            tb = tb_full
            ib = ib_full
            trail = trail_full
        else:
            esp_total = _put_lengths(d, &g, c, &pad, &tip_tot, &iip_tot)
            tb = sn_csum_add16(tbase, tip_tot)
            ib = sn_csum_add16(ibase, iip_tot)
            trail = _trailer(pad, nxt)
        pl = pl_extra + thl + c
        ct_len = pl + pad + 2
        if tunnel:                       # ESP tunnel IPv4: ID = the sequence number
            sn_st16(d + o_ip + 4, <uint16_t>seq)
            sn_st16(d + o_ip + 10, sn_csum_finish(sn_csum_add16(tb, <uint16_t>seq)))
        # inner IPv4: ID + i (RFC 6864 section 4.1), checksum
        sn_st16(d + o_iip + SN_IP4_ID, <uint16_t>(id0 + i))
        sn_st16(d + o_iip + SN_IP4_CSUM,
                sn_csum_finish(sn_csum_add16(ib, <uint16_t>(id0 + i))))
        # ESP header and IV (seq XOR the SA's mask, as sn_esp_encap)
        sn_st32(d + o_esp + 4, <uint32_t>seq)
        sn_st32(d + o_iv, <uint32_t>((seq ^ sa.iv_mask) >> 32))
        sn_st32(d + o_iv + 4, <uint32_t>(seq ^ sa.iv_mask))
        # TCP: sequence number, flags (FIN/PSH on the last segment only, CWR on the
        # first only), checksum summed while the payload is copied in
        seq_tcp = seq0 + i * mss
        fl = fl0
        if i != nseg - 1:
            fl &= ~(SN_TCP_FIN | SN_TCP_PSH)
        if i != 0:
            fl &= ~SN_TCP_CWR
        sn_st32(d + o_tcp + SN_TCP_SEQ, seq_tcp)
        d[o_tcp + SN_TCP_FLAGS] = fl
        acc = sn_csum_add16(tcpbase, <uint16_t>(thl + c))
        acc = sn_csum_add16(acc, <uint16_t>(seq_tcp >> 16))
        acc = sn_csum_add16(acc, <uint16_t>seq_tcp)
        acc = sn_csum_add16(acc, fl)
        acc = sn_csum_copy(d + o_pay, f + pos, c, acc)
        sn_st16(d + o_tcp + SN_TCP_CSUM, sn_csum_finish(acc))
        pos += c
        memcpy(d + o_pay + c, &trail, 8)     # the trailer (the ICV overwrites the rest)
        if xform_seal(sa.xform, d + o_esp, <uint32_t>(seq >> 32), sa.esn, d + o_iv,
                      d + o_enc, ct_len, d + o_enc + ct_len) != 0:
            drops[<int>SN_DROP_CRYPTO] += 1
            if drops2 != NULL:
                drops2[<int>SN_DROP_CRYPTO] += 1
            _atomic_add(&sa.drops[<int>SN_DROP_CRYPTO], 1)
            continue
        p.off = off
        p.len = o_esp + esp_total
        p.hash = hash
        p.port = vtep
        p.drop = SN_OK
        p.flags = SN_PKT_TSO | SN_PKT_ESP
        n_ok += 1
        nbytes += pl
    if n_ok:
        sn_esp_account_out(sa, n_ok, nbytes)
    _count()
    produced[0] = n_ok
    return <int>nseg


# ---- tests and benchmarks ------------------------------------------------------------

def set_enabled(bint on):
    """Turn the one-pass path on or off for the whole process (tests compare it with the
    stage-by-stage path; benchmarks measure both). On by default."""
    global _enabled
    _enabled = on


def frames():
    """How many GSO frames the one-pass path has taken on this thread (tests check that a
    case they mean to cover is covered)."""
    return _counted()
