# Batched I/O at softnic's edges: TAP VF ports and the underlay sockets.
# See softnic/_io.pyx for the conventions; this file is what other stages cimport.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from softnic._pkt cimport sn_pkt


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef struct iovec "struct iovec":
        void *iov_base
        size_t iov_len
    ctypedef struct msghdr "struct msghdr":
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ctypedef struct mmsghdr "struct mmsghdr":
        msghdr msg_hdr
        unsigned int msg_len
    ctypedef struct cmsghdr "struct cmsghdr":
        size_t cmsg_len
        int cmsg_level
        int cmsg_type


cdef enum:
    SN_IO_POOL_MAX = 1024          # most source-port sockets in one pool
    SN_IO_TX_MSGS = 256            # messages in one sendmmsg
    SN_IO_TX_WAITS = 4             # 1 ms waits for a full socket before dropping
    SN_IO_TX_IOVS = 1024           # segments across those messages
    SN_IO_CMSG = 128               # control buffer per message (GRO + PKTINFO fit)
    SN_IO_RX_MSGS = 16             # super-buffers per recvmmsg
    SN_IO_RX_BUF = 65536           # one super-buffer (a UDP payload is < 65536)
    SN_GSO_MAX_SEGS = 64           # UDP_MAX_SEGMENTS of older kernels (6.x: 128)
    SN_GSO_MAX_BYTES = 65507       # 65535 - IPv4 20 - UDP 8: largest UDP payload
    # Receive channels of an Underlay.
    SN_CH_UDP = 0                  # VXLAN (or any UDP tunnel port)
    SN_CH_NATT = 1                 # ESP-in-UDP, RFC 3948, port 4500
    SN_CH_ESP = 2                  # raw IP protocol 50


# Counters of one TAP port. Plain uint64 fields: a reader in another thread sees each
# value whole on 64-bit targets, which is all a counter needs.
ctypedef struct sn_tap_stats:
    uint64_t rx_syscalls
    uint64_t rx_pkts
    uint64_t rx_bytes
    uint64_t rx_eagain
    uint64_t rx_truncated
    uint64_t rx_errors
    uint64_t tx_syscalls
    uint64_t tx_pkts
    uint64_t tx_bytes
    uint64_t tx_ring_full
    uint64_t tx_errors


ctypedef struct sn_ul_stats:
    uint64_t tx_syscalls       # sendmmsg calls
    uint64_t tx_pkts           # datagrams handed to the kernel (GSO segments counted)
    uint64_t tx_bytes          # payload bytes handed to the kernel
    uint64_t tx_gso_msgs       # messages carrying UDP_SEGMENT (more than one segment)
    uint64_t tx_eagain         # sendmmsg hit a full socket buffer
    uint64_t tx_ring_full      # packets dropped because of it
    uint64_t tx_emsgsize       # packets refused as larger than the path MTU
    uint64_t tx_errors         # packets refused for any other reason
    uint64_t tx_malformed      # outer header unusable (family, lengths, protocol)
    uint64_t tx_no_socket      # protocol whose socket is not open (e.g. ESP, esp=False)
    uint64_t rx_syscalls       # recvmmsg calls
    uint64_t rx_pkts           # datagrams delivered into slots
    uint64_t rx_bytes          # payload bytes delivered
    uint64_t rx_gro_bufs       # super-buffers holding more than one datagram
    uint64_t rx_eagain         # recvmmsg found nothing
    uint64_t rx_truncated      # datagram larger than buffer or slot, dropped
    uint64_t rx_errors         # recvmmsg failed otherwise
    uint64_t rx_empty          # zero-length datagrams, dropped
    # kernel drops on a full socket buffer (SO_RXQ_OVFL), counted in skbs: one lost GRO
    # super-buffer counts once however many datagrams it held
    uint64_t rx_overflow
    uint64_t rx_vxlan          # delivered per channel
    uint64_t rx_natt
    uint64_t rx_esp
    uint64_t rx_natt_keepalive  # RFC 3948 2.3 keepalives (0xFF), dropped
    uint64_t rx_natt_ike       # non-ESP marker (IKE on 4500), not ours, dropped


