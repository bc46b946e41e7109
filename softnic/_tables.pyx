# cython: language_level=3
"""Lookup tables of the data plane: SAD per (VF, SPI, direction) (RFC 4301 §4.4.2), the
VXLAN FDB with flood lists (RFC 7348 §4), the VTEPs admitted per VNI, and per-VF SPD
lists (RFC 4301 §4.4.1).

Open addressing with linear probing, capacity a power of two at least twice the entry
limit (so a probe always meets an empty slot and stays short), deletion by backward
shift (Knuth 6.4 Algorithm R) so no tombstones accumulate. See _tables.pxd for the
nogil lookups and the concurrency contract.
"""

import ipaddress

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp, memcpy, memmove, memset

ACTIONS = ("none", "protect", "bypass", "discard")


cdef uint32_t _capacity(uint32_t max_entries) except 0:
    cdef uint64_t c = 16
    if max_entries == 0 or max_entries > (1u << 28):
        raise ValueError("max_entries must be in 1..2**28")
    while c < 2 * <uint64_t>max_entries:
        c <<= 1
    return <uint32_t>c


cdef inline bint _moves(uint32_t home, uint32_t hole, uint32_t j, uint32_t mask) noexcept nogil:
    """Backward shift: may the entry at j (home slot `home`) fill the hole? Yes when the
    hole lies on its probe path, i.e. it is at least as far from j as home is."""
    return ((j - home) & mask) >= ((j - hole) & mask)


cdef uint8_t _dir(object d) except 255:
    if d in ("in", SN_DIR_IN):
        return SN_DIR_IN
    if d in ("out", SN_DIR_OUT):
        return SN_DIR_OUT
    raise ValueError("direction must be 'in' or 'out'")


# --- SA table -------------------------------------------------------------------------

cdef int sn_sa_add(sn_sa_table *t, uint32_t vf, uint32_t spi, uint8_t dir,
                   void *sa) noexcept nogil:
    """Insert (vf, spi, dir) -> sa. Control plane, writers excluded from lookups.
    Returns SN_TBL_OK, SN_TBL_EXISTS (key present, unchanged) or SN_TBL_FULL."""
    cdef uint32_t h = sn_sa_key_hash(vf, spi, dir)
    cdef uint32_t i = h & t.mask
    cdef sn_sa_slot *s
    while True:
        s = &t.slots[i]
        if not s.used:
            break
        if s.hash == h and s.spi == spi and s.vf == vf and s.dir == dir:
            return SN_TBL_EXISTS
        i = (i + 1) & t.mask
    if t.count >= t.max_entries:
        return SN_TBL_FULL
    s.vf = vf
    s.spi = spi
    s.dir = dir
    s.hash = h
    s.sa = sa
    s.used = 1
    t.count += 1
    return SN_TBL_OK


cdef void *sn_sa_remove(sn_sa_table *t, uint32_t vf, uint32_t spi, uint8_t dir) noexcept nogil:
    """Remove (vf, spi, dir); returns the stored SA (the caller frees it once no worker
    can still hold it) or NULL when absent."""
    cdef uint32_t h = sn_sa_key_hash(vf, spi, dir)
    cdef uint32_t i = h & t.mask
    cdef uint32_t j
    cdef sn_sa_slot *s
    cdef void *sa
    while True:
        s = &t.slots[i]
        if not s.used:
            return NULL
        if s.hash == h and s.spi == spi and s.vf == vf and s.dir == dir:
            break
        i = (i + 1) & t.mask
    sa = s.sa
    j = i
    while True:
        j = (j + 1) & t.mask
        if not t.slots[j].used:
            break
        if _moves(t.slots[j].hash & t.mask, i, j, t.mask):
            t.slots[i] = t.slots[j]
            i = j
    memset(&t.slots[i], 0, sizeof(sn_sa_slot))
    t.count -= 1
    return sa


