# Checksum completion, TCP segmentation offload and MSS clamping (see softnic/_tso.pyx).

from libc.stdint cimport uint8_t, uint16_t, uint32_t

from softnic._parse cimport sn_hdrs
from softnic._pkt cimport sn_pkt, sn_vnet_hdr

cdef enum:
    # Smallest gso_size accepted: Linux's default tcp_min_snd_mss. Anything smaller is a
    # guest asking for a segment storm, not TCP.
    SN_TSO_MIN_MSS = 48

# NEEDS_CSUM completion in place. 0 (also when NEEDS_CSUM is clear) or
# SN_DROP_BAD_VNET_HDR (csum_start + csum_offset + 2 > len; frame untouched).
cdef int sn_csum_complete(uint8_t *f, uint32_t len, const sn_vnet_hdr *vh) noexcept nogil

# GSO_TCPV4/TCPV6 frame (no vnet header) -> out[0:*produced], mss = min(gso_size, mss_cap)
# (mss_cap 0 = no cap). The caller sets out[i].off/cap; this sets len, flags |= SN_PKT_TSO.
# 0, SN_DROP_BAD_VNET_HDR, SN_DROP_MALFORMED_L2/L3/L4 or SN_DROP_NO_ROOM (then *produced
# is the number of segments needed when nout was too small, else 0; nothing written).
cdef int sn_tso_segment(const uint8_t *f, uint32_t len, const sn_vnet_hdr *vh,
                        uint32_t mss_cap, sn_pkt *out, uint32_t nout,
                        uint32_t *produced) noexcept nogil

# SYN / SYN-ACK: lower the MSS option to mss, checksum updated (RFC 1624). h from
# sn_parse_frame on the same frame; call after checksum completion. 1 if changed, else 0.
cdef int sn_tcp_mss_clamp(uint8_t *f, uint32_t len, const sn_hdrs *h,
                          uint16_t mss) noexcept nogil
