# Virtio 1.1 §2.6 split virtqueues (descriptor table, available and used rings, §2.6.5.3
# indirect descriptors, §2.6.7-8 EVENT_IDX notification suppression), §5.1.6 virtio-net
# header and mergeable RX buffers; vhost-user memory regions and vring addresses
# (QEMU docs/interop/vhost-user.rst, "Memory regions description", "Vring address").
#
# Everything here is generic: it moves byte chains between guest rings and caller
# buffers and knows nothing about softnic's packet slots. Ring memory is little-endian
# guest memory shared with a running guest: every value read from it is guest-controlled
# and may change between two reads, so each is loaded once, then validated.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from *:
    """
    /* Shared-memory accessors for the rings. x86-64 and aarch64 Linux are little-endian
       like virtio 1.x, so no byte swapping. Acquire on the producer's index, release on
       ours, a full fence before the notification decision (virtio 1.1 §2.6.13.3 / 2.6.14
       and Linux virtio_ring.c: a store-load ordering is needed there). */
    static inline uint16_t vh_load16_acquire(const uint16_t *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline uint16_t vh_load16(const uint16_t *p) {
        return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline void vh_store16_release(uint16_t *p, uint16_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline void vh_store16(uint16_t *p, uint16_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELAXED); }
    static inline void vh_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    static inline void vh_wmb(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
    """
    uint16_t vh_load16_acquire(const uint16_t *p) noexcept nogil
    uint16_t vh_load16(const uint16_t *p) noexcept nogil
    void vh_store16_release(uint16_t *p, uint16_t v) noexcept nogil
    void vh_store16(uint16_t *p, uint16_t v) noexcept nogil
    void vh_mb() noexcept nogil
    void vh_wmb() noexcept nogil

cdef enum:
    VH_MAX_REGIONS = 32          # GET_MAX_MEM_SLOTS answer; SET_MEM_TABLE carries <= 8
    VH_MAX_QUEUE_SIZE = 32768    # virtio 1.1 §2.6: split ring size is a power of 2 <= 32768
    VRING_DESC_F_NEXT = 1
    VRING_DESC_F_WRITE = 2
    VRING_DESC_F_INDIRECT = 4
    VRING_USED_F_NO_NOTIFY = 1
    VRING_AVAIL_F_NO_INTERRUPT = 1
    VH_VNET_HDR_LEN = 12         # the header callers pass and receive (VERSION_1 layout)

# Why a chain or a ring was rejected. Names in vhost._virtq.VQ_ERRORS, same order.
# Reasons below VQ_ERR_FIRST_DROP break the ring (the guest corrupted the ring structure:
# no later index can be trusted); the others drop one chain, return it to the guest with
# used length 0, and the ring goes on.
cdef enum:  # vh_vq_err
    VQ_OK = 0
    VQ_ERR_AVAIL_IDX = 1         # avail idx moved more than the ring size past last_avail
    VQ_ERR_HEAD = 2              # head index >= ring size
    VQ_ERR_NEXT = 3              # next index >= ring size (or indirect table length)
    VQ_ERR_LOOP = 4              # chain longer than its table: a loop
    VQ_ERR_INDIRECT_LEN = 5      # indirect table length 0, not a multiple of 16, > 16 * num
    VQ_ERR_INDIRECT_ADDR = 6     # indirect table not inside one memory region
    VQ_ERR_INDIRECT_NESTED = 7   # INDIRECT inside an indirect table, or INDIRECT|NEXT
    VQ_ERR_INDIRECT_OFF = 8      # INDIRECT used but VIRTIO_RING_F_INDIRECT_DESC not negotiated
    VQ_ERR_ADDR = 9              # buffer address not translatable (outside guest memory)
    VQ_ERR_RING_ADDR = 10        # desc/avail/used ring not inside one region
    VQ_ERR_MEM_FAULT = 11        # guest memory faulted (SIGBUS/SIGSEGV): its file shrank
    VQ_ERR_FIRST_DROP = 12
    VQ_ERR_ZERO_LEN = 12         # zero-length descriptor
    VQ_ERR_ORDER = 13            # writable before readable, or wrong direction for the queue
    VQ_ERR_TOO_SHORT = 14        # TX chain shorter than the virtio-net header
    VQ_ERR_TOO_LONG = 15         # TX chain longer than the caller's buffer
    VQ_ERR_RX_TOO_BIG = 16       # RX frame does not fit the chain (no MRG_RXBUF)
    VQ_ERR_RX_RUNT = 17          # RX frame from the caller shorter than the 12-byte header
    VQ_ERR_MAX = 18

cdef struct vh_region:
    uint64_t gpa                 # guest physical address of the region
    uint64_t size
    uint64_t uva                 # frontend (QEMU) virtual address of the region
    uint64_t mmap_offset         # offset of the region in its fd
    uint8_t *host                # our address of byte 0 of the region
    void *map_base               # mmap() result (mapping starts at fd offset 0)
    uint64_t map_len

