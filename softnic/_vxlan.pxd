# VXLAN (RFC 7348 §5) encapsulation and decapsulation over IPv4/IPv6 + UDP, the inner flow
# hash that gives the outer UDP source port its entropy (RFC 7348 §5, "Source Port"),
# and the ICMP "too big" reply of a tunnel ingress (RFC 1191 / RFC 792, RFC 8201 / RFC 4443).
#
# Packets at the underlay boundary are complete outer IP packets without L2 (see the I/O
# layer): encap leaves [outer IP][UDP][VXLAN][inner Ethernet] at p.off; decap expects it.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from softnic._pkt cimport sn_pkt

cdef enum:
    SN_VXLAN_PORT = 4789          # IANA port (RFC 7348 §5)
    SN_VXLAN_HDR_LEN = 8
    SN_VXLAN_OVERHEAD4 = 20 + 8 + 8   # outer IPv4 + UDP + VXLAN, in front of the frame
    SN_VXLAN_OVERHEAD6 = 40 + 8 + 8   # outer IPv6 + UDP + VXLAN
    SN_AF_INET = 2                # same values as Linux AF_INET / AF_INET6
    SN_AF_INET6 = 10
    # sn_vxlan_tx.flags
    SN_VXLAN_F_DF = 1             # IPv4: set DF so the underlay never fragments
    SN_VXLAN_F_UDP_CSUM = 2       # IPv4: compute the UDP checksum (IPv6 always does)
    SN_VXLAN_F_ECN = 4            # copy the inner ECN bits to the outer header (RFC 6040 §4.1)
    # sn_flow_port range: the dynamic/private ports (RFC 7348 §5 recommends them)
    SN_FLOW_PORT_MIN = 49152

# One remote VTEP as the TX path sees it; built once by the control plane, read-only on
# the data path. IPv4 addresses sit in the first 4 bytes of the 16-byte buffers.
ctypedef struct sn_vxlan_tx:
    uint8_t local[16]             # outer source address, network order
    uint8_t remote[16]            # outer destination address, network order
    uint8_t family                # SN_AF_INET or SN_AF_INET6
    uint8_t ttl                   # outer TTL / hop limit (0 -> 64)
    uint8_t tos                   # outer DSCP/ECN byte (ECN bits replaced with SN_VXLAN_F_ECN)
    uint8_t _pad
    uint16_t dport                # outer UDP destination port (0 -> 4789)
    uint16_t flags                # SN_VXLAN_F_*
    uint32_t vni                  # 24-bit VNI

# What decap learned from the outer headers (for FDB learning and the inbound checks).
ctypedef struct sn_vxlan_rx:
    uint32_t vni
    uint8_t family                # SN_AF_INET or SN_AF_INET6
    uint8_t src[16]               # outer source address (IPv4 in the first 4 bytes)
    uint8_t dst[16]               # outer destination address
    uint16_t sport                # outer UDP source port
    uint16_t dport                # outer UDP destination port
    uint8_t tos                   # outer DSCP/ECN byte (IPv6: traffic class)

cdef int sn_vxlan_encap(sn_pkt *p, const sn_vxlan_tx *t) noexcept nogil
cdef int sn_vxlan_decap(sn_pkt *p, sn_vxlan_rx *info) noexcept nogil
cdef uint32_t sn_flow_hash(const uint8_t *frame, uint32_t len) noexcept nogil
cdef int sn_icmp_too_big(const uint8_t *frame, uint32_t len, uint32_t mtu,
                         sn_pkt *out) noexcept nogil
# Bursts (DPDK style): run the per-packet function over pkts[0:n] that are still alive
# (drop == SN_OK), set each refused packet's .drop to the reason, return how many passed.
cdef int sn_vxlan_encap_burst(sn_pkt *pkts, int n, const sn_vxlan_tx *t) noexcept nogil
cdef int sn_vxlan_decap_burst(sn_pkt *pkts, int n, sn_vxlan_rx *infos) noexcept nogil


cdef inline uint16_t sn_flow_port(uint32_t hash) noexcept nogil:
    """Map a flow hash onto 49152..65535 by its top 14 bits (the best-mixed ones)."""
    return <uint16_t>(SN_FLOW_PORT_MIN + (hash >> 18))


# Control plane (GIL held): fill a TX descriptor from Python address objects/strings,
# validating everything once so the data path never checks configuration. Raises
# ValueError on a bad address, family mismatch or VNI >= 2**24.
cdef int sn_vxlan_tx_init(sn_vxlan_tx *t, object local, object remote, uint32_t vni,
                          uint16_t dport=*, uint8_t ttl=*, uint8_t tos=*, bint df=*,
                          bint udp_csum=*, bint ecn=*) except -1


# ICMP error rate limit (RFC 4443 §2.4(f) MUST, RFC 1812 §4.3.2.8 SHOULD): a token bucket
# per worker (or per VF), checked before sn_icmp_too_big. Not shared between threads.
ctypedef struct sn_ratelimit:
    uint64_t last_ns              # time of the last refill
    uint64_t tokens_ns            # budget in "ns of credit": one message costs cost_ns
    uint64_t cost_ns              # 1e9 / rate (messages per second)
    uint64_t burst_ns             # cost_ns * burst


cdef inline void sn_ratelimit_init(sn_ratelimit *r, uint32_t per_second,
                                   uint32_t burst) noexcept nogil:
    r.cost_ns = 1000000000 // (per_second if per_second else 1)
    r.burst_ns = r.cost_ns * (burst if burst else 1)
    r.tokens_ns = r.burst_ns
    r.last_ns = 0


cdef inline bint sn_ratelimit_take(sn_ratelimit *r, uint64_t now_ns) noexcept nogil:
    """True (and one message charged) when the bucket allows a message at now_ns
    (a monotonic clock); False: send nothing, count the suppression."""
    if now_ns > r.last_ns:
        r.tokens_ns += now_ns - r.last_ns
        if r.tokens_ns > r.burst_ns:
            r.tokens_ns = r.burst_ns
        r.last_ns = now_ns
    if r.tokens_ns < r.cost_ns:
        return False
    r.tokens_ns -= r.cost_ns
    return True
