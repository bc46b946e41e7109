# Virtio 1.1 §2.6 split virtqueues, device side, with the guest-input checks of QEMU's
# libvhost-user (vu_queue_pop / virtqueue_read_next_desc / vu_queue_map_desc); §5.1.6
# virtio-net header and mergeable RX buffers. See _virtq.pxd for the layout.
#
# Threading contract: the data-path functions run without the GIL on a worker, one
# thread per Virtq at a time (the RX and TX rings of a pair may be on different threads;
# the memory table is read-only to them). The control path (vhost.backend) only changes
# a queue or the memory table after the device has stopped the queue's worker
# (VhostNetDevice.queue_stopped returns).
#
# Guest memory can vanish under a mapping: a frontend that shrinks the file behind a
# region (ftruncate of a tmpfs file; vhost.memory refuses memfds that are not sealed
# against it) makes our next load or store there raise SIGBUS. Every entry point that
# touches guest memory therefore runs under a per-thread guard (vh_guard_call below): a
# SIGBUS or SIGSEGV whose address lies in the guest memory the thread is working on
# jumps back to the entry point, which breaks that ring (VQ_ERR_MEM_FAULT) and returns as
# if the ring were empty. Any other fault goes to the handler installed before ours
# (Python's faulthandler, a sanitizer) or to the default action, as if we were not there.

from libc.errno cimport EFAULT, errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memmove, memset
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.unistd cimport close, sysconf, write

cdef extern from "unistd.h":
    enum: _SC_PAGESIZE

cdef extern from "<sys/vfs.h>":
    cdef struct statfs:
        long f_type
    int fstatfs(int fd, statfs *buf) nogil

cdef extern from *:
    """
    #include <pthread.h>
    #include <setjmp.h>
    #include <signal.h>
    #include <string.h>

    typedef int (*vh_in_guest_fn)(const void *mem, uintptr_t addr);
    typedef int (*vh_body_fn)(void *args);

    /* One guarded call on this thread's stack; they nest (a guarded call inside a
       guarded call sees the inner one first). */
    typedef struct vh_guard {
        sigjmp_buf env;
        const void *mem;
        struct vh_guard *prev;
    } vh_guard;

    /* initial-exec TLS: the handler must not call __tls_get_addr, which may allocate
       (and a fault can hit inside malloc). */
    static __thread vh_guard *vh_guard_top __attribute__((tls_model("initial-exec")));
    static __thread int vh_guard_sig __attribute__((tls_model("initial-exec")));
    static vh_in_guest_fn vh_guard_test;
    static struct sigaction vh_guard_prev[2];          /* [0] SIGBUS, [1] SIGSEGV */
    static volatile uint64_t vh_guard_recovered;       /* faults turned into broken rings */

    static void vh_guard_handler(int sig, siginfo_t *si, void *uc) {
        vh_guard *g = vh_guard_top;
        struct sigaction *prev = &vh_guard_prev[sig == SIGSEGV];
        struct sigaction dfl;
        /* si_code > 0: raised by the kernel for this very access, not by kill() */
        if (g != NULL && si != NULL && si->si_code > 0 && vh_guard_test != NULL &&
                vh_guard_test(g->mem, (uintptr_t)si->si_addr)) {
            vh_guard_top = g->prev;
            vh_guard_sig = sig;
            __atomic_fetch_add(&vh_guard_recovered, 1, __ATOMIC_RELAXED);
            siglongjmp(g->env, 1);
        }
        /* Not a guest access: whoever handled this signal before us does. */
        if (prev->sa_flags & SA_SIGINFO) {
            if (prev->sa_sigaction != NULL)
                prev->sa_sigaction(sig, si, uc);
        } else if (prev->sa_handler != SIG_DFL && prev->sa_handler != SIG_IGN) {
            prev->sa_handler(sig);
        }
        /* Still here (no previous handler, or it returned, as faulthandler does after
           its traceback): the default action ends the process. Returning re-runs the
           faulting access, which then gets it; a signal sent by kill() is raised again. */
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigemptyset(&dfl.sa_mask);
        sigaction(sig, &dfl, NULL);
        if (si == NULL || si->si_code <= 0)
            raise(sig);
    }

    /* Puts the handler in front of whatever handles SIGBUS/SIGSEGV now (idempotent).
       Called when guest memory is mapped, so a handler installed after us (e.g.
       faulthandler.enable() late) ends up behind us again. 0 or -1 (errno). */
    static int vh_guard_install(vh_in_guest_fn test) {
        static const int sigs[2] = {SIGBUS, SIGSEGV};
        struct sigaction sa, cur;
        int i;
        vh_guard_test = test;
        for (i = 0; i < 2; i++) {
            if (sigaction(sigs[i], NULL, &cur) != 0)
                return -1;
            if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == vh_guard_handler)
                continue;
            memset(&sa, 0, sizeof sa);
            sa.sa_sigaction = vh_guard_handler;
            /* ONSTACK: a thread with an alternate stack (faulthandler's main thread)
               keeps it for stack overflows, which then reach faulthandler. */
            sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
            sigemptyset(&sa.sa_mask);
            vh_guard_prev[i] = cur;
            if (sigaction(sigs[i], &sa, NULL) != 0)
                return -1;
        }
        return 0;
    }

    static int vh_guard_installed(void) {
        struct sigaction a, b;
        return sigaction(SIGBUS, NULL, &a) == 0 && sigaction(SIGSEGV, NULL, &b) == 0 &&
            (a.sa_flags & SA_SIGINFO) && a.sa_sigaction == vh_guard_handler &&
            (b.sa_flags & SA_SIGINFO) && b.sa_sigaction == vh_guard_handler;
    }

    /* body(args) with faults on the guest memory `mem` caught. Returns body's result,
       or 0 with *faulted set to the signal if body faulted there (whatever body did up
       to the fault stays done; it must take no lock and allocate nothing). */
    static int vh_guard_call(const void *mem, vh_body_fn body, void *args, int *faulted) {
        vh_guard g;
        sigset_t s;
        int r;
        g.mem = mem;
        g.prev = vh_guard_top;
        /* savemask 0: no sigprocmask syscall per call; the rare fault path unblocks the
           signal the handler left blocked instead. */
        if (sigsetjmp(g.env, 0)) {
            sigemptyset(&s);
            sigaddset(&s, vh_guard_sig);
            pthread_sigmask(SIG_UNBLOCK, &s, NULL);
            *faulted = vh_guard_sig;
            return 0;
        }
        vh_guard_top = &g;
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        r = body(args);
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        vh_guard_top = g.prev;
        return r;
    }

    typedef struct { void *dst; const void *src; size_t n; } vh_copy_args;

    static int vh_copy_body(void *a) {
        vh_copy_args *c = (vh_copy_args *)a;
        memcpy(c->dst, c->src, c->n);
        return 0;
    }

    /* memcpy where src or dst is guest memory of `mem`: 0, or the signal it faulted. */
    static int vh_guarded_copy(const void *mem, void *dst, const void *src, size_t n) {
        vh_copy_args c;
        int f = 0;
        c.dst = dst;
        c.src = src;
        c.n = n;
        vh_guard_call(mem, vh_copy_body, &c, &f);
        return f;
    }
    """
    ctypedef int (*vh_in_guest_fn)(const void *, uintptr_t) noexcept nogil
    ctypedef int (*vh_body_fn)(void *) noexcept nogil
    int vh_guard_install(vh_in_guest_fn test) noexcept nogil
    int vh_guard_installed() noexcept nogil
    int vh_guard_call(const void *mem, vh_body_fn body, void *args, int *faulted) noexcept nogil
    int vh_guarded_copy(const void *mem, void *dst, const void *src, size_t n) noexcept nogil
    uint64_t vh_guard_recovered


