# ESP (RFC 4303) security-association state and the per-packet encap/decap entry points,
# with extended sequence numbers (RFC 4304, RFC 4303 Appendix A), an RFC 6479-style
# anti-replay window (RFC 4303 §3.4.3) and UDP encapsulation (RFC 3948).
#
# One sn_sa is one direction of one SA (RFC 4301 SAs are unidirectional). It is owned by
# the control plane (softnic._esp.SecurityAssociation allocates and frees it); the data
# plane only reads configuration and updates sequence, replay, lifetime and counter fields.
#
# Threads. Outbound: any number of TX workers may call sn_esp_encap(_deferred) (and the
# segment path's sn_esp_seq_reserve / sn_esp_account_out) on one SA at once (two queues of one VM
# share its SA), without a lock: sequence numbers are reserved by compare-and-swap (each
# used once, never past the end of the space), `packets`/`bytes`/`drops` are atomic
# adds, `dead`, `soft_done` and `near_done` are set by atomic exchange so each event is
# raised once, and the crypto engine keeps no per-call state in the transform (OpenSSL's
# contexts are behind a per-transform spinlock). Inbound: one RX worker at a time per SA
# (the replay window, replay_top and the inbound counters are plain fields; no locking).

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from softnic._crypto cimport sn_xform
from softnic._pkt cimport SN_DROP_MAX, sn_pkt

cdef enum:
    SN_ESP_TRANSPORT = 0
    SN_ESP_TUNNEL = 1

    # sn_sa.events bits: set by the data plane, read and cleared by the control plane.
    SN_SA_EV_SOFT_EXPIRED = 1    # a soft byte/packet lifetime was reached: rekey now
    SN_SA_EV_HARD_EXPIRED = 2    # a hard lifetime was reached: the SA passes no more packets
    SN_SA_EV_SEQ_NEAR_END = 4    # 3/4 of the sequence space is used: rekey now
    SN_SA_EV_SEQ_EXHAUSTED = 8   # the sequence number would wrap: the SA sends no more

    SN_ESP_HDR_LEN = 8
    SN_ESP_MAX_WINDOW = 65536    # anti-replay window upper bound in packets (bits)

ctypedef struct sn_sa:
    # --- configuration (set once by the control plane) ---
    uint32_t spi             # host order
    uint8_t mode             # SN_ESP_TUNNEL / SN_ESP_TRANSPORT
    uint8_t family           # tunnel outer family: 4 or 6
    uint8_t esn              # 1: 64-bit sequence numbers (RFC 4304)
    uint8_t encap            # 1: UDP encapsulation (RFC 3948) with sport/dport
    uint16_t sport           # UDP encap ports, host order
    uint16_t dport
    uint8_t src[16]          # tunnel outer addresses, network order (IPv4: first 4 bytes)
    uint8_t dst[16]
    sn_xform *xform          # the cipher (owned by the SA)
    sn_xform *ivgen          # CBC only: keystream source for unpredictable IVs (owned)
    uint32_t iv_len          # explicit IV bytes: 8 (AEAD) or 16 (CBC)
    uint32_t icv_len
    uint32_t block           # plaintext alignment: 4 (AEAD) or 16 (CBC)
    # --- outbound sequence number (RFC 4303 §3.3.3) ---
    uint64_t seq             # last sequence number sent; 0 = none yet
    uint64_t seq_near        # raise SEQ_NEAR_END once seq reaches this
    uint64_t iv_mask         # AEAD: IV = seq XOR iv_mask, random per SA instance
    # --- inbound anti-replay (RFC 4303 §3.4.3, RFC 6479) ---
    uint64_t replay_top      # highest authenticated sequence number (64-bit with ESN)
    uint32_t window          # window size in packets, 32..SN_ESP_MAX_WINDOW
    uint32_t win_mask        # number of 64-bit words in the ring - 1 (power of two - 1)
    uint64_t *bitmap         # ring of (win_mask + 1) words (owned by the SA)
    # --- lifetimes (RFC 4301 §4.4.2.1); 0 = unlimited ---
    uint64_t soft_bytes
    uint64_t hard_bytes
    uint64_t soft_packets
    uint64_t hard_packets
    uint8_t dead             # hard lifetime reached: the SA passes nothing more
    uint8_t soft_done        # SOFT_EXPIRED already raised (raised once)
    uint8_t near_done        # SEQ_NEAR_END already raised (raised once)
    # --- counters (read by the control plane without entering the packet loop) ---
    uint64_t packets         # packets protected or unprotected
    uint64_t bytes           # their plaintext bytes (inner packet / transport payload)
    uint64_t drops[SN_DROP_MAX]
    uint32_t events          # SN_SA_EV_* bits


cdef int sn_esp_encap(sn_sa *sa, sn_pkt *p, uint32_t l2len) noexcept nogil
# The same, with the SA's packet/byte accounting left to the caller where it may be (an SA
# without lifetime limits): a TX lane sums a burst and adds once per SA, not per packet.
cdef int sn_esp_encap_deferred(sn_sa *sa, sn_pkt *p, uint32_t l2len,
                               uint32_t *deferred) noexcept nogil
# Building blocks of sn_esp_encap for a caller that frames ESP itself (one reservation
# and one accounting per TSO frame). seq_reserve: up to n numbers, the first in *first;
# returns how many (fewer than n: SEQ_EXHAUSTED raised). account_out: npkts packets of
# nbytes plaintext in all against the counters and lifetimes (events raised once).
cdef uint32_t sn_esp_seq_reserve(sn_sa *sa, uint32_t n, uint64_t *first) noexcept nogil
cdef void sn_esp_account_out(sn_sa *sa, uint64_t npkts, uint64_t nbytes) noexcept nogil
cdef int sn_esp_decap(sn_sa *sa, sn_pkt *p, uint32_t l2len, uint32_t esp_off,
                      uint8_t *next_header) noexcept nogil
cdef uint32_t sn_esp_read_spi(const sn_pkt *p, uint32_t esp_off) noexcept nogil

# Exact sizes, for MSS clamping and MTU checks (DESIGN: the overhead is accounted for
# exactly). `hdr_len` is the IP header length (with IPv6 extension headers ESP goes
# after) in transport mode; tunnel mode ignores it.
cdef uint32_t sn_esp_overhead(const sn_sa *sa, uint32_t ip_len, uint32_t hdr_len) noexcept nogil
cdef uint32_t sn_esp_max_ip_len(const sn_sa *sa, uint32_t mtu, uint32_t hdr_len) noexcept nogil

# Anti-replay and ESN primitives (exposed for tests and for a pipeline that wants to check
# before it looks further).
cdef uint64_t sn_esp_infer_seq(const sn_sa *sa, uint32_t seq_lo) noexcept nogil
cdef int sn_replay_check(const sn_sa *sa, uint64_t seq) noexcept nogil
cdef void sn_replay_update(sn_sa *sa, uint64_t seq) noexcept nogil


cdef class SecurityAssociation:
    cdef sn_sa *sa
    cdef readonly object spi
    cdef readonly str mode
    cdef readonly str alg
    cdef readonly object src
    cdef readonly object dst
    cdef readonly object encap