cdef class SATable:
    """SAs keyed by (vf, spi, direction). Values are non-zero integer handles (the lead
    stores sn_sa* from C through sn_sa_add on `.t`). Use SN_VF_UPLINK (0xFFFFFFFF) as the
    vf of the uplink (device-terminated) table."""

    def __cinit__(self, uint32_t max_entries=4096):
        cdef uint32_t cap = _capacity(max_entries)
        self.t.slots = <sn_sa_slot *>calloc(cap, sizeof(sn_sa_slot))
        if self.t.slots == NULL:
            raise MemoryError()
        self.t.mask = cap - 1
        self.t.count = 0
        self.t.max_entries = max_entries

    def __dealloc__(self):
        free(self.t.slots)

    @property
    def capacity(self):
        return self.t.mask + 1

    @property
    def max_entries(self):
        return self.t.max_entries

    def __len__(self):
        return self.t.count

    def add(self, uint32_t vf, uint32_t spi, dir, uintptr_t handle):
        if handle == 0:
            raise ValueError("handle must be non-zero")
        r = sn_sa_add(&self.t, vf, spi, _dir(dir), <void *>handle)
        if r == SN_TBL_EXISTS:
            raise KeyError(f"SA vf={vf} spi=0x{spi:08x} dir={dir} exists")
        if r == SN_TBL_FULL:
            raise OverflowError(f"SA table full ({self.t.max_entries} entries)")

    def remove(self, uint32_t vf, uint32_t spi, dir):
        cdef void *sa = sn_sa_remove(&self.t, vf, spi, _dir(dir))
        if sa == NULL:
            raise KeyError(f"no SA vf={vf} spi=0x{spi:08x} dir={dir}")
        return <uintptr_t>sa

    def lookup(self, uint32_t vf, uint32_t spi, dir):
        cdef void *sa = sn_sa_lookup(&self.t, vf, spi, _dir(dir))
        return None if sa == NULL else <uintptr_t>sa

    def entries(self):
        """[(vf, spi, dir, handle)] in slot order."""
        cdef uint32_t i
        out = []
        for i in range(self.t.mask + 1):
            if self.t.slots[i].used:
                s = &self.t.slots[i]
                out.append((s.vf, s.spi, "in" if s.dir == SN_DIR_IN else "out",
                            <uintptr_t>s.sa))
        return out

    def _max_probe(self):
        """Longest probe sequence in the table (a test of the load bound)."""
        cdef uint32_t i, worst = 0
        for i in range(self.t.mask + 1):
            if self.t.slots[i].used:
                worst = max(worst, ((i - self.t.slots[i].hash) & self.t.mask) + 1)
        return worst


# --- FDB ------------------------------------------------------------------------------

cdef int sn_fdb_add(sn_fdb *f, uint32_t vni, const uint8_t *mac, uint32_t vtep,
                    bint learned, uint64_t now) noexcept nogil:
    """Insert (vni, mac) -> vtep. Control plane. Returns SN_TBL_OK, SN_TBL_EXISTS or
    SN_TBL_FULL."""
    cdef uint32_t h = sn_fdb_key_hash(vni, mac)
    cdef uint32_t i = h & f.mask
    cdef sn_fdb_slot *s
    while True:
        s = &f.slots[i]
        if not s.used:
            break
        if s.hash == h and s.vni == vni and memcmp(s.mac, mac, 6) == 0:
            return SN_TBL_EXISTS
        i = (i + 1) & f.mask
    if f.count >= f.max_entries:
        return SN_TBL_FULL
    s.vni = vni
    memcpy(s.mac, mac, 6)
    s.hash = h
    s.vtep = vtep
    s.learned = 1 if learned else 0
    s.seen = now
    s.used = 1
    f.count += 1
    return SN_TBL_OK


