# cython: language_level=3
"""Batched I/O at softnic's edges: TAP VF ports and the underlay sockets.

Implements: the Linux TAP interface with virtio-net headers (virtio 1.x 5.1.6,
drivers/net/tun.c: IFF_VNET_HDR, TUNSETVNETHDRSZ 12); UDP GSO/GRO (UDP_SEGMENT and
UDP_GRO, Linux 4.18/5.0) under sendmmsg/recvmmsg; ESP over raw IP (RFC 4303, protocol
50) and ESP-in-UDP (RFC 3948 section 2: port 4500, non-ESP marker, NAT-keepalive).

Conventions. A TAP packet is the 12-byte virtio-net header followed by the Ethernet frame.
An underlay packet is a complete outer IPv4/IPv6 packet without L2: on TX the kernel
rebuilds IP (and UDP) from the destination address, ports and protocol read here, so only
the payload is handed over; on RX the outer IP (+UDP) header is rebuilt in the slot from
recvmsg's peer address, IP_PKTINFO/IPV6_PKTINFO and the bound port, so decapsulation always
sees whole packets. IPv4 raw sockets deliver the IP header themselves, IPv6 ones do not.

Every function here is a burst: slots in, a count out; each failure is a counter (and, on
TX, a drop reason in the slot). No allocation and no Python object per packet.

C entry points for the data plane (declared in softnic/_io.pxd): sn_tap_read,
sn_tap_write, sn_ul_send (one TxQueue per sending thread), Underlay.recv_pkts (one
receiving thread).
"""

from libc.errno cimport EAGAIN, EINTR, EINVAL, EMSGSIZE, ENOBUFS, errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp, memcpy, memset
from posix.unistd cimport read, write


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum: POLLOUT

from softnic._batch cimport Batch
from softnic._pkt cimport (
    SN_DROP_BAD_VNET_HDR,
    SN_DROP_MALFORMED_L3,
    SN_DROP_NO_FDB,
    SN_DROP_NO_ROUTE,
    SN_DROP_RING_FULL,
    SN_DROP_TOO_BIG,
    sn_pkt,
)


cdef extern from *:
    """
    #include <sys/socket.h>
    #include <netinet/in.h>
    #include <netinet/udp.h>
    #ifndef SOL_UDP
    #define SOL_UDP 17
    #endif
    #ifndef UDP_SEGMENT
    #define UDP_SEGMENT 103
    #endif
    #ifndef UDP_GRO
    #define UDP_GRO 104
    #endif
    #define SN_SA_LEN sizeof(struct sockaddr_in6)
    """
    enum:
        SOL_UDP
        UDP_SEGMENT
        UDP_GRO
        SN_SA_LEN
        AF_INET
        AF_INET6
        IPPROTO_IP
        IPPROTO_IPV6
        IP_PKTINFO
        IPV6_PKTINFO
        IP_TOS
        IPV6_TCLASS
        SOL_SOCKET
        SO_RXQ_OVFL
        MSG_TRUNC
        MSG_CTRUNC
        MSG_DONTWAIT
    int sendmmsg(int fd, mmsghdr *msgs, unsigned int vlen, int flags) nogil
    int recvmmsg(int fd, mmsghdr *msgs, unsigned int vlen, int flags, void *timeout) nogil
    cmsghdr *CMSG_FIRSTHDR(msghdr *m) nogil
    cmsghdr *CMSG_NXTHDR(msghdr *m, cmsghdr *c) nogil
    uint8_t *CMSG_DATA(cmsghdr *c) nogil
    size_t CMSG_SPACE(size_t n) nogil
    size_t CMSG_LEN(size_t n) nogil


# ---------------------------------------------------------------- small helpers

cdef inline uint16_t _rd16(const uint8_t *b) noexcept nogil:
    return (<uint16_t>b[0] << 8) | b[1]


cdef inline void _wr16(uint8_t *b, uint16_t v) noexcept nogil:
    b[0] = v >> 8
    b[1] = v & 0xFF


cdef inline uint16_t _ip4_csum(const uint8_t *h) noexcept nogil:
    """RFC 1071 checksum of a 20-byte IPv4 header (checksum field zero)."""
    cdef uint32_t s = 0
    cdef int i
    for i in range(0, 20, 2):
        s += _rd16(h + i)
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return <uint16_t>(~s & 0xFFFF)


# ---------------------------------------------------------------- TAP