cdef int _in_guest(const void *m, uintptr_t addr) noexcept nogil:
    # The guard's test, run in the signal handler: plain loads only. The whole mapping
    # counts (from the page holding mmap_offset), not only the region's bytes.
    cdef const vh_mem *mem = <const vh_mem *>m
    cdef uint32_t i
    cdef uintptr_t base
    if mem == NULL:
        return 0
    for i in range(mem.n if mem.n <= VH_MAX_REGIONS else VH_MAX_REGIONS):
        base = <uintptr_t>mem.r[i].map_base
        if base != 0 and addr >= base and addr - base < mem.r[i].map_len:
            return 1
    return 0


def install_guard():
    """Puts the guest-memory fault guard in front of the process's SIGBUS/SIGSEGV
    handlers (idempotent; done on import and whenever guest memory is mapped)."""
    if vh_guard_install(_in_guest) != 0:
        raise OSError(errno, "sigaction for the guest memory guard failed")


def guard_installed():
    """Is the guard the process's SIGBUS and SIGSEGV handler right now?"""
    return bool(vh_guard_installed())


def guard_recovered():
    """Faults on guest memory the guard turned into broken rings (whole process)."""
    return vh_guard_recovered


install_guard()


def fs_magic(int fd):
    """The f_type of the file system that holds fd (statfs(2)): which kind of memory
    backs a region (vhost.memory)."""
    cdef statfs st
    if fstatfs(fd, &st) != 0:
        raise OSError(errno, "fstatfs failed")
    return <unsigned long>st.f_type


VQ_ERRORS = (
    "ok", "avail_idx_jump", "bad_head", "bad_next", "chain_loop", "indirect_len",
    "indirect_addr", "indirect_nested", "indirect_not_negotiated", "bad_addr", "ring_addr",
    "guest_memory_fault", "zero_len", "desc_order", "tx_too_short", "tx_too_long",
    "rx_too_big", "rx_runt",
)
FATAL_ERRORS = VQ_ERRORS[1:VQ_ERR_FIRST_DROP]
MAX_QUEUE_SIZE = VH_MAX_QUEUE_SIZE
VNET_HDR_LEN = VH_VNET_HDR_LEN

cdef struct vh_desc:
    uint64_t addr
    uint32_t len
    uint16_t flags
    uint16_t next

# Cursor over one descriptor chain, direct or through one indirect table.
cdef struct vh_walk:
    const uint8_t *table
    uint32_t table_n
    uint32_t idx
    uint32_t count
    uint8_t in_indirect
    uint8_t seen_write
    vh_desc d                    # local copy of the current descriptor: read once

# Bytes of one RX frame as the guest sees them: the caller's 12-byte header cut to the
# guest's header length, then the frame body.
cdef struct vh_rxsrc:
    const uint8_t *frame
    uint32_t hdr_len
    uint32_t glen
    uint32_t pos
    uint8_t *p10                 # where num_buffers (header bytes 10, 11) landed
    uint8_t *p11