cdef int sn_fdb_remove(sn_fdb *f, uint32_t vni, const uint8_t *mac) noexcept nogil:
    """Remove (vni, mac). Returns SN_TBL_OK or SN_TBL_NOT_FOUND."""
    cdef uint32_t h = sn_fdb_key_hash(vni, mac)
    cdef uint32_t i = h & f.mask
    cdef uint32_t j
    cdef sn_fdb_slot *s
    while True:
        s = &f.slots[i]
        if not s.used:
            return SN_TBL_NOT_FOUND
        if s.hash == h and s.vni == vni and memcmp(s.mac, mac, 6) == 0:
            break
        i = (i + 1) & f.mask
    j = i
    while True:
        j = (j + 1) & f.mask
        if not f.slots[j].used:
            break
        if _moves(f.slots[j].hash & f.mask, i, j, f.mask):
            f.slots[i] = f.slots[j]
            i = j
    memset(&f.slots[i], 0, sizeof(sn_fdb_slot))
    f.count -= 1
    return SN_TBL_OK


cdef int sn_fdb_learn(sn_fdb *f, uint32_t vni, const uint8_t *mac, uint32_t vtep,
                      uint64_t now) noexcept nogil:
    """Learn that mac (an inner source MAC) sits behind vtep (RFC 7348 §4). An existing
    learned entry is refreshed in place (vtep, seen: word stores, no entry moves); a
    static entry is never overridden; a new key is inserted (a mutation: writers'
    rules apply). Group MACs are not learned. Returns SN_TBL_OK, SN_TBL_EXISTS (static
    entry kept), SN_TBL_FULL, or SN_TBL_NOT_FOUND for a group MAC."""
    cdef sn_fdb_slot *s
    if mac[0] & 1:
        return SN_TBL_NOT_FOUND
    s = sn_fdb_find(f, vni, mac)
    if s != NULL:
        if not s.learned:
            return SN_TBL_EXISTS
        s.vtep = vtep
        s.seen = now
        return SN_TBL_OK
    return sn_fdb_add(f, vni, mac, vtep, True, now)


cdef bytes _mac(object m):
    if isinstance(m, str):
        b = bytes.fromhex(m.replace(":", "").replace("-", ""))
    else:
        b = bytes(m)
    if len(b) != 6:
        raise ValueError("a MAC address has 6 bytes")
    return b


