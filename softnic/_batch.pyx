# cython: language_level=3
"""Batches of packet slots: the unit every data-plane entry point works on."""

from libc.stdint cimport uint8_t, uint32_t
from libc.stdlib cimport free
from libc.string cimport memcpy, memset

from posix.stdlib cimport posix_memalign

from softnic._pkt cimport SN_DROP_MAX, SN_HEADROOM, SN_SLOT_SIZE, sn_pkt

DROP_REASONS = (
    "ok", "malformed_l2", "malformed_l3", "malformed_l4", "bad_vnet_hdr", "too_big",
    "no_room", "no_sa", "policy", "replay", "icv", "bad_trailer", "seq_exhausted",
    "sa_expired", "bad_vxlan", "unknown_vni", "no_fdb", "ring_full", "malformed_esp",
    "crypto", "no_route", "unknown_vtep",
)
assert len(DROP_REASONS) == SN_DROP_MAX


cdef class Batch:
    """A fixed pool of packet slots in one aligned allocation.

    Tests and benchmarks load packets with `push` and read them with `get`; the data
    plane works on `pkts` directly. Slots are reused: `clear` resets offsets, it does not
    free or zero memory.
    """

    def __cinit__(self, int size=256, int slot_size=SN_SLOT_SIZE, int headroom=SN_HEADROOM):
        cdef void *mem = NULL
        if size <= 0 or slot_size <= headroom:
            raise ValueError("size must be > 0 and slot_size > headroom")
        if posix_memalign(&mem, 64, <size_t>size * slot_size) != 0:
            raise MemoryError()
        self.arena = <uint8_t *>mem
        if posix_memalign(&mem, 64, <size_t>size * sizeof(sn_pkt)) != 0:
            free(self.arena)
            self.arena = NULL
            raise MemoryError()
        self.pkts = <sn_pkt *>mem
        self.size = size
        self.slot_size = slot_size
        self.headroom = headroom
        self.count = 0
        self.clear()

    def __dealloc__(self):
        free(self.pkts)
        free(self.arena)

    cpdef clear(self):
        cdef int i
        memset(self.pkts, 0, self.size * sizeof(sn_pkt))
        for i in range(self.size):
            self.pkts[i].data = self.arena + <size_t>i * self.slot_size
            self.pkts[i].cap = self.slot_size
            self.pkts[i].off = self.headroom
        self.count = 0

    def push(self, const uint8_t[::1] frame not None, uint32_t port=0):
        """Append one packet (copied) at the headroom offset; returns its index."""
        cdef sn_pkt *p
        if self.count >= self.size:
            raise IndexError("batch full")
        if <size_t>frame.shape[0] > self.slot_size - self.headroom:
            raise ValueError("packet larger than a slot")
        p = &self.pkts[self.count]
        p.off = self.headroom
        p.len = frame.shape[0]
        p.port = port
        p.drop = 0
        p.flags = 0
        p.hash = 0
        if p.len:
            memcpy(p.data + p.off, &frame[0], p.len)
        self.count += 1
        return self.count - 1

    def get(self, int i):
        """The bytes of packet i."""
        if i < 0 or i >= self.count:
            raise IndexError(i)
        return (<char *>self.pkts[i].data)[self.pkts[i].off:self.pkts[i].off + self.pkts[i].len]

    def drop_reason(self, int i):
        if i < 0 or i >= self.count:
            raise IndexError(i)
        return DROP_REASONS[self.pkts[i].drop]

    def port(self, int i):
        if i < 0 or i >= self.count:
            raise IndexError(i)
        return self.pkts[i].port

    @property
    def count(self):
        """Packets in use. Settable from Python (e.g. 0 to reuse the batch), never past
        size: the data plane trusts it."""
        return self.count

    @count.setter
    def count(self, int n):
        if n < 0 or n > self.size:
            raise ValueError(f"count must be 0..{self.size}")
        self.count = n

    def __len__(self):
        return self.count