cdef inline void break_ring(vh_vq *vq, int reason) noexcept nogil:
    # Stops the queue for good (until the frontend restarts it). The frontend is told by
    # the control thread (Virtq.signal_err), never by a worker: its err fd is the
    # guest's, and a worker must not wait on anything the guest controls.
    if vq.broken == 0:
        vq.broken = <uint8_t>reason
        vq.err[reason] += 1


cdef int walk_load(vh_vq *vq, const vh_mem *mem, vh_walk *w) noexcept nogil:
    # Loads w.d from w.table[w.idx], descending into an indirect table. Returns VQ_OK or a
    # vh_vq_err. The caller checked w.idx < w.table_n.
    cdef const uint8_t *t
    w.count += 1
    if w.count > w.table_n:
        return VQ_ERR_LOOP
    memcpy(&w.d, w.table + 16 * <uint64_t>w.idx, 16)
    if w.d.flags & VRING_DESC_F_INDIRECT:
        if w.in_indirect or (w.d.flags & VRING_DESC_F_NEXT):
            return VQ_ERR_INDIRECT_NESTED
        if not vq.indirect:
            return VQ_ERR_INDIRECT_OFF
        # virtio 1.1 §2.6.5.3.1: no chain longer than the queue size, indirect or not
        if w.d.len == 0 or (w.d.len & 15) or (w.d.len >> 4) > vq.num:
            return VQ_ERR_INDIRECT_LEN
        t = vh_gpa_range(mem, w.d.addr, w.d.len)
        if t == NULL:
            return VQ_ERR_INDIRECT_ADDR
        w.table = t
        w.table_n = w.d.len >> 4
        w.idx = 0
        w.count = 1
        w.in_indirect = 1
        memcpy(&w.d, t, 16)
        if w.d.flags & VRING_DESC_F_INDIRECT:
            return VQ_ERR_INDIRECT_NESTED
    if w.d.len == 0:
        return VQ_ERR_ZERO_LEN
    if w.d.flags & VRING_DESC_F_WRITE:
        w.seen_write = 1
    elif w.seen_write:
        return VQ_ERR_ORDER
    return VQ_OK


cdef inline int walk_first(vh_vq *vq, const vh_mem *mem, vh_walk *w, uint16_t head) noexcept nogil:
    w.table = vq.desc
    w.table_n = vq.num
    w.idx = head
    w.count = 0
    w.in_indirect = 0
    w.seen_write = 0
    return walk_load(vq, mem, w)


cdef inline int walk_next(vh_vq *vq, const vh_mem *mem, vh_walk *w) noexcept nogil:
    # 1: the next descriptor is in w.d; 0: end of chain; < 0: -vh_vq_err.
    cdef int r
    if not (w.d.flags & VRING_DESC_F_NEXT):
        return 0
    if w.d.next >= w.table_n:
        return -VQ_ERR_NEXT
    w.idx = w.d.next
    r = walk_load(vq, mem, w)
    if r:
        return -r
    return 1


cdef int copy_from_guest(const vh_mem *mem, uint64_t addr, uint32_t n, uint8_t *dst) noexcept nogil:
    # Copies guest [addr, addr+n) to dst; the range may span regions. VQ_OK or VQ_ERR_ADDR.
    cdef uint64_t got
    cdef const uint8_t *p
    while n:
        got = n
        p = vh_gpa_clamp(mem, addr, &got)
        if p == NULL:
            return VQ_ERR_ADDR
        memcpy(dst, p, got)
        dst += got
        addr += got   # cannot wrap: got <= bytes left in a region that does not wrap
        n -= <uint32_t>got
    return VQ_OK


cdef int tx_chain(vh_vq *vq, const vh_mem *mem, uint16_t head, uint8_t *buf, uint32_t cap,
                  uint32_t *out_len) noexcept nogil:
    # Copies the chain at head (virtio-net header + frame) to buf[0:cap], always with a
    # 12-byte header (a 10-byte guest header gets num_buffers = 0). VQ_OK or a reason.
    cdef vh_walk w
    cdef uint32_t off0 = VH_VNET_HDR_LEN - vq.hdr_len
    cdef uint64_t pos = off0
    cdef int r = walk_first(vq, mem, &w, head)
    if r:
        return r
    if cap < VH_VNET_HDR_LEN:
        return VQ_ERR_TOO_LONG
    while True:
        if w.d.flags & VRING_DESC_F_WRITE:
            return VQ_ERR_ORDER
        if pos + w.d.len > cap:
            return VQ_ERR_TOO_LONG
        r = copy_from_guest(mem, w.d.addr, w.d.len, buf + pos)
        if r:
            return r
        pos += w.d.len
        r = walk_next(vq, mem, &w)
        if r < 0:
            return -r
        if r == 0:
            break
    if pos < VH_VNET_HDR_LEN:
        return VQ_ERR_TOO_SHORT
    if off0:
        memmove(buf, buf + off0, vq.hdr_len)
        buf[10] = 0
        buf[11] = 0
    out_len[0] = <uint32_t>pos
    return VQ_OK


cdef inline void put_used(vh_vq *vq, uint32_t head, uint32_t length) noexcept nogil:
    cdef uint8_t *e = vq.used + 4 + 8 * <uint64_t>(vq.used_idx & (vq.num - 1))
    memcpy(e, &head, 4)
    memcpy(e + 4, &length, 4)
    vq.used_idx += 1