cdef class Fdb:
    """VXLAN forwarding database: (vni, mac) -> remote VTEP index, static or learned
    (with a last-seen time for aging), and per-VNI flood lists of VTEP indices."""

    def __cinit__(self, uint32_t max_entries=65536, uint32_t max_vnis=4096):
        cdef uint32_t cap = _capacity(max_entries)
        cdef uint32_t fcap = _capacity(max_vnis)
        self.f.slots = <sn_fdb_slot *>calloc(cap, sizeof(sn_fdb_slot))
        self.f.flood = <sn_flood_slot *>calloc(fcap, sizeof(sn_flood_slot))
        if self.f.slots == NULL or self.f.flood == NULL:
            raise MemoryError()
        self.f.mask = cap - 1
        self.f.max_entries = max_entries
        self.f.flood_mask = fcap - 1
        self.f.flood_max = max_vnis

    def __dealloc__(self):
        free(self.f.slots)
        free(self.f.flood)

    def __len__(self):
        return self.f.count

    @property
    def capacity(self):
        return self.f.mask + 1

    def add(self, uint32_t vni, mac, uint32_t vtep, *, bint learned=False, uint64_t now=0):
        cdef bytes m = _mac(mac)
        if vtep == SN_FDB_NONE:
            raise ValueError("vtep index 0xFFFFFFFF is reserved")
        r = sn_fdb_add(&self.f, vni, m, vtep, learned, now)
        if r == SN_TBL_EXISTS:
            raise KeyError(f"FDB entry vni={vni} mac={m.hex(':')} exists")
        if r == SN_TBL_FULL:
            raise OverflowError(f"FDB full ({self.f.max_entries} entries)")

    def remove(self, uint32_t vni, mac):
        cdef bytes m = _mac(mac)
        if sn_fdb_remove(&self.f, vni, m) != SN_TBL_OK:
            raise KeyError(f"no FDB entry vni={vni} mac={m.hex(':')}")

    def lookup(self, uint32_t vni, mac):
        cdef bytes m = _mac(mac)
        cdef uint32_t v = sn_fdb_lookup(&self.f, vni, m)
        return None if v == SN_FDB_NONE else v

    def learn(self, uint32_t vni, mac, uint32_t vtep, uint64_t now):
        """True when the entry now points at vtep (learned or refreshed)."""
        cdef bytes m = _mac(mac)
        r = sn_fdb_learn(&self.f, vni, m, vtep, now)
        if r == SN_TBL_FULL:
            raise OverflowError(f"FDB full ({self.f.max_entries} entries)")
        return r == SN_TBL_OK

    def age(self, uint64_t now, uint64_t max_age):
        """Remove learned entries not seen for more than max_age; returns how many."""
        cdef uint32_t i
        stale = []
        for i in range(self.f.mask + 1):
            s = &self.f.slots[i]
            if s.used and s.learned and now - s.seen > max_age and now >= s.seen:
                stale.append((s.vni, bytes(s.mac[:6])))
        for vni, m in stale:
            sn_fdb_remove(&self.f, vni, m)
        return len(stale)

    def entries(self):
        """[(vni, mac bytes, vtep, learned, seen)]."""
        cdef uint32_t i
        out = []
        for i in range(self.f.mask + 1):
            s = &self.f.slots[i]
            if s.used:
                out.append((s.vni, bytes(s.mac[:6]), s.vtep, bool(s.learned), s.seen))
        return out

    def set_flood(self, uint32_t vni, vteps):
        """Set (replace) the flood list of vni; an empty list removes it."""
        cdef list v = [int(x) for x in vteps]
        cdef uint32_t h = sn_flood_key_hash(vni)
        cdef uint32_t i = h & self.f.flood_mask
        cdef uint32_t k
        cdef sn_flood_slot *s
        if len(v) > SN_FLOOD_MAX:
            raise ValueError(f"at most {SN_FLOOD_MAX} VTEPs per flood list")
        if not v:
            self._remove_flood(vni)
            return
        while True:
            s = &self.f.flood[i]
            if not s.used or s.vni == vni:
                break
            i = (i + 1) & self.f.flood_mask
        if not s.used:
            if self.f.flood_count >= self.f.flood_max:
                raise OverflowError(f"flood table full ({self.f.flood_max} VNIs)")
            self.f.flood_count += 1
        # n last so a reader sees either the old or the new list length at worst
        s.n = min(s.n, len(v))
        for k in range(len(v)):
            s.vteps[k] = v[k]
        s.vni = vni
        s.hash = h
        s.used = 1
        s.n = len(v)

    cdef _remove_flood(self, uint32_t vni):
        cdef uint32_t mask = self.f.flood_mask
        cdef uint32_t i = sn_flood_key_hash(vni) & mask
        cdef uint32_t j
        while True:
            if not self.f.flood[i].used:
                return
            if self.f.flood[i].vni == vni:
                break
            i = (i + 1) & mask
        j = i
        while True:
            j = (j + 1) & mask
            if not self.f.flood[j].used:
                break
            if _moves(self.f.flood[j].hash & mask, i, j, mask):
                self.f.flood[i] = self.f.flood[j]
                i = j
        memset(&self.f.flood[i], 0, sizeof(sn_flood_slot))
        self.f.flood_count -= 1

    def flood(self, uint32_t vni):
        cdef const uint32_t *v
        cdef uint32_t n = sn_fdb_flood(&self.f, vni, &v)
        return [v[i] for i in range(n)]


# --- admitted VTEPs -------------------------------------------------------------------

cdef bytes _peer_addr(object addr, uint8_t *family):
    a = ipaddress.ip_address(addr)
    family[0] = SN_TAF_INET if a.version == 4 else SN_TAF_INET6
    return a.packed + bytes(16 - len(a.packed))