cdef int sn_tap_read(int fd, sn_pkt *pkts, int n, uint32_t headroom,
                     sn_tap_stats *st) noexcept nogil:
    """Read up to n frames from a non-blocking TAP fd, one per slot, at `headroom`.

    Each slot gets [virtio-net header][Ethernet frame] at data[headroom:], with off/len
    set and drop/flags/hash/port cleared. Stops at EAGAIN (counted) or an error. A frame
    that fills the slot to the last byte is taken as truncated (read() on a TAP returns
    only what fit, so a frame must be shorter than the room to be known whole); it is
    consumed, counted, and its slot reused. The slots stay owned by their batch.
    Returns the number of slots filled (0..n).
    """
    cdef int i = 0
    cdef sn_pkt *p
    cdef ssize_t r
    cdef size_t room
    while i < n:
        p = &pkts[i]
        if headroom + 64 > p.cap:        # not even room for a minimal frame
            st.rx_truncated += 1
            break
        room = p.cap - headroom
        r = read(fd, p.data + headroom, room)
        st.rx_syscalls += 1
        if r < 0:
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                st.rx_eagain += 1
            else:
                st.rx_errors += 1
            break
        if r == 0:
            break
        if <size_t>r >= room:
            st.rx_truncated += 1
            continue
        p.off = headroom
        p.len = <uint32_t>r
        p.drop = 0
        p.flags = 0
        p.hash = 0
        p.port = 0
        st.rx_pkts += 1
        st.rx_bytes += <uint64_t>r
        i += 1
    return i


cdef int sn_tap_write(int fd, sn_pkt *pkts, int n, sn_tap_stats *st) noexcept nogil:
    """Write n slots ([virtio-net header][frame] each) to a TAP fd, one write per frame.

    TAP takes exactly one frame per write; there is no batched form. Slots already
    marked dropped (drop != 0) are skipped. On EAGAIN the frame and all after it are
    marked SN_DROP_RING_FULL and counted (the queue will not drain within this burst);
    a frame the kernel refuses (EINVAL: inconsistent virtio-net header) is marked
    SN_DROP_BAD_VNET_HDR, other errors SN_DROP_RING_FULL; the burst goes on.
    Slots stay owned by their batch. Returns the number of frames the kernel took.
    """
    cdef int i = 0
    cdef int done = 0
    cdef sn_pkt *p
    cdef ssize_t r
    while i < n:
        p = &pkts[i]
        if p.drop:
            i += 1
            continue
        if p.off > p.cap or p.len > p.cap - p.off:
            p.drop = SN_DROP_BAD_VNET_HDR
            st.tx_errors += 1
            i += 1
            continue
        r = write(fd, p.data + p.off, p.len)
        st.tx_syscalls += 1
        if r < 0:
            if errno == EINTR:
                continue
            if errno == EAGAIN or errno == ENOBUFS:
                while i < n:
                    if not pkts[i].drop:
                        pkts[i].drop = SN_DROP_RING_FULL
                        st.tx_ring_full += 1
                    i += 1
                break
            p.drop = SN_DROP_BAD_VNET_HDR if errno == EINVAL else SN_DROP_RING_FULL
            st.tx_errors += 1
        else:
            st.tx_pkts += 1
            st.tx_bytes += <uint64_t>p.len
            done += 1
        i += 1
    return done


cdef class TapCounters:
    """Counters of one TAP port; `as_dict()` reads them while I/O runs."""

    def as_dict(self):
        return dict(self.st)

    def __repr__(self):
        return f"TapCounters({self.as_dict()})"


cdef sn_tap_stats _scratch_tap_stats


def tap_read_burst(int fd, Batch batch not None, int max=-1, TapCounters counters=None):
    """Append up to `max` frames (all free slots if max < 0) read from TAP `fd`.

    Returns how many were read; batch.count grows by that much. GIL released.
    """
    cdef int start = batch.count
    cdef int n = batch.size - start
    cdef int got
    cdef uint32_t hr = batch.headroom
    cdef sn_tap_stats *st = &counters.st if counters is not None else &_scratch_tap_stats
    if 0 <= max < n:
        n = max
    with nogil:
        got = sn_tap_read(fd, batch.pkts + start, n, hr, st)
    batch.count = start + got
    return got


def tap_write_burst(int fd, Batch batch not None, int start, int n,
                    TapCounters counters=None):
    """Write slots [start, start+n) of `batch` to TAP `fd`; returns frames written."""
    cdef int done
    cdef sn_tap_stats *st = &counters.st if counters is not None else &_scratch_tap_stats
    if start < 0 or n < 0 or start + n > batch.count:
        raise IndexError("slots outside the batch")
    with nogil:
        done = sn_tap_write(fd, batch.pkts + start, n, st)
    return done


# ---------------------------------------------------------------- underlay