cdef inline void publish_used(vh_vq *vq) noexcept nogil:
    # Used elements are written before the index that hands them over (release); with
    # EVENT_IDX, avail_event asks for a kick once the driver passes what we consumed.
    vh_store16_release(<uint16_t *>(vq.used + 2), vq.used_idx)
    if vq.event_idx:
        vh_store16(<uint16_t *>(vq.used + 4 + 8 * <uint64_t>vq.num), vq.last_avail_idx)


cdef void _notify(vh_vq *vq) noexcept nogil:
    # Interrupts the guest for what publish_used handed over, unless it asked not to be
    # (virtio 1.1 §2.6.7.2 used_event / VRING_AVAIL_F_NO_INTERRUPT). Owner: the worker.
    cdef uint16_t new = vq.used_idx
    cdef uint16_t old
    cdef uint16_t ev
    cdef bint need
    cdef uint64_t one = 1
    vh_mb()   # our used idx store must be visible before we read the guest's wish
    if vq.event_idx:
        old = vq.signalled_used
        ev = vh_load16(&vq.avail[2 + vq.num])
        need = (not vq.signalled_valid) or <uint16_t>(new - ev - 1) < <uint16_t>(new - old)
        vq.signalled_used = new
        vq.signalled_valid = 1
    else:
        need = not (vh_load16(&vq.avail[0]) & VRING_AVAIL_F_NO_INTERRUPT)
    if need:
        vq.notifies += 1
        # The call fd is the guest's eventfd, made O_NONBLOCK when it was handed over: a
        # counter the guest left full (or any error) is a counted notification lost,
        # never a wait on this thread.
        if vq.call_fd >= 0 and write(vq.call_fd, &one, 8) != 8:
            vq.notify_failed += 1


cdef int _avail_count(vh_vq *vq) noexcept nogil:
    # Chains the guest made available that we have not taken; 0 if not running.
    # A jump of more than the ring size breaks the ring (VQ_ERR_AVAIL_IDX).
    cdef uint16_t n
    if not vq.ready or vq.broken:
        return 0
    n = <uint16_t>(vh_load16_acquire(&vq.avail[1]) - vq.last_avail_idx)
    if n > vq.num:
        break_ring(vq, VQ_ERR_AVAIL_IDX)
        return 0
    return n


cdef void _enable_kicks(vh_vq *vq, bint enable) noexcept nogil:
    # Asks the guest to kick (enable, before a worker sleeps) or not to (while polling).
    # A worker re-checks the avail count after enabling: a chain may have raced the flag.
    cdef uint16_t *flags
    if not vq.ready or vq.broken:
        return
    if vq.event_idx:
        if enable:
            vh_store16(<uint16_t *>(vq.used + 4 + 8 * <uint64_t>vq.num), vq.last_avail_idx)
    else:
        flags = <uint16_t *>vq.used
        vh_store16(flags, 0 if enable else VRING_USED_F_NO_NOTIFY)
    vh_mb()


cdef int _pop_chains(vh_vq *vq, const vh_mem *mem, uint8_t **bufs, const uint32_t *caps,
                     uint32_t *lens, int max_chains) noexcept nogil:
    # TX: copies up to max_chains available chains (12-byte virtio-net header + frame)
    # into bufs[i][0:caps[i]], sets lens[i], and returns how many it filled. The caller
    # owns the buffers. Chains dropped for a per-chain reason are returned to the guest
    # and counted in vq.err without taking a buffer. All used entries of the batch are
    # published at once, and the guest notified once. On a ring-structure error the ring
    # breaks (vq.broken); what was copied before still counts.
    cdef int n = 0
    cdef int r
    cdef uint16_t avail_n, head
    cdef uint16_t start = vq.used_idx
    avail_n = <uint16_t>_avail_count(vq)
    while avail_n and n < max_chains:
        # the index entry is guest memory: read once, then check
        head = vh_load16(&vq.avail[2 + (vq.last_avail_idx & (vq.num - 1))])
        if head >= vq.num:
            break_ring(vq, VQ_ERR_HEAD)
            break
        r = tx_chain(vq, mem, head, bufs[n], caps[n], &lens[n])
        if r and r < VQ_ERR_FIRST_DROP:
            break_ring(vq, r)
            break
        vq.last_avail_idx += 1
        avail_n -= 1
        put_used(vq, head, 0)
        if r:
            vq.err[r] += 1
        else:
            vq.frames += 1
            vq.bytes += lens[n]
            n += 1
    if vq.used_idx != start:
        publish_used(vq)
        vq.batches += 1
        _notify(vq)
    return n


cdef void rx_copy(vh_rxsrc *s, uint8_t *h, uint32_t k) noexcept nogil:
    # Writes the next k guest-visible bytes of the frame to h (our mapping of guest RAM).
    cdef uint32_t p = s.pos
    cdef uint32_t m
    cdef const uint8_t *src
    while k:
        if p < s.hdr_len:
            m = s.hdr_len - p
            if m > k:
                m = k
            src = s.frame + p
        else:
            m = k
            src = s.frame + VH_VNET_HDR_LEN + (p - s.hdr_len)
        if p <= 10 and 10 < p + m:
            s.p10 = h + (10 - p)
        if p <= 11 and 11 < p + m:
            s.p11 = h + (11 - p)
        memcpy(h, src, m)
        h += m
        p += m
        k -= m
    s.pos = p


