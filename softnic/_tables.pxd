# The data plane's lookup tables: SA table keyed by (VF, SPI, direction) (RFC 4301 §4.4.2:
# the SAD lookup, scoped per VF as DESIGN.md requires), the VXLAN forwarding database
# (RFC 7348 §4: (VNI, inner MAC) -> remote VTEP, learned or static, plus per-VNI flood
# lists for BUM traffic), the VTEPs admitted per VNI (who may send VXLAN to us: RFC 7348
# §7 leaves it to the VTEP's configuration), and per-VF ordered policy lists
# (RFC 4301 §4.4.1, the SPD).
#
# Capacity is fixed at creation; lookups are nogil, allocation-free and constant time
# (SA, FDB: open addressing with linear probing at load <= 1/2; policies: a first-match
# scan of one VF's short ordered list). Mutations (add/remove/learn of a new entry) move
# entries (backward-shift deletion, no tombstones, so probe lengths never degrade): the
# caller must keep lookups of that table out while it mutates (the lead's lock).

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

cdef enum:
    SN_VF_UPLINK = 0xFFFFFFFF     # "VF" of the uplink SA table (device-terminated model)
    SN_DIR_IN = 0
    SN_DIR_OUT = 1
    SN_FDB_NONE = 0xFFFFFFFF      # sn_fdb_lookup: no entry
    SN_FLOOD_MAX = 64             # remote VTEPs per VNI flood list
    SN_TBL_OK = 0
    SN_TBL_FULL = -1              # add: capacity reached
    SN_TBL_EXISTS = -2            # add: key present (remove it first)
    SN_TBL_NOT_FOUND = -3         # remove: no such key
    # policy actions (sn_policy_lookup's return value)
    SN_POLICY_NONE = 0            # no selector matched: the VF's IPsec mode decides
    SN_POLICY_PROTECT = 1         # apply the rule's SA
    SN_POLICY_BYPASS = 2          # pass in the clear
    SN_POLICY_DISCARD = 3         # drop (SN_DROP_POLICY)
    SN_PROTO_ANY = 0xFFFF
    SN_TAF_INET = 2               # address families, Linux values (as softnic._vxlan)
    SN_TAF_INET6 = 10


# --- hashing --------------------------------------------------------------------------

cdef inline uint32_t sn_tbl_hash64(uint64_t x) noexcept nogil:
    """64 -> 32 bit mix (the splitmix64 finaliser): full avalanche, so both the low bits
    (home slot) and the rest are usable. Unkeyed: keys come from the control plane."""
    x ^= x >> 30
    x *= 0xBF58476D1CE4E5B9ULL
    x ^= x >> 27
    x *= 0x94D049BB133111EBULL
    x ^= x >> 31
    return <uint32_t>(x ^ (x >> 32))


# --- SA table -------------------------------------------------------------------------

ctypedef struct sn_sa_slot:
    uint32_t vf
    uint32_t spi
    uint32_t hash                 # sn_sa_key_hash of the key; home slot = hash & mask
    uint8_t dir
    uint8_t used
    uint16_t _pad
    void *sa                      # the lead's sn_sa*; never dereferenced here

ctypedef struct sn_sa_table:
    sn_sa_slot *slots             # capacity = mask + 1 (a power of two >= 2 * max_entries)
    uint32_t mask
    uint32_t count
    uint32_t max_entries


cdef inline uint32_t sn_sa_key_hash(uint32_t vf, uint32_t spi, uint8_t dir) noexcept nogil:
    return sn_tbl_hash64(((<uint64_t>vf << 32) | spi) ^ (<uint64_t>dir << 56)
                         ^ (<uint64_t>dir * 0x9E3779B97F4A7C15ULL))


cdef inline void *sn_sa_lookup(const sn_sa_table *t, uint32_t vf, uint32_t spi,
                               uint8_t dir) noexcept nogil:
    """The SA stored for exactly (vf, spi, dir), or NULL. vf is part of the key, so one
    VF can never find another's SA. Reads only; at most capacity probes (an empty slot
    always exists because the load is <= 1/2)."""
    cdef uint32_t h = sn_sa_key_hash(vf, spi, dir)
    cdef uint32_t i = h & t.mask
    cdef const sn_sa_slot *s
    while True:
        s = &t.slots[i]
        if not s.used:
            return NULL
        if s.hash == h and s.spi == spi and s.vf == vf and s.dir == dir:
            return s.sa
        i = (i + 1) & t.mask