cdef int _parse_tx(sn_pkt *p, int family, uint8_t **dst, int *proto, uint16_t *sport,
                   uint16_t *dport, uint8_t **pl, uint32_t *plen, uint8_t *tos) noexcept nogil:
    """Read what the kernel needs to send an outer packet: destination, protocol, ports,
    TOS / traffic class (its ECN bits matter, RFC 6040), and where the payload is.
    Every length is checked against the slot and the headers.
    Returns 0, or -1 (malformed, wrong family, fragment, not UDP/ESP)."""
    cdef uint8_t *b
    cdef uint8_t *l4
    cdef uint32_t L, ihl, tot, l4len, ulen
    if p.off > p.cap or p.len > p.cap - p.off or p.len < 20:
        return -1
    b = p.data + p.off
    L = p.len
    if b[0] >> 4 == 4:
        if family != 4:
            return -1
        ihl = (b[0] & 0x0F) * 4
        tot = _rd16(b + 2)
        if ihl < 20 or tot < ihl or tot > L:
            return -1
        if _rd16(b + 6) & 0x3FFF:          # MF or fragment offset: never sent as is
            return -1
        proto[0] = b[9]
        tos[0] = b[1]
        dst[0] = b + 16
        l4 = b + ihl
        l4len = tot - ihl
    elif b[0] >> 4 == 6:
        if family != 6 or L < 40:
            return -1
        l4len = _rd16(b + 4)
        if 40 + l4len > L:
            return -1
        proto[0] = b[6]                    # no extension headers on the underlay
        tos[0] = <uint8_t>(((b[0] & 0x0F) << 4) | (b[1] >> 4))
        dst[0] = b + 24
        l4 = b + 40
    else:
        return -1
    if proto[0] == 17:
        if l4len < 8:
            return -1
        ulen = _rd16(l4 + 4)
        if ulen < 8 or ulen > l4len:
            return -1
        sport[0] = _rd16(l4)
        dport[0] = _rd16(l4 + 2)
        pl[0] = l4 + 8
        plen[0] = ulen - 8
    elif proto[0] == 50:
        sport[0] = 0
        dport[0] = 0
        pl[0] = l4
        plen[0] = l4len
    else:
        return -1
    return 0


cdef inline void _set_name(uint8_t *name, int family, const uint8_t *addr,
                           uint16_t port) noexcept nogil:
    # sockaddr_in / sockaddr_in6 by layout: family (host order), port, address.
    memset(name, 0, SN_SA_LEN)
    (<uint16_t *>name)[0] = AF_INET if family == 4 else AF_INET6
    _wr16(name + 2, port)
    if family == 4:
        memcpy(name + 4, addr, 4)
    else:
        memcpy(name + 8, addr, 16)


cdef int _txq_alloc(sn_txq *q) noexcept nogil:
    """Allocate a TX queue's scratch (zeroed); 0, or -1 with everything freed."""
    memset(q, 0, sizeof(sn_txq))
    q.msgs = <mmsghdr *>calloc(SN_IO_TX_MSGS, sizeof(mmsghdr))
    q.iovs = <iovec *>calloc(SN_IO_TX_IOVS, sizeof(iovec))
    q.iov_pkt = <int *>calloc(SN_IO_TX_IOVS, sizeof(int))
    q.msg_iov0 = <int *>calloc(SN_IO_TX_MSGS, sizeof(int))
    q.msg_seg = <uint32_t *>calloc(SN_IO_TX_MSGS, sizeof(uint32_t))
    q.msg_bytes = <uint32_t *>calloc(SN_IO_TX_MSGS, sizeof(uint32_t))
    q.msg_tos = <uint8_t *>calloc(SN_IO_TX_MSGS, 1)
    q.names = <uint8_t *>calloc(SN_IO_TX_MSGS, SN_SA_LEN)
    q.cmsgs = <uint8_t *>calloc(SN_IO_TX_MSGS, SN_IO_CMSG)
    if (not q.msgs or not q.iovs or not q.iov_pkt or not q.msg_iov0 or not q.msg_seg
            or not q.msg_bytes or not q.msg_tos or not q.names or not q.cmsgs):
        _txq_free(q)
        return -1
    return 0


cdef void _txq_free(sn_txq *q) noexcept nogil:
    free(q.msgs)
    free(q.iovs)
    free(q.iov_pkt)
    free(q.msg_iov0)
    free(q.msg_seg)
    free(q.msg_bytes)
    free(q.msg_tos)
    free(q.names)
    free(q.cmsgs)
    memset(q, 0, sizeof(sn_txq))


