# Checksum completion, TCP segmentation offload and MSS clamping (see softnic/_tso.pyx).

from libc.stdint cimport uint8_t, uint16_t, uint32_t

from softnic._parse cimport sn_hdrs
from softnic._pkt cimport sn_pkt, sn_vnet_hdr

cdef enum:
    # Smallest gso_size accepted: Linux's default tcp_min_snd_mss. Anything smaller is a
    # guest asking for a segment storm, not TCP.
    SN_TSO_MIN_MSS = 48

cdef int sn_csum_complete(uint8_t *f, uint32_t len, const sn_vnet_hdr *vh) noexcept nogil
cdef int sn_tso_segment(const uint8_t *f, uint32_t len, const sn_vnet_hdr *vh,
                        uint32_t mss_cap, sn_pkt *out, uint32_t nout,
                        uint32_t *produced) noexcept nogil
cdef int sn_tcp_mss_clamp(uint8_t *f, uint32_t len, const sn_hdrs *h,
                          uint16_t mss) noexcept nogil