cdef int rx_chain(vh_vq *vq, const vh_mem *mem, uint16_t head, vh_rxsrc *s,
                  uint32_t *wrote) noexcept nogil:
    # Fills the writable chain at head with the frame from s.pos on; *wrote = bytes
    # written. Stops walking once the frame is complete. VQ_OK or a reason.
    cdef vh_walk w
    cdef uint64_t got, want, addr
    cdef uint8_t *h
    cdef int r = walk_first(vq, mem, &w, head)
    wrote[0] = 0
    if r:
        return r
    while True:
        if not (w.d.flags & VRING_DESC_F_WRITE):
            return VQ_ERR_ORDER
        want = s.glen - s.pos
        if want > w.d.len:
            want = w.d.len
        addr = w.d.addr
        while want:
            got = want
            h = vh_gpa_clamp(mem, addr, &got)
            if h == NULL:
                return VQ_ERR_ADDR
            rx_copy(s, h, <uint32_t>got)
            wrote[0] += <uint32_t>got
            addr += got
            want -= got
        if s.pos >= s.glen:
            return VQ_OK
        r = walk_next(vq, mem, &w)
        if r < 0:
            return -r
        if r == 0:
            return VQ_OK


cdef int _push_frames(vh_vq *vq, const vh_mem *mem, const uint8_t **frames,
                      const uint32_t *lens, int n, bint mergeable) noexcept nogil:
    # RX: writes frames[i][0:lens[i]] (12-byte virtio-net header + frame; the caller owns
    # them) into the guest's buffers. With mergeable, a frame spreads over as many chains
    # as it needs and num_buffers says how many; without, it must fit one chain or it is
    # dropped (VQ_ERR_RX_TOO_BIG). Returns how many frames were dealt with (delivered or
    # counted as dropped); frames[ret:] found the ring full (or broken). Used entries are
    # published once per call, the guest notified once.
    cdef int i = 0
    cdef int r
    cdef uint16_t avail_idx, head, save_avail, save_used, nbufs
    cdef uint16_t start = vq.used_idx
    cdef uint32_t wrote, pos_before
    cdef vh_rxsrc s
    cdef bint full = False
    cdef int navail = _avail_count(vq)
    if navail == 0:
        return 0
    avail_idx = vq.last_avail_idx + <uint16_t>navail
    if vq.hdr_len != VH_VNET_HDR_LEN:
        mergeable = False   # num_buffers only exists in the 12-byte header
    while i < n:
        if lens[i] < VH_VNET_HDR_LEN:
            vq.err[VQ_ERR_RX_RUNT] += 1
            i += 1
            continue
        s.frame = frames[i]
        s.hdr_len = vq.hdr_len
        s.glen = lens[i] - VH_VNET_HDR_LEN + vq.hdr_len
        s.pos = 0
        s.p10 = NULL
        s.p11 = NULL
        save_avail = vq.last_avail_idx
        save_used = vq.used_idx
        nbufs = 0
        while s.pos < s.glen:
            if vq.last_avail_idx == avail_idx:
                full = True
                break
            head = vh_load16(&vq.avail[2 + (vq.last_avail_idx & (vq.num - 1))])
            if head >= vq.num:
                break_ring(vq, VQ_ERR_HEAD)
                break
            pos_before = s.pos
            r = rx_chain(vq, mem, head, &s, &wrote)
            if r and r < VQ_ERR_FIRST_DROP:
                break_ring(vq, r)
                break
            vq.last_avail_idx += 1
            if r:
                # a bad chain goes back empty; the frame continues in the next one
                vq.err[r] += 1
                put_used(vq, head, 0)
                s.pos = pos_before
                if pos_before <= 10:
                    s.p10 = NULL
                if pos_before <= 11:
                    s.p11 = NULL
                continue
            put_used(vq, head, wrote)
            nbufs += 1
            if not mergeable and s.pos < s.glen:
                vq.err[VQ_ERR_RX_TOO_BIG] += 1
                break
        if full or vq.broken:
            vq.last_avail_idx = save_avail
            vq.used_idx = save_used
            break
        if s.pos < s.glen:
            # dropped as too big: the chain stays the guest's for the next frame
            vq.last_avail_idx = save_avail
            vq.used_idx = save_used
            i += 1
            continue
        if s.p10 != NULL and s.p11 != NULL and vq.hdr_len == VH_VNET_HDR_LEN:
            s.p10[0] = <uint8_t>(nbufs & 0xff)
            s.p11[0] = <uint8_t>(nbufs >> 8)
        vq.frames += 1
        vq.bytes += lens[i]
        i += 1
    if vq.used_idx != start:
        publish_used(vq)
        vq.batches += 1
        _notify(vq)
    return i


# ---- the guarded entry points ------------------------------------------------------------
# Each packs its arguments, runs the body under vh_guard_call on the guest memory it
# works on, and turns a fault there into a broken ring. The body may be cut short at
# any load or store of guest memory: what it changed in vq until then stays (the ring is
# broken, nobody reads it again until the frontend restarts it), nothing else is held.

cdef struct vh_args:
    vh_vq *vq
    const vh_mem *mem
    uint8_t **bufs
    const uint8_t **frames
    const uint32_t *caps
    uint32_t *lens
    int n
    int flag


cdef int _pop_body(void *a) noexcept nogil:
    cdef vh_args *c = <vh_args *>a
    return _pop_chains(c.vq, c.mem, c.bufs, c.caps, c.lens, c.n)