cdef int _ul_flush(const sn_ul *ul, sn_txq *q, int fd, int nm, sn_pkt *pkts) noexcept nogil:
    """sendmmsg the nm prepared messages on fd; returns datagrams the kernel took.

    A partial result resumes after the sent ones; the failing message's packets are
    marked and counted, and the rest are retried (EAGAIN/ENOBUFS: all the rest are
    dropped as ring full, since the socket buffer will not drain within the burst)."""
    cdef int sent = 0
    cdef int done = 0
    cdef int r, k, j, e, too_big
    cdef int waits = 0
    cdef pollfd pfd
    cdef uint16_t reason
    cdef msghdr *m
    cdef cmsghdr *c
    cdef size_t clen
    # Ancillary data per message: UDP_SEGMENT for a train, IP_TOS / IPV6_TCLASS when
    # the outer header asks for a TOS (ECN, DSCP) other than the socket's 0.
    for k in range(nm):
        m = &q.msgs[k].msg_hdr
        clen = 0
        if m.msg_iovlen > 1:
            clen += CMSG_SPACE(sizeof(uint16_t))
        if q.msg_tos[k]:
            clen += CMSG_SPACE(sizeof(int))
        if clen == 0:
            m.msg_control = NULL
            m.msg_controllen = 0
            continue
        m.msg_control = q.cmsgs + <size_t>k * SN_IO_CMSG
        m.msg_controllen = clen
        memset(m.msg_control, 0, clen)
        c = CMSG_FIRSTHDR(m)
        if m.msg_iovlen > 1:
            c.cmsg_level = SOL_UDP
            c.cmsg_type = UDP_SEGMENT
            c.cmsg_len = CMSG_LEN(sizeof(uint16_t))
            (<uint16_t *>CMSG_DATA(c))[0] = <uint16_t>q.msg_seg[k]
            c = CMSG_NXTHDR(m, c)
        if q.msg_tos[k]:
            c.cmsg_level = IPPROTO_IP if ul.family == 4 else IPPROTO_IPV6
            c.cmsg_type = IP_TOS if ul.family == 4 else IPV6_TCLASS
            c.cmsg_len = CMSG_LEN(sizeof(int))
            (<int *>CMSG_DATA(c))[0] = q.msg_tos[k]
    while sent < nm:
        r = sendmmsg(fd, q.msgs + sent, nm - sent, MSG_DONTWAIT)
        q.st.tx_syscalls += 1
        if r > 0:
            for k in range(sent, sent + r):
                done += <int>q.msgs[k].msg_hdr.msg_iovlen
                q.st.tx_bytes += q.msg_bytes[k]
                if q.msgs[k].msg_hdr.msg_iovlen > 1:
                    q.st.tx_gso_msgs += 1
            sent += r
            continue
        e = errno
        if e == EINTR:
            continue
        if e == EAGAIN or e == ENOBUFS:
            q.st.tx_eagain += 1
            # Backpressure before loss: these packets are already encrypted (sequence
            # numbers spent), so wait briefly for the socket to drain, as a NIC's full TX
            # queue stalls its producer, and drop only if it does not.
            if waits < SN_IO_TX_WAITS:
                waits += 1
                pfd.fd = fd
                pfd.events = POLLOUT
                pfd.revents = 0
                poll(&pfd, 1, 1)
                continue
            for k in range(sent, nm):
                for j in range(<int>q.msgs[k].msg_hdr.msg_iovlen):
                    pkts[q.iov_pkt[q.msg_iov0[k] + j]].drop = SN_DROP_RING_FULL
                    q.st.tx_ring_full += 1
            break
        # EMSGSIZE: larger than the path MTU with DF; EINVAL on a GSO message: its
        # segment (plus headers) exceeds the MTU, or too many segments.
        too_big = e == EMSGSIZE or (e == EINVAL and q.msgs[sent].msg_hdr.msg_iovlen > 1)
        reason = SN_DROP_TOO_BIG if too_big else SN_DROP_NO_ROUTE
        for j in range(<int>q.msgs[sent].msg_hdr.msg_iovlen):
            pkts[q.iov_pkt[q.msg_iov0[sent] + j]].drop = reason
            if too_big:
                q.st.tx_emsgsize += 1
            else:
                q.st.tx_errors += 1
        sent += 1
    q.st.tx_pkts += done
    return done

