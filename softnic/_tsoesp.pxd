# TSO -> ESP -> VXLAN (host-terminated) or TSO -> VXLAN -> ESP (device-terminated) of
# one GSO frame in one pass, for the TX path's common cases (see softnic/_tsoesp.pyx
# for what it covers and why it exists).

from libc.stdint cimport uint8_t, uint32_t, uint64_t

from softnic._esp cimport sn_sa
from softnic._parse cimport sn_hdrs
from softnic._pkt cimport sn_pkt, sn_vnet_hdr
from softnic._vxlan cimport sn_vxlan_tx

cdef enum:
    # sn_tso_esp_vxlan's "not covered here" answer: nothing was changed (no packet, no
    # SA state); run the generic TSO, sn_esp_encap, sn_vxlan_encap stages instead.
    SN_TSOESP_GENERIC = -1

# f[0:flen]: the GSO frame without its virtio-net header (read only), h: sn_parse_frame's
# result for it; segments of at most min(gso_size, mss_cap) payload bytes, each ESP-
# protected with the outbound SA `sa` and VXLAN-encapsulated with `tx` (whose vni is set):
# host-terminated (device 0), ESP on the segment, then VXLAN; device-terminated (device
# 1, `sa` an uplink SA), VXLAN, then ESP on the VXLAN packet, with `hash` the flow hash
# of f (sn_flow_hash) that chose the SA. Output into the slots out[0:nout] (data and cap
# are the caller's; this sets off below `headroom`, len, hash, port = vtep, flags and
# drop = 0). *produced: finished packets, all alive, in out[0:*produced]. Segments that
# could not be sent (the sequence space ran out, an engine failure) are added to
# drops[reason], to drops2[reason] unless it is NULL, and to the SA's drops.
# Returns the number of segments the frame was cut into (>= 1, *produced of them
# finished), or SN_TSOESP_GENERIC (not covered, not valid, or short of room: nothing was
# done, and the generic stages do the work or name the drop reason).
cdef int sn_tso_esp_vxlan(const uint8_t *f, uint32_t flen, const sn_vnet_hdr *vh,
                          const sn_hdrs *h, uint32_t mss_cap, sn_sa *sa, bint device,
                          uint32_t hash, const sn_vxlan_tx *tx, uint32_t vtep, sn_pkt *out,
                          uint32_t nout, uint32_t headroom, uint32_t *produced,
                          uint64_t *drops, uint64_t *drops2) noexcept nogil