cdef int _push_body(void *a) noexcept nogil:
    cdef vh_args *c = <vh_args *>a
    return _push_frames(c.vq, c.mem, c.frames, c.lens, c.n, c.flag)


cdef int _avail_body(void *a) noexcept nogil:
    return _avail_count((<vh_args *>a).vq)


cdef int _kicks_body(void *a) noexcept nogil:
    _enable_kicks((<vh_args *>a).vq, (<vh_args *>a).flag)
    return 0


cdef int _notify_body(void *a) noexcept nogil:
    _notify((<vh_args *>a).vq)
    return 0


cdef inline int _guarded(vh_vq *vq, const vh_mem *mem, vh_body_fn body,
                         vh_args *a) noexcept nogil:
    cdef int fault = 0
    cdef int r
    a.vq = vq
    a.mem = mem
    r = vh_guard_call(mem, body, a, &fault)
    if fault:
        break_ring(vq, VQ_ERR_MEM_FAULT)
        vq.ready = 0
        return 0
    return r


cdef int vq_pop_chains(vh_vq *vq, const vh_mem *mem, uint8_t **bufs, const uint32_t *caps,
                       uint32_t *lens, int max_chains) noexcept nogil:
    # _pop_chains under the guard (see there); 0 when the guest memory faulted.
    cdef vh_args a
    if not vq.ready or vq.broken:
        return 0
    a.bufs = bufs
    a.caps = caps
    a.lens = lens
    a.n = max_chains
    return _guarded(vq, mem, _pop_body, &a)


cdef int vq_push_frames(vh_vq *vq, const vh_mem *mem, const uint8_t **frames,
                        const uint32_t *lens, int n, bint mergeable) noexcept nogil:
    # _push_frames under the guard (see there); 0 when the guest memory faulted.
    cdef vh_args a
    if not vq.ready or vq.broken:
        return 0
    a.frames = frames
    a.lens = <uint32_t *>lens
    a.n = n
    a.flag = mergeable
    return _guarded(vq, mem, _push_body, &a)


cdef int vq_avail_count(vh_vq *vq) noexcept nogil:
    cdef vh_args a
    if not vq.ready or vq.broken:
        return 0
    return _guarded(vq, vq.mem, _avail_body, &a)


cdef void vq_enable_kicks(vh_vq *vq, bint enable) noexcept nogil:
    cdef vh_args a
    if not vq.ready or vq.broken:
        return
    a.flag = enable
    _guarded(vq, vq.mem, _kicks_body, &a)


cdef void vq_notify(vh_vq *vq) noexcept nogil:
    cdef vh_args a
    if not vq.ready or vq.broken:
        return
    _guarded(vq, vq.mem, _notify_body, &a)


cdef class MemTable:
    """Guest memory regions mapped from the frontend's fds (MAP_SHARED).

    Low level: vhost.memory.GuestMemory validates regions before they get here. Each
    region is one mapping of its fd from the page holding mmap_offset; the fd itself is
    not kept (the caller closes it).
    """

    def __dealloc__(self):
        self._clear()

    cdef void _clear(self) noexcept:
        cdef uint32_t i
        for i in range(self.m.n):
            munmap(self.m.r[i].map_base, self.m.r[i].map_len)
        memset(&self.m, 0, sizeof(vh_mem))

    def clear(self):
        """Unmaps every region."""
        self._clear()

    def __len__(self):
        return self.m.n

    def add(self, int fd, uint64_t gpa, uint64_t size, uint64_t uva, uint64_t mmap_offset):
        """Maps size bytes of fd at mmap_offset as guest [gpa, gpa+size)."""
        cdef uint64_t page = <uint64_t>sysconf(_SC_PAGESIZE)
        cdef uint64_t start = mmap_offset & ~(page - 1)
        cdef uint64_t lead = mmap_offset - start
        cdef void *base
        cdef vh_region *r
        if self.m.n >= VH_MAX_REGIONS:
            raise OverflowError("too many memory regions")
        if size == 0 or size > (<uint64_t>1 << 48) or mmap_offset > (<uint64_t>1 << 52):
            raise ValueError("bad region size or offset")
        install_guard()     # in front again, should a handler have come after us
        base = mmap(NULL, size + lead, PROT_READ | PROT_WRITE, MAP_SHARED, fd, <long>start)
        if base == MAP_FAILED:
            raise OSError(errno, "mmap of a memory region failed")
        r = &self.m.r[self.m.n]
        r.gpa = gpa
        r.size = size
        r.uva = uva
        r.mmap_offset = mmap_offset
        r.map_base = base
        r.map_len = size + lead
        r.host = <uint8_t *>base + lead
        self.m.n += 1

    def remove(self, uint64_t gpa, uint64_t size):
        """Unmaps the region [gpa, gpa+size); False if there is none."""
        cdef uint32_t i
        for i in range(self.m.n):
            if self.m.r[i].gpa == gpa and self.m.r[i].size == size:
                munmap(self.m.r[i].map_base, self.m.r[i].map_len)
                self.m.n -= 1
                if i != self.m.n:
                    self.m.r[i] = self.m.r[self.m.n]
                memset(&self.m.r[self.m.n], 0, sizeof(vh_region))
                return True
        return False

    def regions(self):
        """[(gpa, size, uva, mmap_offset)], in table order."""
        cdef uint32_t i
        return [(self.m.r[i].gpa, self.m.r[i].size, self.m.r[i].uva, self.m.r[i].mmap_offset)
                for i in range(self.m.n)]

    def gpa_ok(self, uint64_t gpa, uint64_t length):
        """Is guest [gpa, gpa+length) inside one region?"""
        return vh_gpa_range(&self.m, gpa, length) != NULL

    def uva_ok(self, uint64_t uva, uint64_t length):
        return vh_uva_range(&self.m, uva, length) != NULL

    def read(self, uint64_t gpa, uint64_t length):
        """Guest bytes [gpa, gpa+length) from one region (for tests and debugging).
        OSError(EFAULT) if the memory behind them is gone."""
        cdef uint8_t *p = vh_gpa_range(&self.m, gpa, length)
        cdef bytearray out
        if p == NULL:
            raise ValueError("range not inside one memory region")
        out = bytearray(length)
        if vh_guarded_copy(&self.m, <char *>out, p, length):
            raise OSError(EFAULT, "guest memory behind the range is gone")
        return bytes(out)

    def write(self, uint64_t gpa, const uint8_t[:] data):
        cdef uint8_t *p = vh_gpa_range(&self.m, gpa, len(data))
        if p == NULL:
            raise ValueError("range not inside one memory region")
        if len(data) and vh_guarded_copy(&self.m, p, &data[0], len(data)):
            raise OSError(EFAULT, "guest memory behind the range is gone")