cdef int sn_ul_send(const sn_ul *ul, sn_txq *q, sn_pkt *pkts, int n) noexcept nogil:
    """Send n outer packets ([IP][UDP][payload] or [IP][ESP...]) through the sockets of
    `ul`, using the scratch and counters of TX queue `q` (one thread per queue).

    Consecutive packets for one socket go out in one sendmmsg; within it, consecutive
    packets with the same destination, ports and payload length (the last one may be
    shorter) form one message with UDP_SEGMENT, which the kernel splits (GSO).
    Slots already marked dropped are skipped; unusable ones are marked
    SN_DROP_MALFORMED_L3 (SN_DROP_NO_FDB if their socket is not open); refusals as in
    _flush. Slots stay owned by the caller. Returns the datagrams the kernel took.
    """
    cdef int i, fd, proto
    cdef int cur_fd = -1
    cdef int nm = 0
    cdef int niov = 0
    cdef int done = 0
    cdef int last
    cdef uint8_t *dst
    cdef uint8_t *pl
    cdef uint8_t cand[28]
    cdef uint16_t sport, dport
    cdef uint32_t plen
    cdef uint8_t tos
    cdef int gso_ok
    cdef msghdr *m
    cdef sn_pkt *p
    for i in range(n):
        p = &pkts[i]
        if p.drop:
            continue
        if _parse_tx(p, ul.family, &dst, &proto, &sport, &dport, &pl, &plen,
                     &tos) != 0:
            p.drop = SN_DROP_MALFORMED_L3
            q.st.tx_malformed += 1
            continue
        if proto == 50:
            fd = ul.esp_fd
            dport = 0
        elif dport == 4500 and ul.natt_fd >= 0:
            fd = ul.natt_fd
        else:
            fd = ul.pool_fds[sport % ul.pool_n]
        if fd < 0:
            p.drop = SN_DROP_NO_FDB
            q.st.tx_no_socket += 1
            continue
        if fd != cur_fd and nm:
            done += _ul_flush(ul, q, cur_fd, nm, pkts)
            nm = 0
            niov = 0
        cur_fd = fd
        # Extend the previous message into (or as) a GSO train?
        if nm and proto == 17 and plen > 0:
            last = nm - 1
            m = &q.msgs[last].msg_hdr
            gso_ok = (
                <int>m.msg_iovlen < ul.gso_segs
                and m.msg_iovlen < SN_GSO_MAX_SEGS
                and niov < SN_IO_TX_IOVS
                and plen <= q.msg_seg[last]
                # a train closes after its one shorter (final) segment
                and m.msg_iov[m.msg_iovlen - 1].iov_len == q.msg_seg[last]
                and q.msg_bytes[last] + plen <= SN_GSO_MAX_BYTES
                and q.msg_tos[last] == tos
            )
            if gso_ok:
                _set_name(cand, ul.family, dst, dport)
                if memcmp(cand, q.names + <size_t>last * SN_SA_LEN, SN_SA_LEN) == 0:
                    q.iovs[niov].iov_base = pl
                    q.iovs[niov].iov_len = plen
                    q.iov_pkt[niov] = i
                    niov += 1
                    m.msg_iovlen += 1
                    q.msg_bytes[last] += plen
                    continue
        if nm == SN_IO_TX_MSGS or niov == SN_IO_TX_IOVS:
            done += _ul_flush(ul, q, cur_fd, nm, pkts)
            nm = 0
            niov = 0
        _set_name(q.names + <size_t>nm * SN_SA_LEN, ul.family, dst, dport)
        m = &q.msgs[nm].msg_hdr
        m.msg_name = q.names + <size_t>nm * SN_SA_LEN
        m.msg_namelen = 16 if ul.family == 4 else SN_SA_LEN
        m.msg_iov = &q.iovs[niov]
        m.msg_iovlen = 1
        m.msg_control = NULL
        m.msg_controllen = 0
        m.msg_flags = 0
        q.iovs[niov].iov_base = pl
        q.iovs[niov].iov_len = plen
        q.iov_pkt[niov] = i
        q.msg_iov0[nm] = niov
        q.msg_seg[nm] = plen
        q.msg_bytes[nm] = plen
        q.msg_tos[nm] = tos
        niov += 1
        nm += 1
    if nm:
        done += _ul_flush(ul, q, cur_fd, nm, pkts)
    return done


cdef class TxQueue:
    """One sender's view of an Underlay: its own scratch and TX counters over the shared
    sockets (the kernel serialises per socket), so several workers may send at once,
    each on its own queue. Get one with Underlay.tx_queue()."""

    def __cinit__(self, Underlay owner not None):
        if _txq_alloc(&self.q) != 0:
            raise MemoryError()
        self.owner = owner
        self.ul = &owner.ul

    def __dealloc__(self):
        _txq_free(&self.q)

    cdef int send_pkts(self, sn_pkt *pkts, int n) noexcept nogil:
        return sn_ul_send(self.ul, &self.q, pkts, n)

    def send_burst(self, Batch batch not None, int start=0, int n=-1):
        """Send slots [start, start+n) (n < 0: to the end); returns datagrams sent."""
        cdef int done
        if n < 0:
            n = batch.count - start
        if start < 0 or n < 0 or start + n > batch.count:
            raise IndexError("slots outside the batch")
        with nogil:
            done = sn_ul_send(self.ul, &self.q, batch.pkts + start, n)
        return done

    def counters(self):
        """This queue's TX counters (a dict)."""
        return {k: v for k, v in dict(self.q.st).items() if k.startswith("tx_")}