cdef int sn_sa_add(sn_sa_table *t, uint32_t vf, uint32_t spi, uint8_t dir,
                   void *sa) noexcept nogil
cdef void *sn_sa_remove(sn_sa_table *t, uint32_t vf, uint32_t spi, uint8_t dir) noexcept nogil

cdef class SATable:
    cdef sn_sa_table t


# --- FDB ------------------------------------------------------------------------------

ctypedef struct sn_fdb_slot:
    uint32_t vni
    uint32_t hash
    uint8_t mac[6]
    uint8_t used
    uint8_t learned               # 1: learned from traffic (ages out); 0: static
    uint32_t vtep                 # remote VTEP index (the lead's table of sn_vxlan_tx)
    uint64_t seen                 # learned: last time seen, in the caller's clock units

ctypedef struct sn_flood_slot:
    uint32_t vni
    uint32_t hash
    uint32_t used
    uint32_t n
    uint32_t vteps[SN_FLOOD_MAX]

ctypedef struct sn_fdb:
    sn_fdb_slot *slots
    uint32_t mask
    uint32_t count
    uint32_t max_entries
    sn_flood_slot *flood
    uint32_t flood_mask
    uint32_t flood_count
    uint32_t flood_max


cdef inline uint32_t sn_fdb_key_hash(uint32_t vni, const uint8_t *mac) noexcept nogil:
    cdef uint64_t m = ((<uint64_t>mac[0] << 40) | (<uint64_t>mac[1] << 32)
                       | (<uint64_t>mac[2] << 24) | (<uint64_t>mac[3] << 16)
                       | (<uint64_t>mac[4] << 8) | mac[5])
    # vni * odd constant is a bijection, so distinct VNIs spread over all 64 bits
    return sn_tbl_hash64(m ^ (<uint64_t>vni * 0x9E3779B97F4A7C15ULL))


cdef inline sn_fdb_slot *sn_fdb_find(const sn_fdb *f, uint32_t vni,
                                     const uint8_t *mac) noexcept nogil:
    cdef uint32_t h = sn_fdb_key_hash(vni, mac)
    cdef uint32_t i = h & f.mask
    cdef sn_fdb_slot *s
    while True:
        s = &f.slots[i]
        if not s.used:
            return NULL
        if s.hash == h and s.vni == vni and memcmp(s.mac, mac, 6) == 0:
            return s
        i = (i + 1) & f.mask


cdef inline uint32_t sn_fdb_lookup(const sn_fdb *f, uint32_t vni,
                                   const uint8_t *mac) noexcept nogil:
    """Remote VTEP index for (vni, mac[0:6]), or SN_FDB_NONE (then flood)."""
    cdef const sn_fdb_slot *s = sn_fdb_find(f, vni, mac)
    return s.vtep if s != NULL else SN_FDB_NONE


cdef inline uint32_t sn_flood_key_hash(uint32_t vni) noexcept nogil:
    return sn_tbl_hash64(<uint64_t>vni * 0x9E3779B97F4A7C15ULL + 1)


cdef inline uint32_t sn_fdb_flood(const sn_fdb *f, uint32_t vni,
                                  const uint32_t **vteps) noexcept nogil:
    """Flood list of vni: sets *vteps to the array (owned by f) and returns its length;
    0 (and *vteps NULL) when the VNI has none (SN_DROP_NO_FDB)."""
    cdef uint32_t i = sn_flood_key_hash(vni) & f.flood_mask
    cdef const sn_flood_slot *s
    while True:
        s = &f.flood[i]
        if not s.used:
            vteps[0] = NULL
            return 0
        if s.vni == vni:
            vteps[0] = s.vteps
            return s.n
        i = (i + 1) & f.flood_mask


cdef int sn_fdb_add(sn_fdb *f, uint32_t vni, const uint8_t *mac, uint32_t vtep,
                    bint learned, uint64_t now) noexcept nogil