cdef inline void close_fd(int *fd) noexcept:
    if fd[0] >= 0:
        close(fd[0])
        fd[0] = -1


cdef class Virtq:
    """One split virtqueue of a device: its configuration from vhost-user messages, its
    translated ring pointers, its counters. The data path uses .q through cimport."""

    def __cinit__(self, int index, MemTable mem not None):
        self.index = index
        self.mem = mem
        self.kick_fd = -1
        self.q.call_fd = -1   # the struct starts zeroed: fd 0 is not ours to close
        self.q.err_fd = -1
        self._reset()

    def __dealloc__(self):
        self._reset()

    cdef void _reset(self) noexcept:
        close_fd(&self.q.call_fd)
        close_fd(&self.q.err_fd)
        close_fd(&self.kick_fd)
        memset(&self.q, 0, sizeof(vh_vq))
        self.q.call_fd = -1
        self.q.err_fd = -1
        self.q.hdr_len = VH_VNET_HDR_LEN
        self.q.mem = &self.mem.m

    def reset(self):
        """Back to the unconfigured state; closes the queue's fds."""
        self._reset()

    # --- configuration (control thread, queue stopped) ---
    def set_num(self, uint32_t num):
        self.q.num = num

    def set_addr(self, uint64_t desc, uint64_t used, uint64_t avail):
        self.q.desc_uva = desc
        self.q.used_uva = used
        self.q.avail_uva = avail

    def set_base(self, uint16_t idx):
        self.q.last_avail_idx = idx
        self.q.used_idx = idx

    def set_call_fd(self, int fd):
        """Takes ownership of fd (-1: none)."""
        close_fd(&self.q.call_fd)
        self.q.call_fd = fd

    def set_err_fd(self, int fd):
        close_fd(&self.q.err_fd)
        self.q.err_fd = fd

    def set_kick_fd(self, int fd):
        close_fd(&self.kick_fd)
        self.kick_fd = fd

    def signal_err(self):
        """Tells the frontend the ring broke (its err eventfd, O_NONBLOCK). Control
        thread only. False if there is no err fd or it refused the write."""
        cdef uint64_t one = 1
        if self.q.err_fd < 0:
            return False
        return write(self.q.err_fd, &one, 8) == 8

    cdef bint _translate(self) noexcept:
        cdef uint64_t num = self.q.num
        self.q.desc = vh_uva_range(&self.mem.m, self.q.desc_uva, 16 * num)
        self.q.avail = <uint16_t *>vh_uva_range(&self.mem.m, self.q.avail_uva, 6 + 2 * num)
        self.q.used = vh_uva_range(&self.mem.m, self.q.used_uva, 6 + 8 * num)
        # our mapping must keep the ring alignment too (atomic 16-bit index accesses)
        return (self.q.desc != NULL and self.q.avail != NULL and self.q.used != NULL
                and (<uintptr_t>self.q.desc) & 15 == 0 and (<uintptr_t>self.q.avail) & 1 == 0
                and (<uintptr_t>self.q.used) & 3 == 0)

    def start(self, bint event_idx, bint indirect, int hdr_len):
        """Translates the ring and starts it. False (ring broken, ring_addr) when a ring
        is not inside one region."""
        self.q.event_idx = event_idx
        self.q.indirect = indirect
        self.q.hdr_len = <uint8_t>hdr_len
        self.q.broken = 0
        self.q.signalled_valid = 0
        if self.q.num == 0 or not self._translate():
            self.q.ready = 0
            break_ring(&self.q, VQ_ERR_RING_ADDR)
            return False
        # the guest's used idx is where we continue (vhost-user: "the back-end must
        # start at the vring base", and the used idx trails it after a clean stop)
        self.q.used_idx = self.q.last_avail_idx
        self.q.ready = 1
        return True

    def retranslate(self):
        """After a memory table change: re-derive ring pointers; breaks the ring if they
        no longer translate. Returns whether the ring is usable."""
        if not self.q.ready:
            return True
        if not self._translate():
            self.q.ready = 0
            break_ring(&self.q, VQ_ERR_RING_ADDR)
            return False
        return True

    def stop(self):
        """Stops the ring; returns the vring base (next avail index to process)."""
        self.q.ready = 0
        self.q.desc = NULL
        self.q.avail = NULL
        self.q.used = NULL
        return self.q.last_avail_idx

    # --- observation ---
    @property
    def num(self):
        return self.q.num

    @property
    def ready(self):
        return bool(self.q.ready) and not self.q.broken

    @property
    def last_avail_idx(self):
        return self.q.last_avail_idx

    @property
    def used_idx(self):
        return self.q.used_idx

    @property
    def call_fd(self):
        return self.q.call_fd

    @property
    def broken(self):
        """Name of the reason that broke the ring, or None."""
        return VQ_ERRORS[self.q.broken] if self.q.broken else None

    def counters(self):
        """Per-reason error counts plus frames, bytes, notifies (notify_failed: those the
        call eventfd refused), batches."""
        cdef int i
        d = {VQ_ERRORS[i]: self.q.err[i] for i in range(1, VQ_ERR_MAX)}
        d.update(frames=self.q.frames, bytes=self.q.bytes, notifies=self.q.notifies,
                 notify_failed=self.q.notify_failed, batches=self.q.batches)
        return d

    def avail_count(self):
        return vq_avail_count(&self.q)

    def enable_kicks(self, bint enable):
        vq_enable_kicks(&self.q, enable)

    # --- Python-level batches (tests, tools; the data plane cimports the cdef calls) ---
    def pop(self, int max_chains=64, uint32_t cap=65536 + 64):
        """TX: up to max_chains frames (with 12-byte header) as bytes."""
        fb = FrameBuffers(max_chains, cap)
        cdef int n = fb.pop_from(self, max_chains)
        return [fb.get(i) for i in range(n)]

    def push(self, frames, bint mergeable=True):
        """RX: delivers frames (each with a 12-byte header); returns how many were
        dealt with (delivered or counted as dropped)."""
        cdef int n = len(frames)
        cdef int i, r
        keep = [bytes(f) for f in frames]
        cdef const uint8_t **ptrs = <const uint8_t **>malloc(max(n, 1) * sizeof(uint8_t *))
        cdef uint32_t *lens = <uint32_t *>malloc(max(n, 1) * sizeof(uint32_t))
        if ptrs == NULL or lens == NULL:
            free(ptrs)
            free(lens)
            raise MemoryError()
        try:
            for i in range(n):
                ptrs[i] = <const uint8_t *><char *>keep[i]
                lens[i] = len(keep[i])
            r = vq_push_frames(&self.q, &self.mem.m, ptrs, lens, n, mergeable)
        finally:
            free(ptrs)
            free(lens)
        return r


