# Ethernet / IPv4 / IPv6 / TCP / UDP parsing of one frame (see softnic/_parse.pyx).

from libc.stdint cimport uint8_t, uint16_t, uint32_t


# Result of parsing an Ethernet frame. Offsets are from the first byte of the frame.
ctypedef struct sn_hdrs:
    uint16_t l2len          # Ethernet header incl. 802.1Q/802.1ad tags
    uint16_t ethertype      # of the L3 payload (0x0800/0x86DD/0x0806/...)
    uint16_t l3off          # == l2len
    uint16_t l4off          # after IPv4 options / IPv6 extension headers (== l3off if no IP)
    uint16_t l3len_total    # IPv4 total length / IPv6 40 + payload length; 0 if no IP
    uint8_t ipver           # 4, 6, or 0 for non-IP ethertypes
    uint8_t l4proto         # final next header (6, 17, 50, 58, 1, ...)
    uint16_t l4hdrlen       # TCP data offset * 4 / 8 for UDP / 0 otherwise or non-first fragment
    uint8_t is_fragment     # IPv4 MF or offset != 0; IPv6 fragment header with M or offset != 0


# Reads f[0:len] only; *h always fully written. 0 or SN_DROP_MALFORMED_L2/L3/L4.
# Non-IP ethertypes parse OK with ipver 0. IPv6: 40 + payload length must fit 16 bits.
cdef int sn_parse_frame(const uint8_t *f, uint32_t len, sn_hdrs *h) noexcept nogil