cdef class Underlay:
    """The sockets of an uplink, driven in batches with the GIL released.

    Python (softnic.uplink.Uplink) opens and configures the sockets and owns them; this
    object only uses their fds. One thread receives; senders each use their own TxQueue
    (tx_queue()), or the default one through send_burst / send_pkts.

    Source ports: the pool has n sockets, socket i bound to a port p with p % n == i
    (searched across 49152..65535). A packet whose UDP source port is s leaves through
    socket s % n, so its outer source port keeps the low log2(n) bits of s exactly: with
    n = 128, 7 bits of the data plane's flow hash survive to the wire, i.e. 128 distinct
    source ports for ECMP and RSS to spread. ESP-in-UDP (dport 4500) leaves from the 4500
    socket when one is open, as RFC 3948 expects; raw ESP from the raw socket.
    """

    def __cinit__(self, int family, local_addr, pool_fds, int natt_fd=-1, int esp_fd=-1):
        cdef int i
        cdef bytes la = bytes(local_addr)
        if family not in (4, 6):
            raise ValueError("family must be 4 or 6")
        if len(la) != (4 if family == 4 else 16):
            raise ValueError("local_addr must be a packed address of the family")
        if not 0 < len(pool_fds) <= SN_IO_POOL_MAX:
            raise ValueError(f"pool size must be 1..{SN_IO_POOL_MAX}")
        memset(&self.ul, 0, sizeof(sn_ul))
        self.ul.family = family
        memset(self.laddr, 0, 16)
        memcpy(self.laddr, <const char *>la, len(la))
        self.ul.natt_fd = natt_fd
        self.ul.esp_fd = esp_fd
        self.ul.gso_segs = SN_GSO_MAX_SEGS
        self.ul.pool_fds = <int *>calloc(len(pool_fds), sizeof(int))
        if not self.ul.pool_fds:
            raise MemoryError()
        self.ul.pool_n = len(pool_fds)
        for i in range(self.ul.pool_n):
            self.ul.pool_fds[i] = pool_fds[i]
        self.n_chans = 0
        self.rr = 0
        self.txqs = []
        self.txq0 = self.tx_queue()

    def __dealloc__(self):
        cdef int i
        for i in range(self.n_chans):
            free(self.chans[i].bufs)
            free(self.chans[i].msgs)
            free(self.chans[i].iovs)
            free(self.chans[i].names)
            free(self.chans[i].cmsgs)
        free(self.ul.pool_fds)
        self.ul.pool_fds = NULL
        self.ul.pool_n = 0

    def tx_queue(self):
        """A new TxQueue over these sockets, for one more sending thread. Its counters
        are included in counters()."""
        q = TxQueue(self)
        self.txqs.append(q)
        return q

    @property
    def gso_segs(self):
        """Most segments per UDP_SEGMENT message (1 turns GSO off)."""
        return self.ul.gso_segs

    @gso_segs.setter
    def gso_segs(self, int v):
        if not 1 <= v <= SN_GSO_MAX_SEGS:
            raise ValueError(f"gso_segs must be 1..{SN_GSO_MAX_SEGS}")
        self.ul.gso_segs = v

    cdef int send_pkts(self, sn_pkt *pkts, int n) noexcept nogil:
        """sn_ul_send on the default TX queue (the one sending thread of simple users)."""
        return self.txq0.send_pkts(pkts, n)

    def add_rx(self, int fd, int kind, int lport=0):
        """Receive from `fd` (kind SN_CH_UDP / SN_CH_NATT / SN_CH_ESP = 0 / 1 / 2)."""
        cdef sn_rx_chan *ch
        cdef int i
        if self.n_chans >= 3:
            raise ValueError("at most 3 receive channels")
        if kind not in (SN_CH_UDP, SN_CH_NATT, SN_CH_ESP) or not 0 <= lport <= 65535:
            raise ValueError("bad channel")
        ch = &self.chans[self.n_chans]
        memset(ch, 0, sizeof(sn_rx_chan))
        ch.bufs = <uint8_t *>calloc(SN_IO_RX_MSGS, SN_IO_RX_BUF)
        ch.msgs = <mmsghdr *>calloc(SN_IO_RX_MSGS, sizeof(mmsghdr))
        ch.iovs = <iovec *>calloc(SN_IO_RX_MSGS, sizeof(iovec))
        ch.names = <uint8_t *>calloc(SN_IO_RX_MSGS, SN_SA_LEN)
        ch.cmsgs = <uint8_t *>calloc(SN_IO_RX_MSGS, SN_IO_CMSG)
        if not ch.bufs or not ch.msgs or not ch.iovs or not ch.names or not ch.cmsgs:
            free(ch.bufs)
            free(ch.msgs)
            free(ch.iovs)
            free(ch.names)
            free(ch.cmsgs)
            raise MemoryError()
        ch.fd = fd
        ch.kind = kind
        ch.lport = lport
        for i in range(SN_IO_RX_MSGS):
            ch.iovs[i].iov_base = ch.bufs + <size_t>i * SN_IO_RX_BUF
            ch.iovs[i].iov_len = SN_IO_RX_BUF
        self.n_chans += 1

    # ------------------------------------------------------------ TX

    # ------------------------------------------------------------ RX

    cdef int _begin(self, sn_rx_chan *ch) noexcept nogil:
        """Prepare message ch.cur for splitting: its GRO segment size and local address.
        Returns 0, or -1 if it must be skipped (truncated or empty; counted)."""
        cdef msghdr *m = &ch.msgs[ch.cur].msg_hdr
        cdef uint32_t ln = ch.msgs[ch.cur].msg_len
        cdef cmsghdr *c
        cdef int gro = 0
        cdef uint32_t ovfl
        cdef int tclass = 0
        ch.cur_off = 0
        ch.cur_tos = 0
        memcpy(ch.cur_dst, self.laddr, 16)
        c = CMSG_FIRSTHDR(m)
        while c != NULL:
            if c.cmsg_level == SOL_UDP and c.cmsg_type == UDP_GRO:
                memcpy(&gro, CMSG_DATA(c), sizeof(int))
            elif c.cmsg_level == IPPROTO_IP and c.cmsg_type == IP_PKTINFO:
                # struct in_pktinfo: ifindex, spec_dst, addr (the header's destination)
                memcpy(ch.cur_dst, CMSG_DATA(c) + 8, 4)
            elif c.cmsg_level == IPPROTO_IPV6 and c.cmsg_type == IPV6_PKTINFO:
                memcpy(ch.cur_dst, CMSG_DATA(c), 16)
            elif c.cmsg_level == IPPROTO_IP and c.cmsg_type == IP_TOS:
                ch.cur_tos = CMSG_DATA(c)[0]
            elif c.cmsg_level == IPPROTO_IPV6 and c.cmsg_type == IPV6_TCLASS:
                memcpy(&tclass, CMSG_DATA(c), sizeof(int))
                ch.cur_tos = <uint8_t>tclass
            elif c.cmsg_level == SOL_SOCKET and c.cmsg_type == SO_RXQ_OVFL:
                # the socket's running count of datagrams dropped on a full buffer
                memcpy(&ovfl, CMSG_DATA(c), sizeof(uint32_t))
                self.st.rx_overflow += <uint32_t>(ovfl - ch.ovfl)
                ch.ovfl = ovfl
            c = CMSG_NXTHDR(m, c)
        # MSG_CTRUNC: a lost UDP_GRO cmsg would make a super-buffer look like one
        # datagram, so such a message is dropped rather than trusted.
        if m.msg_flags & (MSG_TRUNC | MSG_CTRUNC) or ln > SN_IO_RX_BUF:
            self.st.rx_truncated += 1
            return -1
        if ln == 0:
            self.st.rx_empty += 1
            return -1
        ch.cur_seg = <uint32_t>gro if 0 < gro < <int>ln else ln
        if ch.cur_seg < ln:
            self.st.rx_gro_bufs += 1
        return 0

    cdef int _drain(self, sn_rx_chan *ch, sn_pkt *pkts, int n, uint32_t headroom,
                    int *idle) noexcept nogil:
        """Split pending super-buffers of ch into slots; when none is pending, one
        recvmmsg. Returns slots filled; sets idle[0] when the socket had nothing."""
        cdef int filled = 0
        cdef int r, i
        cdef uint32_t ln, seg, hl
        cdef uint8_t *src
        cdef uint8_t *name
        cdef uint8_t *h
        cdef msghdr *m
        cdef sn_pkt *p
        cdef int received = 0
        idle[0] = 0
        while filled < n:
            if ch.cur >= ch.n_msgs:
                if received:
                    break
                for i in range(SN_IO_RX_MSGS):
                    m = &ch.msgs[i].msg_hdr
                    m.msg_name = ch.names + <size_t>i * SN_SA_LEN
                    m.msg_namelen = SN_SA_LEN
                    m.msg_iov = &ch.iovs[i]
                    m.msg_iovlen = 1
                    m.msg_control = ch.cmsgs + <size_t>i * SN_IO_CMSG
                    m.msg_controllen = SN_IO_CMSG
                    m.msg_flags = 0
                r = recvmmsg(ch.fd, ch.msgs, SN_IO_RX_MSGS, MSG_DONTWAIT, NULL)
                self.st.rx_syscalls += 1
                received = 1
                if r <= 0:
                    if r < 0 and errno == EINTR:
                        continue
                    if r < 0 and errno == EAGAIN:
                        self.st.rx_eagain += 1
                    else:
                        self.st.rx_errors += 1
                    ch.n_msgs = 0
                    ch.cur = 0
                    idle[0] = 1
                    break
                ch.n_msgs = r
                ch.cur = 0
                ch.cur_seg = 0
            if ch.cur_seg == 0 and self._begin(ch) != 0:
                ch.cur += 1
                continue
            ln = ch.msgs[ch.cur].msg_len
            seg = ch.cur_seg
            if seg > ln - ch.cur_off:
                seg = ln - ch.cur_off
            src = ch.bufs + <size_t>ch.cur * SN_IO_RX_BUF + ch.cur_off
            name = ch.names + <size_t>ch.cur * SN_SA_LEN
            ch.cur_off += seg
            if ch.cur_off >= ln:
                ch.cur += 1
                ch.cur_seg = 0
            if ch.kind == SN_CH_NATT:
                if seg == 1 and src[0] == 0xFF:
                    self.st.rx_natt_keepalive += 1
                    continue
                if seg >= 4 and src[0] == 0 and src[1] == 0 and src[2] == 0 and src[3] == 0:
                    self.st.rx_natt_ike += 1
                    continue
            if ch.kind == SN_CH_ESP:
                hl = 0 if self.ul.family == 4 else 40
            else:
                hl = 28 if self.ul.family == 4 else 48
            p = &pkts[filled]
            if headroom > p.cap or hl + seg > p.cap - headroom:
                self.st.rx_truncated += 1
                continue
            h = p.data + headroom
            if self.ul.family == 4 and hl:
                h[0] = 0x45
                h[1] = ch.cur_tos
                _wr16(h + 2, <uint16_t>(hl + seg))
                _wr16(h + 4, 0)
                _wr16(h + 6, 0x4000)        # DF: the underlay never fragments
                h[8] = 64
                h[9] = 17
                _wr16(h + 10, 0)
                memcpy(h + 12, name + 4, 4)
                memcpy(h + 16, ch.cur_dst, 4)
                _wr16(h + 10, _ip4_csum(h))
            elif hl:
                h[0] = 0x60 | (ch.cur_tos >> 4)
                h[1] = <uint8_t>((ch.cur_tos & 0x0F) << 4)
                h[2] = 0
                h[3] = 0
                _wr16(h + 4, <uint16_t>(hl - 40 + seg))
                h[6] = 50 if ch.kind == SN_CH_ESP else 17
                h[7] = 64
                memcpy(h + 8, name + 8, 16)
                memcpy(h + 24, ch.cur_dst, 16)
            if ch.kind != SN_CH_ESP:
                # UDP: ports from the peer and the bound socket; checksum 0 = not
                # recomputed (the kernel verified it; RFC 6935 allows 0 for tunnels).
                h = p.data + headroom + hl - 8
                memcpy(h, name + 2, 2)
                _wr16(h + 2, ch.lport)
                _wr16(h + 4, <uint16_t>(8 + seg))
                _wr16(h + 6, 0)
            memcpy(p.data + headroom + hl, src, seg)
            p.off = headroom
            p.len = hl + seg
            p.drop = 0
            p.flags = 0
            p.hash = 0
            p.port = 0
            filled += 1
            self.st.rx_pkts += 1
            self.st.rx_bytes += seg
            if ch.kind == SN_CH_UDP:
                self.st.rx_vxlan += 1
            elif ch.kind == SN_CH_NATT:
                self.st.rx_natt += 1
            else:
                self.st.rx_esp += 1
        return filled

    cdef int recv_pkts(self, sn_pkt *pkts, int n, uint32_t headroom) noexcept nogil:
        """Fill up to n slots with received outer packets (header rebuilt at `headroom`).

        Channels are served round-robin, each draining what it has buffered before it
        calls recvmmsg again, until the slots are full or every channel is idle.
        Datagrams that cannot be delivered are counted (truncated, keepalive, IKE,
        empty), never placed. Slots stay owned by the caller. Returns slots filled.
        """
        cdef int filled = 0
        cdef int idle_run = 0
        cdef int idle
        cdef int got
        if self.n_chans == 0:
            return 0
        while filled < n and idle_run < self.n_chans:
            got = self._drain(&self.chans[self.rr], pkts + filled, n - filled, headroom,
                              &idle)
            filled += got
            if idle and got == 0:
                idle_run += 1
            else:
                idle_run = 0
            self.rr = (self.rr + 1) % self.n_chans
        return filled

    # ------------------------------------------------------------ Python surface

    def send_burst(self, Batch batch not None, int start=0, int n=-1):
        """Send slots [start, start+n) (n < 0: to the end) on the default TX queue;
        returns datagrams sent."""
        return self.txq0.send_burst(batch, start, n)

    def recv_burst(self, Batch batch not None, int max=-1):
        """Append received packets to `batch` (up to `max`); returns how many."""
        cdef int start = batch.count
        cdef int n = batch.size - start
        cdef int got
        cdef uint32_t hr = batch.headroom
        if 0 <= max < n:
            n = max
        with nogil:
            got = self.recv_pkts(batch.pkts + start, n, hr)
        batch.count = start + got
        return got

    def counters(self):
        """A snapshot of the counters (a dict), TX summed over every queue; safe while
        other threads do I/O."""
        c = dict(self.st)
        for q in self.txqs:
            for k, v in (<TxQueue>q).counters().items():
                c[k] += v
        return c

    def pool_size(self):
        return self.ul.pool_n

    def __repr__(self):
        return (f"Underlay(IPv{self.ul.family}, pool={self.ul.pool_n}, "
                f"rx_channels={self.n_chans}, tx_queues={len(self.txqs)})")