cdef class FrameBuffers:
    """A fixed pool of n buffers of cap bytes for batch moves (allocated once)."""
    cdef uint8_t *arena
    cdef uint8_t **bufs
    cdef uint32_t *caps
    cdef uint32_t *lens
    cdef readonly int size
    cdef readonly int count

    def __cinit__(self, int n, uint32_t cap):
        cdef int i
        if n <= 0 or cap < VH_VNET_HDR_LEN:
            raise ValueError("bad buffer pool size")
        self.size = n
        self.arena = <uint8_t *>malloc(<size_t>n * cap)
        self.bufs = <uint8_t **>malloc(n * sizeof(uint8_t *))
        self.caps = <uint32_t *>malloc(n * sizeof(uint32_t))
        self.lens = <uint32_t *>malloc(n * sizeof(uint32_t))
        if not (self.arena and self.bufs and self.caps and self.lens):
            raise MemoryError()
        for i in range(n):
            self.bufs[i] = self.arena + <size_t>i * cap
            self.caps[i] = cap
            self.lens[i] = 0

    def __dealloc__(self):
        free(self.arena)
        free(self.bufs)
        free(self.caps)
        free(self.lens)

    def get(self, int i):
        if not 0 <= i < self.count:
            raise IndexError(i)
        return (<char *>self.bufs[i])[:self.lens[i]]

    def pop_from(self, Virtq vq not None, int max_chains=0):
        """Fills the pool from a TX queue; returns the frame count."""
        if max_chains <= 0 or max_chains > self.size:
            max_chains = self.size
        with nogil:
            self.count = vq_pop_chains(&vq.q, &vq.mem.m, self.bufs, self.caps, self.lens,
                                       max_chains)
        return self.count

    def push_to(self, Virtq vq not None, bint mergeable=True):
        """Delivers the pool's frames to an RX queue; returns how many were dealt with."""
        cdef int r
        with nogil:
            r = vq_push_frames(&vq.q, &vq.mem.m, <const uint8_t **>self.bufs, self.lens,
                               self.count, mergeable)
        return r


def echo_burst(Virtq tx not None, Virtq rx not None, FrameBuffers fb not None,
               bint mergeable=True):
    """Moves one batch TX -> RX without the GIL (a loopback device, and the reference
    ceiling for benchmarks). Returns (taken from tx, delivered or dropped into rx);
    frames beyond the second figure found RX full and are lost."""
    cdef int n, m = 0
    with nogil:
        n = vq_pop_chains(&tx.q, &tx.mem.m, fb.bufs, fb.caps, fb.lens, fb.size)
        if n:
            m = vq_push_frames(&rx.q, &rx.mem.m, <const uint8_t **>fb.bufs, fb.lens, n,
                               mergeable)
    fb.count = n
    return n, m