# One receive socket and the super-buffers it fills, with the cursor of the split.
ctypedef struct sn_rx_chan:
    int fd
    int kind                   # SN_CH_*
    uint16_t lport             # bound port, for the rebuilt UDP header
    uint8_t *bufs              # SN_IO_RX_MSGS * SN_IO_RX_BUF
    mmsghdr *msgs
    iovec *iovs
    uint8_t *names             # SN_IO_RX_MSGS sockaddr_in6-sized peers
    uint8_t *cmsgs             # SN_IO_RX_MSGS * SN_IO_CMSG
    int n_msgs                 # filled by the last recvmmsg
    int cur                    # message being split
    uint32_t cur_off           # next datagram's offset in it
    uint32_t cur_seg           # its GRO segment size (= length without GRO)
    uint8_t cur_dst[16]        # its local (destination) address from PKTINFO
    uint8_t cur_tos            # its outer TOS / traffic class (IP_RECVTOS, RECVTCLASS)
    uint32_t ovfl              # last SO_RXQ_OVFL value (the kernel's running count)


cdef int sn_tap_read(int fd, sn_pkt *pkts, int n, uint32_t headroom,
                     sn_tap_stats *st) noexcept nogil
cdef int sn_tap_write(int fd, sn_pkt *pkts, int n, sn_tap_stats *st) noexcept nogil


cdef class TapCounters:
    cdef sn_tap_stats st


# What a sender needs to know about an uplink (owned by its Underlay).
ctypedef struct sn_ul:
    int family                 # 4 or 6
    int pool_n
    int *pool_fds              # source-port pool; socket i bound to a port = i mod pool_n
    int natt_fd                # UDP 4500 or -1
    int esp_fd                 # raw IP protocol 50 or -1
    int gso_segs               # most segments per UDP_SEGMENT message; 1 = no GSO


# One sending thread's scratch and counters (only the tx_* fields are used).
ctypedef struct sn_txq:
    mmsghdr *msgs              # SN_IO_TX_MSGS
    iovec *iovs                # SN_IO_TX_IOVS segments
    int *iov_pkt               # slot index behind each segment
    int *msg_iov0              # first segment of each message
    uint32_t *msg_seg          # segment size of each message
    uint32_t *msg_bytes        # payload bytes of each message
    uint8_t *msg_tos           # outer TOS / traffic class of each message
    uint8_t *names             # destination sockaddr of each message
    uint8_t *cmsgs             # SN_IO_CMSG of control data per message
    sn_ul_stats st


cdef int sn_ul_send(const sn_ul *ul, sn_txq *q, sn_pkt *pkts, int n) noexcept nogil


cdef class TxQueue:
    cdef object owner              # the Underlay, kept alive while the queue is
    cdef const sn_ul *ul
    cdef sn_txq q
    cdef int send_pkts(self, sn_pkt *pkts, int n) noexcept nogil


cdef class Underlay:
    cdef sn_ul_stats st            # RX counters (TX ones live in the queues)
    cdef sn_ul ul
    cdef uint8_t laddr[16]         # local address (network order; v4 in the first 4)
    cdef list txqs
    cdef TxQueue txq0              # default queue of send_burst / send_pkts
    # RX channels, used by one receiving thread at a time
    cdef sn_rx_chan chans[3]
    cdef int n_chans
    cdef int rr

    cdef int send_pkts(self, sn_pkt *pkts, int n) noexcept nogil
    cdef int recv_pkts(self, sn_pkt *pkts, int n, uint32_t headroom) noexcept nogil
    cdef int _begin(self, sn_rx_chan *ch) noexcept nogil
    cdef int _drain(self, sn_rx_chan *ch, sn_pkt *pkts, int n, uint32_t headroom,
                    int *idle) noexcept nogil
