# Header layouts and constants: Ethernet II with IEEE 802.1Q / 802.1ad tags, IPv4
# (RFC 791 section 3.1), IPv6 (RFC 8200 sections 3 and 4), TCP (RFC 9293 section 3.1,
# MSS option RFC 9293 section 3.7.1), UDP (RFC 768).
#
# Fields are described by byte offsets, not by C structs with multi-byte members:
# every wire field is big-endian and frames arrive at any alignment, so all access goes
# through the load/store helpers below (gcc turns them into movbe/bswap). The *_at
# variants check `off + width <= len` and are the ones to use on unvalidated input.

from libc.stdint cimport uint8_t, uint16_t, uint32_t

cdef enum:
    # Ethernet
    SN_ETH_HLEN = 14
    SN_ETH_TYPE_OFF = 12
    SN_VLAN_HLEN = 4              # TPID(2) + TCI(2) inserted before the ethertype
    SN_MAX_VLAN_TAGS = 2          # 802.1ad outer + 802.1Q inner; deeper nesting is malformed
    SN_ETH_P_IPV4 = 0x0800
    SN_ETH_P_ARP = 0x0806
    SN_ETH_P_8021Q = 0x8100
    SN_ETH_P_IPV6 = 0x86DD
    SN_ETH_P_8021AD = 0x88A8
    SN_ETH_P_QINQ_OLD = 0x9100    # pre-standard QinQ TPID still seen in the field

    # IPv4 (RFC 791)
    SN_IP4_HLEN = 20
    SN_IP4_VER_IHL = 0
    SN_IP4_TOS = 1
    SN_IP4_TOT_LEN = 2
    SN_IP4_ID = 4
    SN_IP4_FRAG = 6               # flags(3) | fragment offset(13)
    SN_IP4_TTL = 8
    SN_IP4_PROTO = 9
    SN_IP4_CSUM = 10
    SN_IP4_SRC = 12
    SN_IP4_DST = 16
    SN_IP4_MF = 0x2000
    SN_IP4_OFFMASK = 0x1FFF

    # IPv6 (RFC 8200)
    SN_IP6_HLEN = 40
    SN_IP6_PLEN = 4
    SN_IP6_NXT = 6
    SN_IP6_HLIM = 7
    SN_IP6_SRC = 8
    SN_IP6_DST = 24
    SN_IP6_MAX_EXT = 8            # bound on the extension header chain we walk
    SN_IP6_FRAG_HLEN = 8

    # IP protocol numbers / IPv6 next headers
    SN_IPPROTO_HOPOPTS = 0
    SN_IPPROTO_ICMP = 1
    SN_IPPROTO_TCP = 6
    SN_IPPROTO_UDP = 17
    SN_IPPROTO_ROUTING = 43
    SN_IPPROTO_FRAGMENT = 44
    SN_IPPROTO_ESP = 50
    SN_IPPROTO_AH = 51
    SN_IPPROTO_ICMPV6 = 58
    SN_IPPROTO_NONE = 59
    SN_IPPROTO_DSTOPTS = 60

    # TCP (RFC 9293)
    SN_TCP_HLEN = 20
    SN_TCP_MAX_HLEN = 60
    SN_TCP_SEQ = 4
    SN_TCP_ACK = 8
    SN_TCP_DOFF = 12              # data offset in the high nibble
    SN_TCP_FLAGS = 13
    SN_TCP_WIN = 14
    SN_TCP_CSUM = 16
    SN_TCP_URP = 18
    SN_TCP_FIN = 0x01
    SN_TCP_SYN = 0x02
    SN_TCP_RST = 0x04
    SN_TCP_PSH = 0x08
    SN_TCP_ACKF = 0x10
    SN_TCP_URG = 0x20
    SN_TCP_ECE = 0x40
    SN_TCP_CWR = 0x80
    SN_TCPOPT_EOL = 0
    SN_TCPOPT_NOP = 1
    SN_TCPOPT_MSS = 2
    SN_TCPOLEN_MSS = 4

    # UDP (RFC 768)
    SN_UDP_HLEN = 8
    SN_UDP_LEN = 4
    SN_UDP_CSUM = 6


cdef inline uint16_t sn_ld16(const uint8_t *p) noexcept nogil:
    """Big-endian 16-bit load; the caller has bounds-checked p[0:2]."""
    return <uint16_t>((<uint16_t>p[0] << 8) | p[1])


cdef inline uint32_t sn_ld32(const uint8_t *p) noexcept nogil:
    """Big-endian 32-bit load; the caller has bounds-checked p[0:4]."""
    return ((<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16)
            | (<uint32_t>p[2] << 8) | <uint32_t>p[3])


cdef inline void sn_st16(uint8_t *p, uint16_t v) noexcept nogil:
    """Big-endian 16-bit store; the caller has bounds-checked p[0:2]."""
    p[0] = <uint8_t>(v >> 8)
    p[1] = <uint8_t>v


cdef inline void sn_st32(uint8_t *p, uint32_t v) noexcept nogil:
    """Big-endian 32-bit store; the caller has bounds-checked p[0:4]."""
    p[0] = <uint8_t>(v >> 24)
    p[1] = <uint8_t>(v >> 16)
    p[2] = <uint8_t>(v >> 8)
    p[3] = <uint8_t>v


cdef inline bint sn_has(uint32_t len, uint32_t off, uint32_t n) noexcept nogil:
    """True when buf[off:off+n] lies inside a buffer of `len` bytes (overflow-safe)."""
    return off <= len and n <= len - off


cdef inline int sn_ld8_at(const uint8_t *b, uint32_t len, uint32_t off,
                          uint8_t *v) noexcept nogil:
    """Checked load of b[off]: 0 and *v set, or -1 (out of bounds, *v untouched)."""
    if not sn_has(len, off, 1):
        return -1
    v[0] = b[off]
    return 0


cdef inline int sn_ld16_at(const uint8_t *b, uint32_t len, uint32_t off,
                           uint16_t *v) noexcept nogil:
    """Checked big-endian load of b[off:off+2]: 0 and *v set, or -1."""
    if not sn_has(len, off, 2):
        return -1
    v[0] = sn_ld16(b + off)
    return 0


cdef inline int sn_ld32_at(const uint8_t *b, uint32_t len, uint32_t off,
                           uint32_t *v) noexcept nogil:
    """Checked big-endian load of b[off:off+4]: 0 and *v set, or -1."""
    if not sn_has(len, off, 4):
        return -1
    v[0] = sn_ld32(b + off)
    return 0


cdef inline int sn_st16_at(uint8_t *b, uint32_t len, uint32_t off, uint16_t v) noexcept nogil:
    """Checked big-endian store to b[off:off+2]: 0, or -1 with nothing written."""
    if not sn_has(len, off, 2):
        return -1
    sn_st16(b + off, v)
    return 0


cdef inline int sn_st32_at(uint8_t *b, uint32_t len, uint32_t off, uint32_t v) noexcept nogil:
    """Checked big-endian store to b[off:off+4]: 0, or -1 with nothing written."""
    if not sn_has(len, off, 4):
        return -1
    sn_st32(b + off, v)
    return 0


cdef inline bint sn_ip6_is_ext(uint8_t nxt) noexcept nogil:
    """IPv6 extension headers we walk (RFC 8200 section 4.1; AH per RFC 4302 has its own
    length unit and is handled by the parser). ESP ends the chain: its payload is opaque."""
    return (nxt == SN_IPPROTO_HOPOPTS or nxt == SN_IPPROTO_ROUTING
            or nxt == SN_IPPROTO_FRAGMENT or nxt == SN_IPPROTO_DSTOPTS)