cdef int sn_fdb_remove(sn_fdb *f, uint32_t vni, const uint8_t *mac) noexcept nogil
cdef int sn_fdb_learn(sn_fdb *f, uint32_t vni, const uint8_t *mac, uint32_t vtep,
                      uint64_t now) noexcept nogil

cdef class Fdb:
    cdef sn_fdb f
    cdef _remove_flood(self, uint32_t vni)


# --- admitted VTEPs -------------------------------------------------------------------
# (VNI, outer source address) -> VTEP index: the remote VTEPs that may send VXLAN for a
# VNI. Every received packet is looked up here (its source is the peer's to choose), so
# the hash covers the whole address; the keys themselves come from the control plane.

ctypedef struct sn_peer_slot:
    uint32_t vni
    uint32_t hash
    uint8_t addr[16]              # network order; IPv4 in the first 4 bytes, the rest 0
    uint32_t vtep                 # the VTEP index (FDB learning points entries at it)
    uint8_t family                # SN_TAF_INET / SN_TAF_INET6
    uint8_t used
    uint16_t _pad

ctypedef struct sn_peer_table:
    sn_peer_slot *slots
    uint32_t mask
    uint32_t count
    uint32_t max_entries


cdef inline uint32_t sn_peer_key_hash(uint32_t vni, uint8_t family,
                                      const uint8_t *addr) noexcept nogil:
    # The words in host order: any order hashes as well, and it is one load each.
    cdef uint64_t a, b
    memcpy(&a, addr, 8)
    memcpy(&b, addr + 8, 8)
    # One mix: b is rotated so that a and b cannot cancel, the VNI multiplied as the FDB's.
    return sn_tbl_hash64(a ^ ((b << 29) | (b >> 35)) ^ (<uint64_t>family << 56)
                         ^ (<uint64_t>vni * 0x9E3779B97F4A7C15ULL))


cdef inline const sn_peer_slot *sn_peer_lookup(const sn_peer_table *t, uint32_t vni,
                                               uint8_t family,
                                               const uint8_t *addr) noexcept nogil:
    """The admission of (vni, family, addr[0:16]), or NULL: not admitted."""
    cdef uint32_t h = sn_peer_key_hash(vni, family, addr)
    cdef uint32_t i = h & t.mask
    cdef const sn_peer_slot *s
    while True:
        s = &t.slots[i]
        if not s.used:
            return NULL
        if s.hash == h and s.vni == vni and s.family == family and \
                memcmp(s.addr, addr, 16) == 0:
            return s
        i = (i + 1) & t.mask


cdef class PeerTable:
    cdef sn_peer_table t


# --- policy ---------------------------------------------------------------------------

ctypedef struct sn_policy_rule:
    uint64_t src_net[2]           # prefix, pre-masked, in memory order (IPv4: bytes 0..3)
    uint64_t src_mask[2]
    uint64_t dst_net[2]
    uint64_t dst_mask[2]
    uint32_t priority             # lower value wins (as `ip xfrm policy ... priority`)
    uint32_t id                   # handle for remove; also the tie-break (older first)
    uint16_t proto                # IP protocol or SN_PROTO_ANY
    uint16_t sport_lo
    uint16_t sport_hi
    uint16_t dport_lo
    uint16_t dport_hi
    uint8_t family                # SN_TAF_INET / SN_TAF_INET6
    uint8_t dir                   # SN_DIR_IN / SN_DIR_OUT
    uint8_t action                # SN_POLICY_*
    void *sa                      # PROTECT: the lead's SA handle

ctypedef struct sn_policy_table:
    sn_policy_rule *rules         # n_vfs * max_rules, VF v's list at v * max_rules
    uint32_t *n                   # rules in use per VF, sorted by (priority, id)
    uint32_t n_vfs
    uint32_t max_rules
    uint32_t next_id

cdef int sn_policy_lookup(const sn_policy_table *t, uint32_t vf, uint8_t dir, uint8_t family,
                          const uint8_t *src, const uint8_t *dst, uint8_t proto,
                          uint16_t sport, uint16_t dport, void **sa) noexcept nogil

cdef class PolicyTable:
    cdef sn_policy_table t
    cdef sn_policy_rule *_list(self, uint32_t vf) except NULL