cdef class PeerTable:
    """(VNI, VTEP address) -> VTEP index: the remote VTEPs that may send VXLAN for a VNI.
    Writers are excluded from lookups by the caller (the lead's locks), as for the FDB."""

    def __cinit__(self, uint32_t max_entries=4096):
        cdef uint32_t cap = _capacity(max_entries)
        self.t.slots = <sn_peer_slot *>calloc(cap, sizeof(sn_peer_slot))
        if self.t.slots == NULL:
            raise MemoryError()
        self.t.mask = cap - 1
        self.t.max_entries = max_entries

    def __dealloc__(self):
        free(self.t.slots)

    def __len__(self):
        return self.t.count

    def add(self, uint32_t vni, addr, uint32_t vtep):
        cdef uint8_t fam
        cdef bytes a = _peer_addr(addr, &fam)
        cdef const uint8_t *ap = a
        cdef uint32_t h = sn_peer_key_hash(vni, fam, ap)
        cdef uint32_t i = h & self.t.mask
        cdef sn_peer_slot *s
        while True:
            s = &self.t.slots[i]
            if not s.used:
                break
            if s.hash == h and s.vni == vni and s.family == fam and memcmp(s.addr, ap, 16) == 0:
                raise KeyError(f"VTEP {addr} is admitted for VNI {vni} already")
            i = (i + 1) & self.t.mask
        if self.t.count >= self.t.max_entries:
            raise OverflowError(f"admitted VTEPs: table full ({self.t.max_entries})")
        s.vni = vni
        s.hash = h
        memcpy(s.addr, ap, 16)
        s.family = fam
        s.vtep = vtep
        s.used = 1
        self.t.count += 1

    def remove(self, uint32_t vni, addr):
        cdef uint8_t fam
        cdef bytes a = _peer_addr(addr, &fam)
        cdef const uint8_t *ap = a
        cdef uint32_t h = sn_peer_key_hash(vni, fam, ap)
        cdef uint32_t mask = self.t.mask
        cdef uint32_t i = h & mask
        cdef uint32_t j
        cdef sn_peer_slot *s
        while True:
            s = &self.t.slots[i]
            if not s.used:
                raise KeyError(f"VTEP {addr} is not admitted for VNI {vni}")
            if s.hash == h and s.vni == vni and s.family == fam and memcmp(s.addr, ap, 16) == 0:
                break
            i = (i + 1) & mask
        j = i
        while True:
            j = (j + 1) & mask
            if not self.t.slots[j].used:
                break
            if _moves(self.t.slots[j].hash & mask, i, j, mask):
                self.t.slots[i] = self.t.slots[j]
                i = j
        memset(&self.t.slots[i], 0, sizeof(sn_peer_slot))
        self.t.count -= 1

    def lookup(self, uint32_t vni, addr):
        """The VTEP index admitted for (vni, addr), or None."""
        cdef uint8_t fam
        cdef bytes a = _peer_addr(addr, &fam)
        cdef const sn_peer_slot *s = sn_peer_lookup(&self.t, vni, fam, a)
        return None if s == NULL else s.vtep

    def entries(self):
        """[(vni, address, vtep)] in slot order."""
        cdef uint32_t i
        out = []
        for i in range(self.t.mask + 1):
            s = &self.t.slots[i]
            if s.used:
                raw = bytes(s.addr[:16])
                out.append((s.vni, ipaddress.ip_address(raw[:4] if s.family == SN_TAF_INET
                                                        else raw), s.vtep))
        return out


# --- policy ---------------------------------------------------------------------------

cdef inline bint _match(const uint64_t *net, const uint64_t *mask,
                        const uint64_t *a) noexcept nogil:
    return ((a[0] & mask[0]) == net[0]) and ((a[1] & mask[1]) == net[1])


