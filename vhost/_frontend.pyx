# Virtio 1.1 §2.6 split virtqueues from the DRIVER side (§2.6.13 supplying buffers,
# §2.6.14 receiving used buffers, §2.6.7-8 notification suppression), and §5.1.6 the
# virtio-net driver's TX/RX handling: the guest half of vhost.testing's frontend.
#
# Written apart from _virtq.pyx on purpose (it cimports nothing from it): a test pits an
# independent driver-side implementation against the device side. The ring is trusted
# here (it is ours); what the device writes (used entries, num_buffers) is checked and
# counted in .bad_used.

from libc.errno cimport errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.unistd cimport read, write

cdef extern from *:
    """
    static inline uint16_t fe_load16_acquire(const uint16_t *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline uint16_t fe_load16(const uint16_t *p) {
        return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline void fe_store16_release(uint16_t *p, uint16_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline void fe_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    """
    uint16_t fe_load16_acquire(const uint16_t *p) noexcept nogil
    uint16_t fe_load16(const uint16_t *p) noexcept nogil
    void fe_store16_release(uint16_t *p, uint16_t v) noexcept nogil
    void fe_mb() noexcept nogil

cdef enum:
    F_NEXT = 1
    F_WRITE = 2
    HDR = 12


cdef class GuestRam:
    """The guest's RAM: one shared mapping of a memfd, addressed by fd offset."""
    cdef uint8_t *base
    cdef readonly uint64_t size

    def __cinit__(self, int fd, uint64_t size):
        cdef void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if p == MAP_FAILED:
            raise OSError(errno, "mmap of guest RAM failed")
        self.base = <uint8_t *>p
        self.size = size

    def __dealloc__(self):
        self.close()

    def close(self):
        if self.base != NULL:
            munmap(self.base, self.size)
            self.base = NULL

    cdef uint8_t *at(self, uint64_t off, uint64_t n) except NULL:
        if self.base == NULL or off > self.size or n > self.size - off:
            raise ValueError("outside guest RAM")
        return self.base + off

    def read(self, uint64_t off, uint64_t n):
        return (<char *>self.at(off, n))[:n]

    def write(self, uint64_t off, const uint8_t[:] data):
        cdef uint64_t n = len(data)
        cdef uint8_t *p = self.at(off, n)
        if n:
            memcpy(p, &data[0], n)