cdef struct vh_mem:
    uint32_t n
    vh_region r[VH_MAX_REGIONS]

cdef struct vh_vq:
    uint32_t num                 # ring size, power of 2; 0 = not configured
    uint64_t desc_uva            # as set by SET_VRING_ADDR (re-translated on memory change)
    uint64_t avail_uva
    uint64_t used_uva
    uint8_t *desc                # translated ring pointers; NULL while not ready
    uint16_t *avail              # [flags, idx, ring[num], used_event]
    uint8_t *used                # u16 flags, u16 idx, {u32 id, u32 len}[num], u16 avail_event
    uint16_t last_avail_idx
    uint16_t used_idx            # our shadow of used->idx
    uint16_t signalled_used      # used idx at the last notification (EVENT_IDX)
    uint8_t signalled_valid
    uint8_t event_idx            # VIRTIO_RING_F_EVENT_IDX negotiated
    uint8_t indirect             # VIRTIO_RING_F_INDIRECT_DESC negotiated
    uint8_t hdr_len              # guest's virtio-net header: 12 (VERSION_1/MRG_RXBUF) or 10
    uint8_t ready                # pointers valid and the ring is running
    uint8_t broken               # the vh_vq_err that stopped the ring, 0 = healthy
    int call_fd                  # eventfd to interrupt the guest (O_NONBLOCK), -1 = none
    int err_fd                   # eventfd the control thread signals when the ring breaks
    uint64_t err[VQ_ERR_MAX]     # per-reason counters (err[0] unused)
    uint64_t frames              # frames moved
    uint64_t bytes               # bytes moved (with the virtio-net header)
    uint64_t notifies            # notifications due (call eventfd writes if a call fd)
    uint64_t notify_failed       # of which the call eventfd refused (counter full, error)
    uint64_t batches             # calls that moved at least one chain
    const vh_mem *mem            # the table the rings were translated in (the guard's)


# Guest-physical / frontend-virtual to our address. *plen is clamped to the bytes left in
# the region; NULL when addr is in no region. Guest-controlled addr: no overflow possible
# since addr - gpa < size is compared, never addr + len.
cdef inline uint8_t *vh_gpa_clamp(const vh_mem *m, uint64_t addr, uint64_t *plen) noexcept nogil:
    cdef uint32_t i
    cdef uint64_t off
    for i in range(m.n):
        if addr >= m.r[i].gpa:
            off = addr - m.r[i].gpa
            if off < m.r[i].size:
                if plen[0] > m.r[i].size - off:
                    plen[0] = m.r[i].size - off
                return m.r[i].host + off
    return NULL


# [addr, addr+len) entirely inside one region (len > 0), else NULL.
cdef inline uint8_t *vh_gpa_range(const vh_mem *m, uint64_t addr, uint64_t length) noexcept nogil:
    cdef uint64_t got = length
    cdef uint8_t *p
    if length == 0:
        return NULL
    p = vh_gpa_clamp(m, addr, &got)
    if p == NULL or got != length:
        return NULL
    return p


cdef inline uint8_t *vh_uva_range(const vh_mem *m, uint64_t addr, uint64_t length) noexcept nogil:
    cdef uint32_t i
    cdef uint64_t off
    if length == 0:
        return NULL
    for i in range(m.n):
        if addr >= m.r[i].uva:
            off = addr - m.r[i].uva
            if off < m.r[i].size and length <= m.r[i].size - off:
                return m.r[i].host + off
    return NULL


# The data-path entry points (see their header comments in _virtq.pyx). Each runs under
# a guard: a fault (SIGBUS, SIGSEGV) on the guest memory of `mem` breaks the ring
# (VQ_ERR_MEM_FAULT) and returns as if the ring had been empty; the process lives on.
cdef int vq_pop_chains(vh_vq *vq, const vh_mem *mem, uint8_t **bufs, const uint32_t *caps,
                       uint32_t *lens, int max_chains) noexcept nogil
cdef int vq_push_frames(vh_vq *vq, const vh_mem *mem, const uint8_t **frames,
                        const uint32_t *lens, int n, bint mergeable) noexcept nogil
cdef void vq_notify(vh_vq *vq) noexcept nogil
cdef int vq_avail_count(vh_vq *vq) noexcept nogil
cdef void vq_enable_kicks(vh_vq *vq, bint enable) noexcept nogil


cdef class MemTable:
    cdef vh_mem m
    cdef void _clear(self) noexcept


cdef class Virtq:
    cdef vh_vq q
    cdef readonly MemTable mem
    cdef readonly int index
    cdef public int kick_fd
    cdef void _reset(self) noexcept
    cdef bint _translate(self) noexcept