cdef int sn_policy_lookup(const sn_policy_table *t, uint32_t vf, uint8_t dir, uint8_t family,
                          const uint8_t *src, const uint8_t *dst, uint8_t proto,
                          uint16_t sport, uint16_t dport, void **sa) noexcept nogil:
    """First rule of VF vf's list (ordered by priority, then age) whose selectors all
    match the packet: direction, family, src/dst prefix, protocol (or any), port ranges.
    src/dst: the addresses in wire order, 4 bytes read for SN_TAF_INET, 16 otherwise
    (they may point straight into the packet). Ports: the
    caller passes 0 for protocols without ports (so only full-range rules match them).
    Returns the rule's action (SN_POLICY_PROTECT sets *sa) or SN_POLICY_NONE when no
    rule matches or vf is out of range. Reads only."""
    cdef uint64_t a[2]
    cdef uint64_t b[2]
    cdef const sn_policy_rule *r
    cdef uint32_t _i, n
    if vf >= t.n_vfs:
        return SN_POLICY_NONE
    n = t.n[vf]
    if n == 0:
        return SN_POLICY_NONE
    if family == SN_TAF_INET:
        # IPv4: read only the 4 address bytes (callers may point into the packet itself)
        a[0] = 0
        a[1] = 0
        b[0] = 0
        b[1] = 0
        memcpy(a, src, 4)
        memcpy(b, dst, 4)
    else:
        memcpy(a, src, 16)
        memcpy(b, dst, 16)
    r = t.rules + <size_t>vf * t.max_rules
    for _i in range(n):
        if (r.dir == dir and r.family == family
                and (r.proto == SN_PROTO_ANY or r.proto == proto)
                and r.sport_lo <= sport <= r.sport_hi
                and r.dport_lo <= dport <= r.dport_hi
                and _match(r.src_net, r.src_mask, a)
                and _match(r.dst_net, r.dst_mask, b)):
            if r.action == SN_POLICY_PROTECT:
                sa[0] = r.sa
            return r.action
        r += 1
    return SN_POLICY_NONE


cdef void _prefix(object net, uint64_t *addr, uint64_t *mask):
    cdef uint8_t a[16]
    cdef uint8_t m[16]
    memset(a, 0, 16)
    memset(m, 0, 16)
    ab = net.network_address.packed
    mb = net.netmask.packed
    memcpy(a, <const char *>ab, len(ab))
    memcpy(m, <const char *>mb, len(mb))
    memcpy(addr, a, 16)
    memcpy(mask, m, 16)


cdef (uint16_t, uint16_t) _range(object r) except *:
    if r is None:
        return 0, 0xFFFF
    if isinstance(r, int):
        r = (r, r)
    lo, hi = r
    if not 0 <= lo <= hi <= 0xFFFF:
        raise ValueError("port range must satisfy 0 <= lo <= hi <= 65535")
    return lo, hi