cdef class DriverRing:
    """One virtqueue as the guest driver sees it, with a buffer of buf_size bytes per
    descriptor. Offsets are into GuestRam; gpa_delta turns an offset into a guest
    physical address (the region the ring lives in)."""
    cdef GuestRam ram
    cdef uint8_t *desc
    cdef uint16_t *avail
    cdef uint8_t *used
    cdef uint8_t *bufs
    cdef uint64_t buf_gpa
    cdef readonly uint32_t num
    cdef readonly uint32_t buf_size
    cdef readonly uint16_t avail_idx
    cdef readonly uint16_t last_used
    cdef uint16_t kicked_idx
    cdef uint16_t *free_ids
    cdef readonly int nfree
    cdef readonly bint event_idx
    cdef public int kick_fd
    cdef public int call_fd
    cdef readonly uint64_t kicks
    cdef readonly uint64_t frames
    cdef readonly uint64_t octets
    cdef readonly uint64_t bad_used
    cdef readonly uint64_t desc_off
    cdef readonly uint64_t avail_off
    cdef readonly uint64_t used_off

    def __cinit__(self, GuestRam ram not None, uint64_t ring_off, uint64_t buf_off,
                  long long gpa_delta, uint32_t num, uint32_t buf_size, bint event_idx):
        cdef uint32_t i
        if num == 0 or num & (num - 1) or num > 32768 or buf_size < HDR:
            raise ValueError("bad ring size or buffer size")
        self.ram = ram
        self.num = num
        self.buf_size = buf_size
        self.event_idx = event_idx
        self.desc_off = ring_off
        self.avail_off = ring_off + 16 * num
        self.used_off = (self.avail_off + 6 + 2 * num + 63) & ~(<uint64_t>63)
        self.desc = ram.at(self.desc_off, 16 * num)
        self.avail = <uint16_t *>ram.at(self.avail_off, 6 + 2 * num)
        self.used = ram.at(self.used_off, 6 + 8 * num)
        self.bufs = ram.at(buf_off, <uint64_t>num * buf_size)
        self.buf_gpa = buf_off + <uint64_t>gpa_delta
        memset(self.desc, 0, 16 * num)
        memset(self.avail, 0, 6 + 2 * num)
        memset(self.used, 0, 6 + 8 * num)
        self.free_ids = <uint16_t *>malloc(num * sizeof(uint16_t))
        if self.free_ids == NULL:
            raise MemoryError()
        for i in range(num):
            self.free_ids[i] = <uint16_t>(num - 1 - i)
        self.nfree = num
        self.kick_fd = -1
        self.call_fd = -1

    def __dealloc__(self):
        free(self.free_ids)

    @staticmethod
    def layout_size(uint32_t num):
        """Bytes the ring structures need at ring_off (desc, avail, used)."""
        return ((16 * num + 6 + 2 * num + 63) & ~63) + 6 + 8 * num

    # --- notification ---
    cdef void _publish(self) noexcept nogil:
        fe_store16_release(&self.avail[1], self.avail_idx)

    cdef bint _need_kick(self) noexcept nogil:
        # virtio 1.1 §2.6.10.1: after publishing, a full barrier, then the device's wish
        cdef uint16_t new = self.avail_idx
        cdef uint16_t old = self.kicked_idx
        cdef uint16_t ev
        fe_mb()
        self.kicked_idx = new
        if self.event_idx:
            ev = fe_load16(<uint16_t *>(self.used + 4 + 8 * <uint64_t>self.num))
            return <uint16_t>(new - ev - 1) < <uint16_t>(new - old)
        return not (fe_load16(<uint16_t *>self.used) & 1)

    cdef void _kick(self) noexcept nogil:
        cdef uint64_t one = 1
        self._publish()
        if self._need_kick() and self.kick_fd >= 0:
            write(self.kick_fd, &one, 8)
            self.kicks += 1

    def kick(self):
        """Publishes the avail idx and kicks the device if it wants a kick."""
        self._kick()

    def interrupts(self):
        """Reads (and clears) the call eventfd: how many interrupts since last time."""
        cdef uint64_t v = 0
        if self.call_fd >= 0 and read(self.call_fd, &v, 8) != 8:
            return 0
        return v

    def set_used_event(self, uint16_t v):
        """EVENT_IDX: interrupt me when the used idx passes v."""
        fe_store16_release(&self.avail[2 + self.num], v)

    def set_no_interrupt(self, bint on):
        self.avail[0] = 1 if on else 0

    # --- TX (driver -> device) ---
    cdef int _send_one(self, const uint8_t *p, uint32_t n) noexcept nogil:
        # Chains ceil(n / buf_size) buffers; 0 if not enough are free.
        cdef uint32_t k = (n + self.buf_size - 1) // self.buf_size
        cdef uint32_t j, chunk
        cdef uint16_t id, head = 0, prev = 0
        cdef uint8_t *d
        cdef uint64_t gpa
        if k == 0 or k > <uint32_t>self.nfree:
            return 0
        for j in range(k):
            self.nfree -= 1
            id = self.free_ids[self.nfree]
            chunk = n if n < self.buf_size else self.buf_size
            memcpy(self.bufs + <uint64_t>id * self.buf_size, p, chunk)
            d = self.desc + 16 * <uint64_t>id
            gpa = self.buf_gpa + <uint64_t>id * self.buf_size
            memcpy(d, &gpa, 8)
            memcpy(d + 8, &chunk, 4)
            (<uint16_t *>(d + 12))[0] = 0
            if j == 0:
                head = id
            else:
                (<uint16_t *>(self.desc + 16 * <uint64_t>prev + 12))[0] = F_NEXT
                (<uint16_t *>(self.desc + 16 * <uint64_t>prev + 14))[0] = id
            prev = id
            p += chunk
            n -= chunk
        self.avail[2 + (self.avail_idx & (self.num - 1))] = head
        self.avail_idx += 1
        return 1

    def send(self, frames, bint kick=True):
        """Queues frames (each with its 12-byte virtio-net header); returns how many
        fitted. Kicks once at the end."""
        cdef int sent = 0
        cdef const uint8_t[:] v
        self.reclaim()
        for f in frames:
            v = f
            if len(v) == 0 or not self._send_one(&v[0], len(v)):
                break
            sent += 1
        if sent and kick:
            self._kick()
        return sent

    def send_burst(self, const uint8_t[:] frame, int n):
        """Benchmark source: queues up to n copies of frame, kicks once; returns count."""
        cdef int sent = 0
        cdef uint32_t flen = len(frame)
        if flen == 0:
            return 0
        with nogil:
            self._reclaim()
            while sent < n and self._send_one(&frame[0], flen):
                sent += 1
            if sent:
                self._kick()
        return sent

    cdef int _reclaim(self) noexcept nogil:
        # Frees the chains the device has used (TX); bounded walk over our own table.
        cdef uint16_t used_idx = fe_load16_acquire(<uint16_t *>(self.used + 2))
        cdef uint32_t id, steps
        cdef uint16_t flags
        cdef int n = 0
        while self.last_used != used_idx:
            memcpy(&id, self.used + 4 + 8 * <uint64_t>(self.last_used & (self.num - 1)), 4)
            self.last_used += 1
            n += 1
            steps = 0
            while id < self.num and steps < self.num:
                self.free_ids[self.nfree] = <uint16_t>id
                self.nfree += 1
                steps += 1
                flags = (<uint16_t *>(self.desc + 16 * <uint64_t>id + 12))[0]
                if not (flags & F_NEXT):
                    break
                id = (<uint16_t *>(self.desc + 16 * <uint64_t>id + 14))[0]
            if id >= self.num:
                self.bad_used += 1
        return n

    def reclaim(self):
        return self._reclaim()

    # --- RX (device -> driver) ---
    cdef void _refill(self) noexcept nogil:
        cdef uint16_t id
        cdef uint8_t *d
        cdef uint64_t gpa
        cdef uint16_t fl = F_WRITE
        cdef bint any_ = False
        while self.nfree:
            self.nfree -= 1
            id = self.free_ids[self.nfree]
            d = self.desc + 16 * <uint64_t>id
            gpa = self.buf_gpa + <uint64_t>id * self.buf_size
            memcpy(d, &gpa, 8)
            memcpy(d + 8, &self.buf_size, 4)
            memcpy(d + 12, &fl, 2)
            (<uint16_t *>(d + 14))[0] = 0
            self.avail[2 + (self.avail_idx & (self.num - 1))] = id
            self.avail_idx += 1
            any_ = True
        if any_:
            self._kick()

    def refill(self):
        """Posts every free buffer as a device-writable one-descriptor chain."""
        self._refill()

    cdef int _take(self, uint16_t used_idx, uint32_t *id, uint32_t *n) noexcept nogil:
        memcpy(id, self.used + 4 + 8 * <uint64_t>(self.last_used & (self.num - 1)), 4)
        memcpy(n, self.used + 8 + 8 * <uint64_t>(self.last_used & (self.num - 1)), 4)
        if id[0] >= self.num or n[0] > self.buf_size:
            self.bad_used += 1
            return -1
        return 0

    cdef int _recv(self, int max_frames, bint mergeable, list out) except -1:
        # Collects up to max_frames frames; appends bytes to out unless it is None.
        cdef uint16_t used_idx = fe_load16_acquire(<uint16_t *>(self.used + 2))
        cdef uint32_t id, n, nb, _j
        cdef uint64_t total
        cdef uint16_t avail_n
        cdef int got = 0
        cdef uint8_t *b
        cdef bytearray frame
        while got < max_frames and self.last_used != used_idx:
            avail_n = <uint16_t>(used_idx - self.last_used)
            if self._take(used_idx, &id, &n) < 0:
                self.last_used += 1
                continue
            b = self.bufs + <uint64_t>id * self.buf_size
            nb = 1
            if mergeable and n >= HDR:
                nb = b[10] | (<uint32_t>b[11] << 8)
                if nb == 0 or nb > avail_n:
                    self.bad_used += 1
                    nb = 1 if nb == 0 else nb
                    if nb > avail_n:
                        break  # device published a partial frame: wait
            frame = bytearray((<char *>b)[:n]) if out is not None else None
            total = n
            self.free_ids[self.nfree] = <uint16_t>id
            self.nfree += 1
            self.last_used += 1
            for _j in range(1, nb):
                if self._take(used_idx, &id, &n) < 0:
                    self.last_used += 1
                    continue
                if out is not None:
                    frame += (<char *>(self.bufs + <uint64_t>id * self.buf_size))[:n]
                total += n
                self.free_ids[self.nfree] = <uint16_t>id
                self.nfree += 1
                self.last_used += 1
            if out is not None:
                out.append(bytes(frame))
            self.frames += 1
            self.octets += total
            got += 1
        return got

    def recv(self, int max_frames=256, bint mergeable=True):
        """Frames the device delivered (with their 12-byte headers); reposts buffers."""
        out = []
        self._recv(max_frames, mergeable, out)
        self._refill()
        return out

    def recv_count(self, int max_frames=256):
        """Benchmark sink: consumes up to max_frames one-buffer frames without copying;
        returns how many. Reposts buffers."""
        cdef uint16_t used_idx
        cdef uint32_t id, n
        cdef int got = 0
        with nogil:
            used_idx = fe_load16_acquire(<uint16_t *>(self.used + 2))
            while got < max_frames and self.last_used != used_idx:
                if self._take(used_idx, &id, &n) == 0:
                    self.free_ids[self.nfree] = <uint16_t>id
                    self.nfree += 1
                    self.octets += n
                    self.frames += 1
                    got += 1
                self.last_used += 1
            self._refill()
        return got

    # --- raw access for hostile-guest tests ---
    def write_desc(self, uint16_t i, uint64_t addr, uint32_t length, uint16_t flags,
                   uint16_t nxt):
        """Writes descriptor i of this ring's table verbatim (i < num)."""
        if i >= self.num:
            raise IndexError(i)
        cdef uint8_t *d = self.desc + 16 * <uint64_t>i
        memcpy(d, &addr, 8)
        memcpy(d + 8, &length, 4)
        memcpy(d + 12, &flags, 2)
        memcpy(d + 14, &nxt, 2)

    def post(self, uint16_t head, bint kick=True):
        """Puts head (any value: hostile tests) in the avail ring and publishes it."""
        self.avail[2 + (self.avail_idx & (self.num - 1))] = head
        self.avail_idx += 1
        if kick:
            self._kick()
        else:
            self._publish()

    def set_avail_idx(self, uint16_t v):
        """Publishes an arbitrary avail idx (hostile tests)."""
        self.avail_idx = v
        self._publish()

    def buf_addr(self, uint16_t i):
        """Guest physical address of buffer i."""
        return self.buf_gpa + <uint64_t>i * self.buf_size

    def take_free(self):
        """Removes one free descriptor id from the free list and returns it."""
        if self.nfree == 0:
            raise IndexError("no free descriptor")
        self.nfree -= 1
        return self.free_ids[self.nfree]

    @property
    def used_idx(self):
        return fe_load16_acquire(<uint16_t *>(self.used + 2))

    @property
    def used_flags(self):
        return fe_load16(<uint16_t *>self.used)

    def used_elem(self, uint16_t slot):
        """(id, len) of used ring entry slot."""
        cdef uint32_t id, n
        memcpy(&id, self.used + 4 + 8 * <uint64_t>(slot & (self.num - 1)), 4)
        memcpy(&n, self.used + 8 + 8 * <uint64_t>(slot & (self.num - 1)), 4)
        return id, n