cdef class PolicyTable:
    """Per-VF ordered security policies (SPD). Rules are kept sorted by (priority, id);
    lookup returns the first match. Actions: 'protect' (with an SA handle), 'bypass',
    'discard'."""

    def __cinit__(self, uint32_t n_vfs=64, uint32_t max_rules=64):
        if n_vfs == 0 or max_rules == 0 or <uint64_t>n_vfs * max_rules > (1u << 24):
            raise ValueError("n_vfs and max_rules must be positive and n_vfs*max_rules <= 2**24")
        self.t.rules = <sn_policy_rule *>calloc(<size_t>n_vfs * max_rules,
                                                sizeof(sn_policy_rule))
        self.t.n = <uint32_t *>calloc(n_vfs, sizeof(uint32_t))
        if self.t.rules == NULL or self.t.n == NULL:
            raise MemoryError()
        self.t.n_vfs = n_vfs
        self.t.max_rules = max_rules
        self.t.next_id = 1

    def __dealloc__(self):
        free(self.t.rules)
        free(self.t.n)

    cdef sn_policy_rule *_list(self, uint32_t vf) except NULL:
        if vf >= self.t.n_vfs:
            raise IndexError(f"vf {vf} out of range (0..{self.t.n_vfs - 1})")
        return self.t.rules + <size_t>vf * self.t.max_rules

    def add(self, uint32_t vf, *, src="0.0.0.0/0", dst=None, proto=None, sport=None,
            dport=None, action="protect", dir="out", uint32_t priority=1000,
            uintptr_t sa=0):
        """Add a rule; returns its id. dst defaults to the any-prefix of src's family."""
        cdef sn_policy_rule r
        cdef sn_policy_rule *lst = self._list(vf)
        cdef uint32_t n = self.t.n[vf]
        cdef uint32_t pos
        s = ipaddress.ip_network(src, strict=False)
        d = ipaddress.ip_network(dst if dst is not None else
                                 ("0.0.0.0/0" if s.version == 4 else "::/0"), strict=False)
        if s.version != d.version:
            raise ValueError("src and dst prefixes differ in family")
        if action not in ACTIONS[1:]:
            raise ValueError(f"action must be one of {ACTIONS[1:]}")
        if action == "protect" and sa == 0:
            raise ValueError("a protect rule needs an SA handle")
        if proto is not None and not 0 <= proto <= 255:
            raise ValueError("proto must be 0..255 or None (any)")
        if n >= self.t.max_rules:
            raise OverflowError(f"policy list of vf {vf} full ({self.t.max_rules} rules)")
        memset(&r, 0, sizeof(r))
        _prefix(s, r.src_net, r.src_mask)
        _prefix(d, r.dst_net, r.dst_mask)
        r.family = SN_TAF_INET if s.version == 4 else SN_TAF_INET6
        r.proto = SN_PROTO_ANY if proto is None else proto
        r.sport_lo, r.sport_hi = _range(sport)
        r.dport_lo, r.dport_hi = _range(dport)
        r.action = ACTIONS.index(action)
        r.dir = _dir(dir)
        r.priority = priority
        r.sa = <void *>sa if action == "protect" else NULL
        r.id = self.t.next_id
        self.t.next_id += 1
        pos = n
        while pos > 0 and lst[pos - 1].priority > priority:
            pos -= 1
        memmove(&lst[pos + 1], &lst[pos], (n - pos) * sizeof(sn_policy_rule))
        lst[pos] = r
        self.t.n[vf] = n + 1
        return r.id

    def remove(self, uint32_t vf, uint32_t rule_id):
        cdef sn_policy_rule *lst = self._list(vf)
        cdef uint32_t n = self.t.n[vf]
        cdef uint32_t i
        for i in range(n):
            if lst[i].id == rule_id:
                memmove(&lst[i], &lst[i + 1], (n - i - 1) * sizeof(sn_policy_rule))
                self.t.n[vf] = n - 1
                return
        raise KeyError(f"no rule {rule_id} for vf {vf}")

    def clear(self, uint32_t vf):
        self._list(vf)
        self.t.n[vf] = 0

    def __len__(self):
        return sum(self.t.n[i] for i in range(self.t.n_vfs))

    def count(self, uint32_t vf):
        self._list(vf)
        return self.t.n[vf]

    def lookup(self, uint32_t vf, dir, src, dst, proto, sport=0, dport=0):
        """(action, sa handle or None) of the first matching rule, ('none', None) else."""
        cdef uint8_t a[16]
        cdef uint8_t b[16]
        cdef void *sa = NULL
        cdef int r
        s = ipaddress.ip_address(src)
        d = ipaddress.ip_address(dst)
        if s.version != d.version:
            raise ValueError("src and dst differ in family")
        memset(a, 0xAB, 16)      # bytes past an IPv4 address must not matter
        memset(b, 0xCD, 16)
        sb = s.packed
        db = d.packed
        memcpy(a, <const char *>sb, len(sb))
        memcpy(b, <const char *>db, len(db))
        r = sn_policy_lookup(&self.t, vf, _dir(dir),
                             SN_TAF_INET if s.version == 4 else SN_TAF_INET6,
                             a, b, proto, sport, dport, &sa)
        return ACTIONS[r], (<uintptr_t>sa if r == SN_POLICY_PROTECT else None)

    def rules(self, uint32_t vf):
        """The rules of vf in match order, as dicts (no SA contents, only the handle)."""
        cdef sn_policy_rule *lst = self._list(vf)
        cdef uint32_t i
        out = []
        for i in range(self.t.n[vf]):
            out.append({"id": lst[i].id, "priority": lst[i].priority,
                        "action": ACTIONS[lst[i].action],
                        "dir": "in" if lst[i].dir == SN_DIR_IN else "out",
                        "proto": None if lst[i].proto == SN_PROTO_ANY else lst[i].proto,
                        "sport": (lst[i].sport_lo, lst[i].sport_hi),
                        "dport": (lst[i].dport_lo, lst[i].dport_hi)})
        return out
