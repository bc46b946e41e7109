# cython: language_level=3
"""softnic's data plane: VF frames through TSO, ESP and VXLAN to the underlay and back.

Pipeline order (DESIGN.md, and the seed's questions):
  TX host-terminated   : policy -> TSO / checksum completion -> ESP (VF's SA) -> VXLAN
  TX device-terminated : TSO / checksum completion -> VXLAN -> ESP (uplink SA, per VTEP)
  RX                   : the reverse; anti-replay and the ICV before anything is trusted,
                         only VTEPs admitted for the VNI, the inbound policy after
                         decryption; a broadcast to every VF of its VNI.
  Local (VF to VF here): the sender's outbound policy, then the receiver's inbound
                         processing as on RX (_vf_inbound), protected frames through the
                         sender's SA and the receiver's.
Segment size is derived from the underlay MTU minus the exact ESP + VXLAN overhead, so
nothing is ever fragmented in the underlay (RFC 7348 §4.3).

Threads: TX runs in lanes, one worker each, with a lock per lane; a VF's queue pairs are
spread over the lanes. One thread runs RX bursts, and delivery into VFs from any thread
happens under the RX lock (a guest ring or TAP has one producer at a time). The control
plane takes every lock to change tables, so a burst never sees a half-made change and an
SA is never freed under a burst. Everything per packet is C, without the GIL.
"""

import ipaddress

from cpython.pythread cimport (
    NOWAIT_LOCK,
    WAIT_LOCK,
    PyThread_acquire_lock,
    PyThread_allocate_lock,
    PyThread_free_lock,
    PyThread_release_lock,
    PyThread_type_lock,
)
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec

from softnic._batch cimport Batch
from softnic._esp cimport (
    SecurityAssociation,
    sn_esp_decap,
    sn_esp_account_out,
    sn_esp_encap_deferred,
    sn_esp_max_ip_len,
    sn_esp_read_spi,
    sn_sa,
)
from softnic._io cimport TxQueue, Underlay, sn_tap_read, sn_tap_stats, sn_tap_write
from softnic._parse cimport sn_hdrs, sn_parse_frame
from softnic._pkt cimport (
    SN_DROP_MALFORMED_L2,
    SN_DROP_MALFORMED_L3,
    SN_DROP_MAX,
    SN_DROP_NO_FDB,
    SN_DROP_NO_ROOM,
    SN_DROP_NO_SA,
    SN_DROP_POLICY,
    SN_DROP_RING_FULL,
    SN_DROP_TOO_BIG,
    SN_DROP_UNKNOWN_VNI,
    SN_DROP_UNKNOWN_VTEP,
    SN_OK,
    SN_PKT_ESP,
    SN_PKT_LOCAL,
    SN_VNET_HDR_LEN,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    sn_pkt,
    sn_vnet_hdr,
)
from softnic._csum cimport (
    sn_csum_copy,
    sn_csum_finish,
    sn_csum_partial,
    sn_csum_pseudo4,
    sn_csum_pseudo6,
    sn_csum_sum16,
)
from softnic._proto cimport sn_st16
from softnic._tables cimport (
    SN_DIR_IN,
    SN_DIR_OUT,
    SN_FDB_NONE,
    SN_POLICY_BYPASS,
    SN_POLICY_DISCARD,
    SN_POLICY_NONE,
    SN_POLICY_PROTECT,
    SN_TAF_INET,
    SN_TAF_INET6,
    SN_VF_UPLINK,
    Fdb,
    PeerTable,
    PolicyTable,
    SATable,
    sn_fdb_find,
    sn_fdb_flood,
    sn_fdb_slot,
    sn_fdb_learn,
    sn_fdb_lookup,
    sn_peer_lookup,
    sn_peer_slot,
    sn_policy_lookup,
    sn_policy_rule,
    sn_sa_add,
    sn_sa_lookup,
    sn_sa_remove,
)
from softnic._tso cimport sn_csum_complete, sn_tcp_mss_clamp, sn_tso_segment
from softnic._tsoesp cimport SN_TSOESP_GENERIC, sn_tso_esp_vxlan
from vhost._virtq cimport (
    Virtq,
    vh_vq,
    vq_enable_kicks,
    vq_pop_chains,
    vq_push_frames,
)

from softnic._vxlan cimport (
    sn_flow_hash,
    sn_icmp_too_big,
    sn_vxlan_decap,
    sn_vxlan_encap,
    sn_vxlan_rx,
    sn_vxlan_tx,
    sn_vxlan_tx_init,
)

from softnic._batch import DROP_REASONS

cdef extern from *:
    """
    #include <errno.h>
    #include <sys/uio.h>
    #include <unistd.h>
    #ifndef RWF_NOWAIT
    #define RWF_NOWAIT 0x00000008
    #endif
    /* Reads an eventfd's count without waiting, whatever its O_NONBLOCK flag says
       (RWF_NOWAIT); on a kernel without it, a plain read of the fd vhost made
       O_NONBLOCK. */
    static void fp_read_eventfd(int fd) {
        uint64_t v;
        struct iovec io = {&v, sizeof v};
        if (preadv2(fd, &io, 1, -1, RWF_NOWAIT) < 0 && (errno == EOPNOTSUPP || errno == EINVAL))
            (void)!read(fd, &v, sizeof v);
    }
    """
    void fp_read_eventfd(int fd) noexcept nogil

cdef enum:
    FP_MAX_VF = 256
    FP_MAX_VTEP = 256
    FP_MAX_FLOOD = 64
    FP_MAX_POLICY = 64          # per VF and direction; first match in priority order
    FP_MAX_SA = 4096            # per scope; SPI lookup is a short linear probe
    FP_MAX_UL_SAS = 16          # uplink SAs per VTEP pair, chosen by the inner flow hash
    FP_MAX_SEGS = 1400          # a 64 KB frame at the smallest MSS (48) is 1366 segments
    FP_UPLINK = FP_MAX_VF       # the scope index of the uplink's SAs
    FP_VH_PENDING = 256         # frames gathered for one push into a guest's RX ring
    FP_VH_GRO = 8               # coalesced 64 KB frames per push
    FP_MIRROR = 1024            # captured frames held per thread between two drains
    FP_MIRROR_UPLINK = 0xFFFF   # the scope of uplink frames in the mirror
    FP_MAX_QP = 64              # vhost-user queue pairs per VF (the config's limit)
    FP_MAX_LANES = 16           # TX workers
    FP_ACCT = 4                 # SAs a lane accounts for per burst before it adds early

    FP_MODE_OFF = 0
    FP_MODE_OFFLOAD = 1
    FP_MODE_ENFORCE = 2

    FP_UL_OFF = 0               # no device-terminated IPsec
    FP_UL_ESP = 1               # raw ESP (IP protocol 50) between VTEPs
    FP_UL_ESPINUDP = 2          # ESP in UDP 4500 (RFC 3948)

ctypedef struct fp_counters:
    uint64_t tx_frames          # frames taken from the VF
    uint64_t tx_bytes
    uint64_t tx_tso_frames      # of which GSO frames segmented here
    uint64_t tx_segments        # packets made from them
    uint64_t tx_esp             # packets protected with the VF's SA
    uint64_t tx_packets         # packets handed to the underlay
    uint64_t tx_local           # frames switched to another VF on this host
    uint64_t tx_icmp_too_big    # ICMP too-big / packet-too-big replies sent to the VF
    uint64_t tx_mss_clamped     # SYNs whose MSS option was lowered
    uint64_t tx_fragmented      # IPv4 packets (DF clear) fragmented to fit the tunnel
    uint64_t rx_frames          # frames delivered to the VF
    uint64_t rx_bytes
    uint64_t rx_esp             # of which decrypted with the VF's SA
    uint64_t rx_esp_passthrough  # ESP passed untouched (offload mode, SPI not ours)
    uint64_t rx_coalesced       # segments merged into larger frames for the VF
    uint64_t drops[<int>SN_DROP_MAX]

ctypedef struct fp_vf:
    uint8_t used
    uint8_t mode                # FP_MODE_*
    uint8_t mac[6]
    uint32_t vni
    uint32_t mtu                # the VF's own MTU (largest L3 packet it may send)
    int tap_fd                  # -1 when the VF is not a TAP
    vh_vq *vq_tx[FP_MAX_QP]     # vhost-user: the guest's TX rings (NULL when not running)
    vh_vq *vq_rx[FP_MAX_QP]     # and its RX rings, both by queue pair
    vh_vq *rxq[FP_MAX_QP]       # the running RX rings, packed: received flows spread here
    uint32_t n_rxq              # 0: no guest ring running
    int kick_fd[FP_MAX_QP]      # the guest's TX kick eventfd of each pair (if vq_tx set)
    uint8_t guest_csum          # VIRTIO_NET_F_GUEST_CSUM: DATA_VALID/NEEDS_CSUM allowed
    uint8_t guest_tso           # VIRTIO_NET_F_GUEST_TSO4/6: coalesced frames allowed
    uint8_t mergeable           # VIRTIO_NET_F_MRG_RXBUF
    uint8_t mirror              # a capture is on: copy frames both ways to the mirror
    fp_counters c               # the RX side's counters (TX lanes keep their own)
    sn_tap_stats tap

ctypedef struct fp_vtep:
    uint8_t used
    uint8_t family
    uint8_t addr[16]
    sn_vxlan_tx tx              # template; the VNI is set per frame
    int n_sas
    sn_sa *sas[FP_MAX_UL_SAS]   # device-terminated outbound SAs towards this VTEP

ctypedef struct fp_sa_ref:
    # What the SA table and the policies point at: the SA, and the reqid that groups the
    # SAs of one policy (the old and the new one across a make-before-break rekey).
    sn_sa *sa
    uint32_t reqid

ctypedef struct fp_uplink_counters:
    uint64_t rx_packets
    uint64_t rx_esp             # packets decrypted with an uplink SA
    uint64_t tx_esp             # packets protected with an uplink SA
    uint64_t drops[<int>SN_DROP_MAX]


cdef struct fp_sel:
    # The selector fields of one IP packet, read once per frame.
    uint8_t family
    uint8_t proto
    uint16_t sport
    uint16_t dport
    uint8_t src[16]
    uint8_t dst[16]


cdef bint _selector(const uint8_t *f, const sn_hdrs *h, fp_sel *s) noexcept nogil:
    """Fill s from a parsed frame; False for non-IP."""
    cdef const uint8_t *ip = f + h.l3off
    cdef const uint8_t *l4
    if h.ipver == 4:
        s.family = 4
        memcpy(s.src, ip + 12, 4)
        memcpy(s.dst, ip + 16, 4)
    elif h.ipver == 6:
        s.family = 6
        memcpy(s.src, ip + 8, 16)
        memcpy(s.dst, ip + 24, 16)
    else:
        return False
    s.proto = h.l4proto
    s.sport = 0
    s.dport = 0
    if (h.l4proto == 6 or h.l4proto == 17) and h.l4hdrlen and not h.is_fragment:
        l4 = f + h.l4off
        s.sport = (l4[0] << 8) | l4[1]
        s.dport = (l4[2] << 8) | l4[3]
    return True


cdef inline int _spd(PolicyTable t, int vf, uint8_t direction, const fp_sel *s,
                     fp_sa_ref **ref) noexcept nogil:
    """The VF's policy for a packet: SN_POLICY_* (PROTECT sets *ref)."""
    cdef void *sa = NULL
    cdef int act = sn_policy_lookup(&t.t, vf, direction,
                                    SN_TAF_INET if s.family == 4 else SN_TAF_INET6,
                                    s.src, s.dst, s.proto, s.sport, s.dport, &sa)
    ref[0] = <fp_sa_ref *>sa
    return act


cdef bint _is_neighbour_discovery(const uint8_t *f, const sn_hdrs *h,
                                  uint32_t len) noexcept nogil:
    # ICMPv6 router/neighbour solicitation/advertisement and redirect (133..137) must
    # pass in every mode, as ARP does, or the overlay cannot resolve addresses.
    if h.ipver != 6 or h.l4proto != 58 or h.l4off >= len:
        return False
    return 133 <= f[h.l4off] <= 137


cdef uint32_t _fragment4(const uint8_t *f, const sn_hdrs *h, uint32_t chunk, uint32_t n,
                         sn_pkt *out, uint32_t headroom) noexcept nogil:
    """Cut the IPv4 packet of frame f (20-byte header, DF clear) into n fragments of
    `chunk` payload bytes (a multiple of 8) in out[0:n] (RFC 791 3.2): L2 and IP header
    copied, total length, MF and offset (relative to the packet's own, so a fragment can
    be fragmented again) and the header checksum set. The caller has checked the room."""
    cdef const uint8_t *ip = f + h.l3off
    cdef uint32_t paylen = h.l3len_total - 20, off = 0, take, j
    cdef uint32_t fo0 = ((ip[6] & 0x1F) << 8) | ip[7]
    cdef uint8_t mf0 = ip[6] & 0x20
    cdef uint8_t *d
    for j in range(n):
        take = paylen - off if paylen - off < chunk else chunk
        out[j].off = headroom
        out[j].drop = 0
        out[j].flags = 0
        d = out[j].data + headroom
        memcpy(d, f, h.l3off + 20)
        memcpy(d + h.l3off + 20, ip + 20 + off, take)
        sn_st16(d + h.l3off + 2, <uint16_t>(20 + take))
        sn_st16(d + h.l3off + 6, <uint16_t>(((0x20 if (j + 1 < n or mf0) else 0) << 8)
                                            | (fo0 + off // 8)))
        d[h.l3off + 10] = 0
        d[h.l3off + 11] = 0
        sn_st16(d + h.l3off + 10, sn_csum_finish(sn_csum_partial(d + h.l3off, 20, 0)))
        out[j].len = h.l3off + 20 + take
        off += take
    return n


cdef class _Lane:
    """What one TX worker owns: its lock, scratch batches, underlay send queue, capture
    mirror and counters. Lanes share nothing mutable but the SAs' sequence counters
    (reserved atomically in softnic._esp), so lanes run at once; a VF's queue pairs are
    spread over them, (vf + qp) % lanes. Counters are summed when read."""
    cdef PyThread_type_lock lock
    cdef int index
    cdef Batch tin
    cdef Batch tout
    cdef Batch tlocal
    cdef Batch mirror
    cdef uint64_t *mirror_ts
    cdef TxQueue txq
    cdef fp_counters *vc              # per VF
    cdef fp_uplink_counters ul
    cdef uint8_t *vbufs[FP_VH_PENDING]
    cdef uint32_t vcaps[FP_VH_PENDING]
    cdef uint32_t vgot[FP_VH_PENDING]
    # Packets and bytes protected in this burst, per SA, added to the SAs at its end: two
    # atomic adds per SA and burst instead of per packet (the SA's cache line is shared
    # by every lane that uses it). Empty between bursts, so an SA is never freed with
    # counts pending here.
    cdef sn_sa *acct_sa[FP_ACCT]
    cdef uint64_t acct_pkts[FP_ACCT]
    cdef uint64_t acct_bytes[FP_ACCT]
    cdef int n_acct

    cdef inline void account(self, sn_sa *sa, uint32_t nbytes) noexcept nogil:
        cdef int i
        for i in range(self.n_acct):
            if self.acct_sa[i] == sa:
                self.acct_pkts[i] += 1
                self.acct_bytes[i] += nbytes
                return
        if self.n_acct == FP_ACCT:
            self.settle()
        self.acct_sa[self.n_acct] = sa
        self.acct_pkts[self.n_acct] = 1
        self.acct_bytes[self.n_acct] = nbytes
        self.n_acct += 1

    cdef void settle(self) noexcept nogil:
        cdef int i
        for i in range(self.n_acct):
            sn_esp_account_out(self.acct_sa[i], self.acct_pkts[i], self.acct_bytes[i])
        self.n_acct = 0

    def __cinit__(self, int index, int burst, uint32_t out_slot, uint32_t snaplen):
        self.index = index
        self.lock = PyThread_allocate_lock()
        self.vc = <fp_counters *>PyMem_Calloc(FP_MAX_VF, sizeof(fp_counters))
        self.mirror_ts = <uint64_t *>PyMem_Calloc(FP_MIRROR, sizeof(uint64_t))
        if self.lock == NULL or self.vc == NULL or self.mirror_ts == NULL:
            raise MemoryError()
        # A TSO frame needs a 64 KB slot; outputs are underlay-MTU sized; frames for VFs
        # here get 64 KB slots, so a GSO frame can pass between them whole.
        self.tin = Batch(burst, slot_size=65536 + 1024, headroom=64)
        self.tout = Batch(FP_MAX_SEGS + burst, slot_size=out_slot)
        # Headroom for a local copy that the sender's SA protects (ESP tunnel header
        # over IPv6 with UDP encapsulation and a CBC IV: 72 bytes) and its vnet header.
        self.tlocal = Batch(2 * burst, slot_size=65536 + 1024, headroom=128)
        self.mirror = Batch(FP_MIRROR, slot_size=snaplen + 64, headroom=32)

    def __dealloc__(self):
        PyMem_Free(self.vc)
        PyMem_Free(self.mirror_ts)
        if self.lock != NULL:
            PyThread_free_lock(self.lock)


cdef class Datapath:
    """The packet pipeline and its tables. Configuration methods take the GIL and every
    lock; `tx_*`/`rx_*` bursts release the GIL and take their lane's lock, or the RX lock
    (which also guards delivery into the VFs: a guest ring has one producer)."""

    cdef fp_vf *vfs
    cdef fp_vtep *vteps
    cdef SATable sa_table             # (scope, SPI, dir) -> fp_sa_ref*; scope = VF index
    cdef Fdb fdb                      # (VNI, MAC) -> VTEP index, and per-VNI flood lists
    cdef PeerTable peers              # (VNI, VTEP address): who may send VXLAN for the VNI
    cdef PolicyTable spd              # per-VF ordered policies -> fp_sa_ref*
    cdef int active[FP_MAX_VF]        # indices of used VFs, so loops skip the unused
    cdef int n_vteps                  # VTEPs in use are vteps[0:n_vteps] (never freed)
    cdef int n_active
    cdef uint32_t ul_room             # largest outer IP packet before device ESP
    cdef fp_uplink_counters ul
    cdef readonly uint32_t underlay_mtu
    cdef uint8_t ul_mode
    cdef uint8_t local[16]
    cdef uint8_t local_family
    cdef uint8_t learning
    cdef uint8_t ul_single            # sa_select = single: always the first uplink SA
    cdef uint8_t ul_mirror            # a capture on the uplink is on
    cdef uint32_t snaplen
    # Capture: each thread copies into its own mirror (one producer each: the RX one
    # here, the lanes' in the lanes); the control plane drains them under that thread's
    # lock. Off, capture costs one flag test.
    cdef Batch rx_mirror
    cdef uint64_t *rx_mirror_ts
    cdef public uint64_t mirror_dropped
    cdef int vf_mirrors               # VFs with a capture on
    cdef PyThread_type_lock rx_lock
    cdef tuple lanes                  # _Lane per TX worker
    cdef readonly int n_lanes
    cdef PyThread_type_lock lane_locks[FP_MAX_LANES]
    cdef dict sa_refs          # (scope, spi, dir) -> (SecurityAssociation, fp_sa_ref address)
    cdef fp_sa_ref *no_sa      # what a protect policy whose SA is missing points at
    cdef dict vtep_index       # packed address -> index
    cdef dict floods           # vni -> [vtep index]: the flood lists, as installed in fdb
    cdef dict static_fdb       # (vni, mac bytes) -> vtep index: the static unicast entries
    cdef set accepts           # (vni, vtep index): admitted as senders only
    cdef dict admitted         # (vni, vtep index) -> how many entries above admit it
    cdef Underlay underlay
    cdef Batch rx_in
    cdef Batch rx_extra           # copies of a broadcast for the VNI's further VFs
    cdef Batch gro_batch
    cdef sn_pkt *gro
    cdef Batch vgro               # coalesced frames waiting for one push into a guest ring
    cdef dict vhost_refs          # (VF, queue pair) -> (rx, tx Virtq): keeps rings alive
    cdef const uint8_t *vframes[FP_VH_PENDING]
    cdef uint32_t vlens[FP_VH_PENDING]

    def __cinit__(self):
        self.vfs = NULL
        self.vteps = NULL
        self.n_lanes = 0
        self.rx_lock = PyThread_allocate_lock()
        self.no_sa = <fp_sa_ref *>PyMem_Calloc(1, sizeof(fp_sa_ref))
        if self.rx_lock == NULL or self.no_sa == NULL:
            raise MemoryError()

    def __init__(self, local, uint32_t underlay_mtu=1500, str ipsec="off",
                 bint learning=False, uint32_t fdb_size=4096, int burst=64,
                 str sa_select="flow-hash", int tx_lanes=1):
        la = ipaddress.ip_address(local)
        if tx_lanes < 1 or tx_lanes > FP_MAX_LANES:
            raise ValueError(f"tx_lanes: must be 1..{FP_MAX_LANES}")
        if burst < 1 or burst > FP_VH_PENDING:
            raise ValueError(f"burst: must be 1..{FP_VH_PENDING}")
        if underlay_mtu < 1280 or underlay_mtu > 9216:
            raise ValueError("underlay_mtu: must be 1280..9216")
        if ipsec not in ("off", "esp", "espinudp"):
            raise ValueError("ipsec: must be off, esp or espinudp")
        if sa_select not in ("flow-hash", "single"):
            raise ValueError("sa_select: must be flow-hash or single")
        self.ul_single = sa_select == "single"
        self.vfs = <fp_vf *>PyMem_Calloc(FP_MAX_VF, sizeof(fp_vf))
        self.vteps = <fp_vtep *>PyMem_Calloc(FP_MAX_VTEP, sizeof(fp_vtep))
        if not self.vfs or not self.vteps:
            raise MemoryError()
        self.sa_table = SATable(FP_MAX_SA)
        self.fdb = Fdb(fdb_size, FP_MAX_VF)
        self.peers = PeerTable(fdb_size)
        self.spd = PolicyTable(FP_MAX_VF, FP_MAX_POLICY)
        self.floods = {}
        self.static_fdb = {}
        self.accepts = set()
        self.admitted = {}
        self.underlay_mtu = underlay_mtu
        self.ul_mode = {"off": FP_UL_OFF, "esp": FP_UL_ESP, "espinudp": FP_UL_ESPINUDP}[ipsec]
        memcpy(self.local, <const char *>la.packed, len(la.packed))
        self.local_family = la.version
        self.learning = learning
        self.sa_refs = {}
        self.vtep_index = {}
        self.ul_room = underlay_mtu
        cdef int i
        for i in range(FP_MAX_VF):
            self.vfs[i].tap_fd = -1
        self.snaplen = 2048
        self.lanes = tuple(_Lane(i, burst, underlay_mtu + 256 + 320, self.snaplen)
                           for i in range(tx_lanes))
        for i in range(tx_lanes):
            self.lane_locks[i] = (<_Lane>self.lanes[i]).lock
        self.n_lanes = tx_lanes
        # The RX thread's scratch. Underlay packets arrive one datagram per slot (GRO
        # trains are split by _io).
        self.rx_in = Batch(burst, slot_size=max(underlay_mtu, 2048) + 576)
        # Copies of one broadcast for every further VF of its VNI (then delivered, so a
        # VF's frames keep their order).
        self.rx_extra = Batch(FP_MAX_VF, slot_size=max(underlay_mtu, 2048) + 576,
                              headroom=64)
        self.gro_batch = Batch(1, slot_size=65536 + 1024, headroom=64)
        self.gro = self.gro_batch.pkts
        self.vgro = Batch(FP_VH_GRO, slot_size=65536 + 1024, headroom=64)
        self.rx_mirror = Batch(FP_MIRROR, slot_size=self.snaplen + 64, headroom=32)
        self.rx_mirror_ts = <uint64_t *>PyMem_Calloc(FP_MIRROR, sizeof(uint64_t))
        if not self.rx_mirror_ts:
            raise MemoryError()
        self.vhost_refs = {}

    def __dealloc__(self):
        PyMem_Free(self.vfs)
        PyMem_Free(self.vteps)
        if self.sa_refs:
            for _sa, ref in self.sa_refs.values():
                PyMem_Free(<void *><size_t>ref)
        PyMem_Free(self.rx_mirror_ts)
        PyMem_Free(self.no_sa)
        if self.rx_lock != NULL:
            PyThread_free_lock(self.rx_lock)

    # ---- configuration (GIL held, every lock) -----------------------------------------

    cdef void _lock(self):
        cdef int i
        with nogil:
            for i in range(self.n_lanes):       # always in this order: no deadlock
                PyThread_acquire_lock(self.lane_locks[i], WAIT_LOCK)
            PyThread_acquire_lock(self.rx_lock, WAIT_LOCK)

    cdef void _unlock(self):
        cdef int i
        PyThread_release_lock(self.rx_lock)
        for i in range(self.n_lanes - 1, -1, -1):
            PyThread_release_lock(self.lane_locks[i])

    cdef bint _try_lock_lanes(self) noexcept nogil:
        """All lane locks without waiting, or none."""
        cdef int i, j
        for i in range(self.n_lanes):
            if not PyThread_acquire_lock(self.lane_locks[i], NOWAIT_LOCK):
                for j in range(i - 1, -1, -1):
                    PyThread_release_lock(self.lane_locks[j])
                return False
        return True

    cdef void _unlock_lanes(self) noexcept nogil:
        cdef int i
        for i in range(self.n_lanes - 1, -1, -1):
            PyThread_release_lock(self.lane_locks[i])

    cdef inline _Lane _lane(self, int vf, int qp):
        return <_Lane>self.lanes[(vf + qp) % self.n_lanes]

    def lane_of(self, int vf, int qp=0):
        """The TX lane (worker) that serves queue pair `qp` of VF `vf`."""
        return (vf + qp) % self.n_lanes

    def attach_underlay(self, Underlay underlay):
        """Use this Underlay's sockets for the poll_* loops."""
        self._lock()
        try:
            self.underlay = underlay
            for lane in self.lanes:
                (<_Lane>lane).txq = underlay.tx_queue()
        finally:
            self._unlock()

    def set_vf(self, int index, mac, uint32_t vni, uint32_t mtu=1500, str ipsec="off",
               int tap_fd=-1):
        if index < 0 or index >= FP_MAX_VF:
            raise ValueError(f"vf index: must be 0..{FP_MAX_VF - 1}")
        if vni > 0xFFFFFF:
            raise ValueError("vni: must fit 24 bits")
        if mtu < 68 or mtu > 65535:
            raise ValueError("mtu: must be 68..65535")
        modes = {"off": FP_MODE_OFF, "offload": FP_MODE_OFFLOAD, "enforce": FP_MODE_ENFORCE}
        if ipsec not in modes:
            raise ValueError("ipsec: must be off, offload or enforce")
        macb = _mac(mac)
        self._lock()
        try:
            v = &self.vfs[index]
            if not v.used:
                memset(v, 0, sizeof(fp_vf))
                self._zero_lane_counters(index)
            v.used = 1
            memcpy(v.mac, <const char *>macb, 6)
            v.vni = vni
            v.mtu = mtu
            v.mode = modes[ipsec]
            v.tap_fd = tap_fd
            self._refresh()
        finally:
            self._unlock()

    def del_vf(self, int index):
        if index < 0 or index >= FP_MAX_VF:
            raise ValueError("vf index out of range")
        self._lock()
        try:
            if self.vfs[index].mirror:
                self.vf_mirrors -= 1
            memset(&self.vfs[index], 0, sizeof(fp_vf))
            self._zero_lane_counters(index)
            self.vfs[index].tap_fd = -1
            for key in [k for k in self.vhost_refs if k[0] == index]:
                del self.vhost_refs[key]
            self.spd.t.n[index] = 0
            self._drop_scope_sas(index)
            self._refresh()
        finally:
            self._unlock()

    cdef void _zero_lane_counters(self, int vf):
        for lane in self.lanes:
            memset(&(<_Lane>lane).vc[vf], 0, sizeof(fp_counters))

    cdef int _vtep(self, remote) except -1:
        ra = ipaddress.ip_address(remote)
        key = ra.packed
        if key in self.vtep_index:
            return self.vtep_index[key]
        cdef int i
        for i in range(FP_MAX_VTEP):
            if not self.vteps[i].used:
                break
        else:
            raise ValueError("too many remote VTEPs")
        if ra.version != self.local_family:
            raise ValueError("remote VTEP family differs from the local address")
        sn_vxlan_tx_init(&self.vteps[i].tx, ipaddress.ip_address(bytes(self.local[:4] if
                         self.local_family == 4 else self.local[:16])), ra, 0)
        self.vteps[i].used = 1
        self.vteps[i].family = ra.version
        if i >= self.n_vteps:
            self.n_vteps = i + 1
        memcpy(self.vteps[i].addr, <const char *>key, len(key))
        self.vtep_index[key] = i
        return i

    # Admission (who may send VXLAN for a VNI): a remote VTEP is admitted for a VNI while a
    # static FDB entry, a flood-list membership or an "accept" entry of that VNI names it.
    # Learned entries never admit (a peer would otherwise admit itself): learning only
    # sees packets that already passed admission, and learned entries towards a VTEP that
    # loses its admission go with it.

    cdef void _admit(self, uint32_t vni, int vt) except *:
        key = (vni, vt)
        n = self.admitted.get(key, 0)
        if n == 0:
            self.peers.add(vni, ipaddress.ip_address(self._vtep_addr(vt)), vt)
        self.admitted[key] = n + 1

    cdef void _revoke(self, uint32_t vni, int vt) except *:
        key = (vni, vt)
        n = self.admitted.get(key, 0)
        if n > 1:
            self.admitted[key] = n - 1
            return
        if n == 1:
            del self.admitted[key]
            self.peers.remove(vni, ipaddress.ip_address(self._vtep_addr(vt)))
            for evni, emac, evt, learned, _seen in self.fdb.entries():
                if learned and evni == vni and evt == vt:
                    self.fdb.remove(evni, emac)

    cdef bytes _vtep_addr(self, int vt):
        return bytes(self.vteps[vt].addr[:4 if self.vteps[vt].family == 4 else 16])

    def fdb_add(self, uint32_t vni, mac, remote):
        """(VNI, MAC) -> remote VTEP; mac None adds the VTEP to the VNI's flood list.
        Either admits the VTEP as a sender for the VNI."""
        self._lock()
        try:
            vt = self._vtep(remote)
            if mac is None:
                lst = self.floods.get(vni, [])
                if vt not in lst:
                    self._admit(vni, vt)
                    try:
                        self.fdb.set_flood(vni, lst + [vt])
                    except BaseException:
                        self._revoke(vni, vt)
                        raise
                    self.floods[vni] = lst + [vt]
            else:
                macb = _mac(mac)
                self._admit(vni, vt)        # first: may fail (table full), nothing changed
                old = self.static_fdb.pop((vni, macb), None)
                if self.fdb.lookup(vni, macb) is not None:
                    self.fdb.remove(vni, macb)   # replaces the entry, static or learned
                try:
                    self.fdb.add(vni, macb, vt)
                except BaseException:
                    self._revoke(vni, vt)
                    if old is not None:
                        self._revoke(vni, old)
                    raise
                self.static_fdb[(vni, macb)] = vt
                if old is not None:
                    self._revoke(vni, old)  # after the admit: the same VTEP stays admitted
        finally:
            self._unlock()

    def fdb_del(self, uint32_t vni, mac, remote=None):
        self._lock()
        try:
            if mac is None:
                vt = self.vtep_index.get(ipaddress.ip_address(remote).packed)
                if vt is not None and vt in self.floods.get(vni, []):
                    lst = [x for x in self.floods[vni] if x != vt]
                    self.fdb.set_flood(vni, lst)
                    self.floods[vni] = lst
                    self._revoke(vni, vt)
            else:
                macb = _mac(mac)
                self.fdb.remove(vni, macb)
                vt = self.static_fdb.pop((vni, macb), None)
                if vt is not None:
                    self._revoke(vni, vt)
        finally:
            self._unlock()

    def peer_add(self, uint32_t vni, remote):
        """Admit a remote VTEP as a sender of VXLAN for the VNI, without sending to it."""
        self._lock()
        try:
            vt = self._vtep(remote)
            if (vni, vt) not in self.accepts:
                self._admit(vni, vt)
                self.accepts.add((vni, vt))
        finally:
            self._unlock()

    def peer_del(self, uint32_t vni, remote):
        self._lock()
        try:
            vt = self.vtep_index.get(ipaddress.ip_address(remote).packed)
            if vt is not None and (vni, vt) in self.accepts:
                self.accepts.discard((vni, vt))
                self._revoke(vni, vt)
        finally:
            self._unlock()

    def peers_admitted(self):
        """[(vni, remote address)] of the VTEPs admitted as senders, for listings/tests."""
        return sorted((vni, str(addr)) for vni, addr, _vt in self.peers.entries())

    def fdb_age(self, uint64_t max_age_ns):
        """Forget learned FDB entries not seen for max_age_ns; returns how many."""
        cdef timespec t
        clock_gettime(CLOCK_MONOTONIC, &t)
        self._lock()
        try:
            return self.fdb.age(<uint64_t>t.tv_sec * 1000000000 + t.tv_nsec, max_age_ns)
        finally:
            self._unlock()

    def fdb_entries(self):
        """[(vni, mac, remote address, learned)] for listings."""
        addrs = {i: ipaddress.ip_address(k) for k, i in self.vtep_index.items()}
        return [(vni, mac.hex(":"), str(addrs.get(vt)), learned)
                for vni, mac, vt, learned, _seen in self.fdb.entries()]

    cdef void _refresh(self):
        """Recompute what the data path would otherwise find per packet: the list of
        active VFs and the room device-terminated ESP leaves in the underlay MTU (the
        tightest of the uplink SAs, exact overhead per sn_esp_max_ip_len)."""
        cdef int i, j
        cdef uint32_t m
        self.n_active = 0
        for i in range(FP_MAX_VF):
            if self.vfs[i].used:
                self.active[self.n_active] = i
                self.n_active += 1
        self.ul_room = self.underlay_mtu
        if self.ul_mode != FP_UL_OFF:
            for i in range(self.n_vteps):
                if not self.vteps[i].used:
                    continue
                for j in range(self.vteps[i].n_sas):
                    m = sn_esp_max_ip_len(self.vteps[i].sas[j], self.underlay_mtu,
                                          20 if self.local_family == 4 else 40)
                    if m < self.ul_room:
                        self.ul_room = m

    # SAs: one table keyed by (scope, SPI, direction), the scope being the VF index (or
    # the uplink), so a VF can never find another VF's SA even when their SPIs are equal.

    cdef inline fp_sa_ref *_sa_find(self, int vf, uint32_t spi,
                                    uint8_t direction) noexcept nogil:
        return <fp_sa_ref *>sn_sa_lookup(&self.sa_table.t,
                                         SN_VF_UPLINK if vf == FP_UPLINK else <uint32_t>vf,
                                         spi, direction)

    def sa_add(self, int scope, str direction, SecurityAssociation sa not None,
               uint32_t reqid=0):
        """Install an SA for a VF index (or -1 for the uplink). Outbound uplink SAs are
        attached to the VTEP of their destination; inbound SAs are found by SPI."""
        cdef fp_sa_ref *ref
        cdef int vt = -1
        if direction not in ("in", "out"):
            raise ValueError("dir: must be in or out")
        if scope >= FP_MAX_VF or (scope >= 0 and not self.vfs[scope].used):
            raise ValueError("scope: no such VF")
        cdef uint32_t table_vf = SN_VF_UPLINK if scope < 0 else scope
        cdef uint8_t d = SN_DIR_IN if direction == "in" else SN_DIR_OUT
        key = (-1 if scope < 0 else scope, int(sa.spi), direction)
        self._lock()
        try:
            if key in self.sa_refs:
                raise ValueError("spi: an SA with this SPI and direction exists")
            if scope < 0 and d == SN_DIR_OUT:
                vt = self._vtep(sa.dst)
                if self.vteps[vt].n_sas >= FP_MAX_UL_SAS:
                    raise ValueError("too many SAs towards this VTEP")
            ref = <fp_sa_ref *>PyMem_Calloc(1, sizeof(fp_sa_ref))
            if ref == NULL:
                raise MemoryError()
            ref.sa = sa.sa
            ref.reqid = reqid
            if sn_sa_add(&self.sa_table.t, table_vf, key[1], d, ref) != 0:
                PyMem_Free(ref)
                raise ValueError("SA table full")
            self.sa_refs[key] = (sa, <size_t>ref)
            if vt >= 0:
                self.vteps[vt].sas[self.vteps[vt].n_sas] = sa.sa
                self.vteps[vt].n_sas += 1
                self._refresh()
        finally:
            self._unlock()

    def sa_del(self, int scope, str direction, uint32_t spi):
        key = (-1 if scope < 0 else scope, spi, direction)
        self._lock()
        try:
            if key not in self.sa_refs:
                raise KeyError("no such SA")
            self._sa_remove(key)
        finally:
            self._unlock()

    cdef void _drop_scope_sas(self, int scope):
        for key in [k for k in self.sa_refs if k[0] == scope]:
            self._sa_remove(key)

    cdef void _sa_remove(self, tuple key):
        """Take an SA out of every place the data path can reach it (caller holds both
        locks): the table, the policies that point at it (they then discard: nothing is
        sent in clear by accident), the VTEP lists. Then free its reference."""
        cdef int scope = key[0]
        cdef uint8_t d = SN_DIR_IN if key[2] == "in" else SN_DIR_OUT
        cdef SecurityAssociation sa
        cdef fp_sa_ref *ref
        cdef sn_policy_rule *r
        cdef uint32_t i, vf
        cdef int j, k
        sa, addr = self.sa_refs.pop(key)
        ref = <fp_sa_ref *><size_t>addr
        sn_sa_remove(&self.sa_table.t, SN_VF_UPLINK if scope < 0 else <uint32_t>scope,
                     key[1], d)
        for vf in range(self.spd.t.n_vfs):
            r = self.spd.t.rules + <size_t>vf * self.spd.t.max_rules
            for i in range(self.spd.t.n[vf]):
                if r[i].sa == <void *>ref:
                    r[i].sa = NULL
                    r[i].action = SN_POLICY_DISCARD
        for j in range(FP_MAX_VTEP):
            k = 0
            for i in range(<uint32_t>self.vteps[j].n_sas):
                if self.vteps[j].sas[i] != sa.sa:
                    self.vteps[j].sas[k] = self.vteps[j].sas[i]
                    k += 1
            self.vteps[j].n_sas = k
        PyMem_Free(ref)
        self._refresh()

    def policy_set(self, int vf, list policies):
        """Replace a VF's policies (both directions) in one step: the whole list is
        validated first, then swapped in under every lock, so a burst sees the old table
        or the new one, never a mix. Each is a dict: dir (in|out), src, dst (networks),
        action (protect|bypass|discard), proto, sport, dport (None = any), priority
        (lower first), spi (protect: the SA of this VF and direction; None: the SA is not
        there, and what the policy matches is dropped, no_sa). An inbound protect policy
        accepts any SA with the same reqid as its own SA (make-before-break rekeys), or
        that SA alone when its reqid is 0."""
        if vf < 0 or vf >= FP_MAX_VF or not self.vfs[vf].used:
            raise ValueError("scope: no such VF")
        if len(policies) > FP_MAX_POLICY:
            raise ValueError(f"policies: at most {FP_MAX_POLICY} per VF")
        staged = PolicyTable(1, FP_MAX_POLICY)      # validate everything before touching
        for d in policies:
            direction = d.get("dir", "out")
            handle = 0
            if d["action"] == "protect":
                # No SA (yet): the rule points at a reference without one, so outbound
                # it drops (no_sa) and inbound nothing can match it.
                handle = <size_t>self.no_sa
                if d.get("spi") is not None:
                    entry = self.sa_refs.get((vf, int(d["spi"]), direction))
                    if entry is None:
                        raise ValueError("spi: no SA with this SPI for this VF and direction")
                    handle = entry[1]
            staged.add(0, src=d["src"], dst=d["dst"], proto=d.get("proto"),
                       sport=d.get("sport"), dport=d.get("dport"), action=d["action"],
                       dir=direction, priority=int(d.get("priority", 0)), sa=handle)
        self._lock()
        try:
            memcpy(self.spd.t.rules + <size_t>vf * self.spd.t.max_rules, staged.t.rules,
                   staged.t.n[0] * sizeof(sn_policy_rule))
            self.spd.t.n[vf] = staged.t.n[0]
        finally:
            self._unlock()

    # ---- counters (read without the locks: plain 64-bit loads) ------------------------

    def vf_counters(self, int vf):
        cdef fp_counters sum_
        cdef fp_counters *c = &sum_
        cdef fp_counters *lc
        cdef size_t k
        if vf < 0 or vf >= FP_MAX_VF or not self.vfs[vf].used:
            raise ValueError("no such VF")
        sum_ = self.vfs[vf].c
        for lane in self.lanes:             # every field is a uint64_t: add them as such
            lc = &(<_Lane>lane).vc[vf]
            for k in range(sizeof(fp_counters) // 8):
                (<uint64_t *>c)[k] += (<uint64_t *>lc)[k]
        out = {
            "tx_frames": c.tx_frames, "tx_bytes": c.tx_bytes, "tx_tso_frames": c.tx_tso_frames,
            "tx_segments": c.tx_segments, "tx_esp": c.tx_esp, "tx_packets": c.tx_packets,
            "tx_local": c.tx_local, "tx_icmp_too_big": c.tx_icmp_too_big,
            "tx_mss_clamped": c.tx_mss_clamped, "tx_fragmented": c.tx_fragmented,
            "rx_frames": c.rx_frames,
            "rx_bytes": c.rx_bytes, "rx_esp": c.rx_esp,
            "rx_esp_passthrough": c.rx_esp_passthrough, "rx_coalesced": c.rx_coalesced,
        }
        out["drops"] = {DROP_REASONS[i]: c.drops[i] for i in range(1, SN_DROP_MAX)
                        if c.drops[i]}
        t = &self.vfs[vf].tap
        out["tap"] = {"rx_pkts": t.rx_pkts, "rx_syscalls": t.rx_syscalls,
                      "tx_pkts": t.tx_pkts, "tx_syscalls": t.tx_syscalls,
                      "tx_ring_full": t.tx_ring_full, "rx_truncated": t.rx_truncated}
        return out

    def uplink_counters(self):
        cdef fp_uplink_counters u = self.ul
        cdef fp_uplink_counters *lu
        cdef size_t k
        for lane in self.lanes:
            lu = &(<_Lane>lane).ul
            for k in range(sizeof(fp_uplink_counters) // 8):
                (<uint64_t *>&u)[k] += (<uint64_t *>lu)[k]
        out = {"rx_packets": u.rx_packets, "rx_esp": u.rx_esp, "tx_esp": u.tx_esp}
        out["drops"] = {DROP_REASONS[i]: u.drops[i] for i in range(1, SN_DROP_MAX)
                        if u.drops[i]}
        return out

    def mss_for(self, int vf, int ipver=4, int spi=-1):
        """The TCP MSS a frame of this VF gets towards the underlay (for tests/docs)."""
        cdef sn_sa *sa = NULL
        cdef fp_sa_ref *ref
        if spi >= 0:
            ref = self._sa_find(vf, spi, SN_DIR_OUT)
            sa = ref.sa if ref != NULL else NULL
        hdr = 20 if ipver == 4 else 40
        return self._l3_budget(&self.vfs[vf], sa, hdr, 14) - hdr - 20

    # ---- the pipeline ------------------------------------------------------------------

    cdef uint32_t _l3_budget(self, fp_vf *v, sn_sa *sa, uint32_t iphdr,
                             uint32_t l2len) noexcept nogil:
        """Largest inner IP packet that leaves as one underlay packet <= underlay MTU,
        with the exact VXLAN and ESP overheads (padding included)."""
        cdef uint32_t room = self.ul_room    # after device-terminated ESP, if any
        cdef uint32_t outer = (20 if self.local_family == 4 else 40) + 8 + 8
        if room <= outer + l2len:
            return 0
        room -= outer + l2len
        if sa != NULL:
            room = sn_esp_max_ip_len(sa, room, iphdr)
        if room > v.mtu:
            room = v.mtu
        return room

    cdef inline sn_sa *_ul_sa(self, const fp_vtep *e, uint32_t hash, int lane) noexcept nogil:
        """The uplink SA towards VTEP e for a packet of this flow hash in this lane. With
        at least as many SAs as lanes, each lane owns its own (SA i belongs to lane
        i % lanes) and picks among them by flow hash: no two workers then share a
        sequence counter, so none sends an SA's numbers out of order (a peer's
        anti-replay window would drop what came too late) and none contends for it.
        With fewer SAs than lanes they are shared, picked by flow hash alone."""
        cdef uint32_t n = e.n_sas, lanes = self.n_lanes, owned
        if self.ul_single:
            return e.sas[0]
        if lanes == 1 or n < lanes:
            return e.sas[hash % n]
        owned = (n - lane + lanes - 1) // lanes
        return e.sas[lane + lanes * (hash % owned)]

    cdef int _finish_tx(self, fp_counters *c, _Lane L, sn_pkt *p, sn_sa *sa,
                        uint32_t l2len, const sn_vxlan_tx *tx, uint64_t *hash,
                        uint32_t vt) noexcept nogil:
        """ESP (host-terminated), VXLAN, ESP (device-terminated) for one packet. The
        segments of one frame share a flow hash: *hash is computed on the first (after
        its ESP, so an encrypted flow hashes by SPI) and reused."""
        cdef int r
        cdef fp_vtep *e = &self.vteps[vt]
        cdef sn_sa *ul
        cdef uint32_t owed
        if sa != NULL:
            r = sn_esp_encap_deferred(sa, p, l2len, &owed)
            if r != SN_OK:
                return r
            if owed:
                L.account(sa, owed)
            c.tx_esp += 1
        if hash[0] == 0:                # bit 32 marks "computed": any 32-bit value is valid
            hash[0] = sn_flow_hash(p.data + p.off, p.len) | (<uint64_t>1 << 32)
        p.hash = <uint32_t>hash[0]
        r = sn_vxlan_encap(p, tx)
        if r != SN_OK:
            return r
        if self.ul_mode != FP_UL_OFF:
            if e.n_sas == 0:
                return SN_DROP_NO_SA
            ul = self._ul_sa(e, p.hash, L.index)
            r = sn_esp_encap_deferred(ul, p, 0, &owed)
            if r != SN_OK:
                L.ul.drops[r] += 1
                return r
            if owed:
                L.account(ul, owed)
            L.ul.tx_esp += 1
        p.port = vt
        return SN_OK

    cdef int _tx_frame(self, _Lane L, int vfi, sn_pkt *inp, Batch out,
                       Batch loc) noexcept nogil:
        """Process one VF frame into `out` (underlay) and `loc` (frames for VFs here).
        Returns SN_OK or a drop reason for the whole frame; -1 when `out` or `loc`
        lacks room (nothing was consumed: flush and call again)."""
        cdef fp_vf *v = &self.vfs[vfi]
        cdef fp_counters *c = &L.vc[vfi]
        cdef sn_vnet_hdr *vh
        cdef uint8_t *f
        cdef uint32_t flen, budget, mss, need, nseg, k, dst_count, d, j, produced
        cdef sn_hdrs h
        cdef fp_sel sel
        cdef fp_sa_ref *ref = NULL
        cdef sn_sa *sa = NULL
        cdef int r, i, act, local_vf = -1
        cdef const uint32_t *flood
        cdef uint32_t n_flood, vt
        cdef sn_vxlan_tx tx
        cdef uint64_t fhash
        cdef uint32_t fchunk
        cdef uint32_t dests[FP_MAX_FLOOD + 1]
        cdef sn_pkt *p
        cdef bint bum
        cdef fp_vtep *fe
        cdef sn_sa *fsa
        cdef uint32_t owed

        if inp.len < SN_VNET_HDR_LEN + 14:
            return SN_DROP_MALFORMED_L2
        vh = <sn_vnet_hdr *>(inp.data + inp.off)
        f = inp.data + inp.off + SN_VNET_HDR_LEN
        flen = inp.len - SN_VNET_HDR_LEN
        r = sn_parse_frame(f, flen, &h)
        if r != SN_OK:
            return r

        # Where to: a VF on this host, one remote VTEP, or (broadcast, multicast,
        # unknown unicast) the VNI's VFs here and its flood list (head-end replication).
        dst_count = 0
        bum = (f[0] & 1) != 0
        if not bum:
            for k in range(self.n_active):
                i = self.active[k]
                if i != vfi and self.vfs[i].vni == v.vni and \
                        memcmp(self.vfs[i].mac, f, 6) == 0:
                    local_vf = i
                    break
            if local_vf < 0:
                vt = sn_fdb_lookup(&self.fdb.f, v.vni, f)
                if vt != SN_FDB_NONE:
                    dests[0] = vt
                    dst_count = 1
                else:
                    bum = True
        if bum:
            n_flood = sn_fdb_flood(&self.fdb.f, v.vni, &flood)
            for d in range(n_flood):
                if dst_count < FP_MAX_FLOOD:
                    dests[dst_count] = flood[d]
                    dst_count += 1
        if dst_count == 0 and local_vf < 0 and not bum:
            return SN_DROP_NO_FDB

        # Policy: only IP is subject to it; ARP and neighbour discovery always pass.
        if v.mode != FP_MODE_OFF and _selector(f, &h, &sel) and \
                not _is_neighbour_discovery(f, &h, flen):
            act = _spd(self.spd, vfi, SN_DIR_OUT, &sel, &ref)
            if act == SN_POLICY_NONE:
                if v.mode == FP_MODE_ENFORCE:
                    return SN_DROP_POLICY
            elif act == SN_POLICY_DISCARD:
                return SN_DROP_POLICY
            elif act == SN_POLICY_PROTECT:
                if ref == NULL or ref.sa == NULL:
                    return SN_DROP_NO_SA
                sa = ref.sa

        if dst_count == 0:
            # Only VFs on this host: no tunnel, so the VF's own MTU is the limit (as far
            # as a local slot holds it).
            budget = v.mtu
            if budget > out.slot_size - out.headroom - h.l2len:
                budget = out.slot_size - out.headroom - h.l2len
            if vh.gso_type != VIRTIO_NET_HDR_GSO_NONE and local_vf >= 0 and sa == NULL and \
                    (self.vfs[local_vf].n_rxq == 0 or self.vfs[local_vf].guest_tso) and \
                    inp.len <= <uint32_t>(loc.slot_size - loc.headroom):
                # A GSO frame between two VFs that both speak GSO crosses whole, as on a
                # software switch: no segmenting here and coalescing again there.
                if loc.count >= loc.size:
                    return -1
                p = &loc.pkts[loc.count]
                p.off = loc.headroom
                p.len = inp.len
                p.port = local_vf
                p.drop = 0
                p.flags = SN_PKT_LOCAL
                memcpy(p.data + p.off, inp.data + inp.off, inp.len)
                loc.count += 1
                c.tx_local += 1
                return SN_OK
        else:
            budget = self._l3_budget(v, sa, h.l4off - h.l3off, h.l2len)
        nseg = 1
        fchunk = 0
        mss = 0
        if vh.gso_type == VIRTIO_NET_HDR_GSO_NONE and h.ipver == 4 and \
                h.l3len_total > budget and not (f[h.l3off + 6] & 0x40) and \
                h.l4off - h.l3off == 20 and budget >= 28:
            # Too big for the tunnel, and the sender allows fragmentation (DF clear): a
            # tunnel ingress fragments the inner packet (RFC 4459 3.1, as Linux's ip_tunnel
            # does) so that nothing is fragmented in the underlay.
            fchunk = (budget - 20) & ~7u
            nseg = (h.l3len_total - 20 + fchunk - 1) // fchunk
        if vh.gso_type != VIRTIO_NET_HDR_GSO_NONE:
            if h.l3len_total == 0 or budget <= (h.l4off - h.l3off) + h.l4hdrlen:
                return SN_DROP_TOO_BIG
            mss = budget - (h.l4off - h.l3off) - h.l4hdrlen
            if vh.gso_size < mss and vh.gso_size != 0:
                nseg = (flen - h.l4off - h.l4hdrlen + vh.gso_size - 1) // vh.gso_size + 1
            else:
                nseg = (flen - h.l4off - h.l4hdrlen + mss - 1) // mss + 1
        need = nseg * (dst_count if dst_count else 1)
        if <uint32_t>(out.size - out.count) < need or \
                (local_vf >= 0 or bum) and <uint32_t>(loc.size - loc.count) < nseg:
            if out.count == 0 and loc.count == 0:
                return SN_DROP_NO_ROOM   # would never fit
            return -1

        # TSO or checksum completion, into the first destination's slots.
        k = out.count
        if vh.gso_type != VIRTIO_NET_HDR_GSO_NONE:
            fe = &self.vteps[dests[0] if dst_count else 0]
            if dst_count == 1 and local_vf < 0 and not bum and (
                    (sa != NULL and self.ul_mode == FP_UL_OFF)
                    or (sa == NULL and self.ul_mode != FP_UL_OFF and fe.n_sas != 0)):
                # TSO, ESP and VXLAN in one pass (softnic._tsoesp) where it applies.
                tx = fe.tx
                tx.vni = v.vni
                fsa = sa
                fhash = 0
                if sa == NULL:      # device-terminated: the uplink SA by the inner flow hash
                    fhash = sn_flow_hash(f, flen)
                    fsa = self._ul_sa(fe, <uint32_t>fhash, L.index)
                r = sn_tso_esp_vxlan(f, flen, vh, &h, mss, fsa, sa == NULL, <uint32_t>fhash,
                                     &tx, dests[0], &out.pkts[k], out.size - k,
                                     out.headroom, &produced, c.drops,
                                     L.ul.drops if sa == NULL else NULL)
                if r != SN_TSOESP_GENERIC:     # done (else: the stages below)
                    c.tx_tso_frames += 1
                    c.tx_segments += <uint32_t>r
                    if sa != NULL:
                        c.tx_esp += produced
                    else:
                        L.ul.tx_esp += produced
                    c.tx_packets += produced
                    out.count = k + produced
                    return SN_OK
            for j in range(nseg):
                out.pkts[k + j].off = out.headroom
                out.pkts[k + j].drop = 0
                out.pkts[k + j].flags = 0
            r = sn_tso_segment(f, flen, vh, mss, &out.pkts[k], out.size - k, &produced)
            if r != SN_OK:
                return r
            c.tx_tso_frames += 1
            c.tx_segments += produced
        else:
            if vh.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
                r = sn_csum_complete(f, flen, vh)
                if r != SN_OK:
                    return r
            if fchunk:
                produced = _fragment4(f, &h, fchunk, nseg, &out.pkts[k], out.headroom)
                c.tx_fragmented += 1
            elif h.ipver and h.l3len_total > budget:
                # A tunnel endpoint's answer (RFC 1191 / RFC 8201): tell the sender.
                if loc.count < loc.size:
                    p = &loc.pkts[loc.count]
                    p.off = loc.headroom + SN_VNET_HDR_LEN
                    p.drop = 0
                    if sn_icmp_too_big(f, flen, budget, p) == SN_OK:
                        p.off -= SN_VNET_HDR_LEN
                        memset(p.data + p.off, 0, SN_VNET_HDR_LEN)
                        p.len += SN_VNET_HDR_LEN
                        p.port = vfi
                        loc.count += 1
                        c.tx_icmp_too_big += 1
                return SN_DROP_TOO_BIG
            else:
                p = &out.pkts[k]
                # Room for ESP's trailer is needed only where the frame enters the tunnel.
                if flen > p.cap - out.headroom - (320 if dst_count else 0):
                    return SN_DROP_TOO_BIG
                p.off = out.headroom
                p.len = flen
                p.drop = 0
                p.flags = 0
                memcpy(p.data + p.off, f, flen)
                if h.l4proto == 6 and h.l4hdrlen and budget > (h.l4off - h.l3off) + 20:
                    if sn_tcp_mss_clamp(p.data + p.off, flen, &h,
                                        <uint16_t>(budget - (h.l4off - h.l3off) - 20)) == 1:
                        c.tx_mss_clamped += 1
                produced = 1

        # Local VFs (same VNI) get the segments, with a virtio-net header; each then meets
        # its receiver's inbound checks (_local_in). What the sender's policy protects
        # is protected with the sender's SA here too, and only the receiver's own SA
        # opens it there: the two VFs must hold the two ends of one SA, as they would on
        # two hosts, or nothing passes.
        if local_vf >= 0 or bum:
            for d in range(<uint32_t>self.n_active):
                i = self.active[d]
                if i == vfi or self.vfs[i].vni != v.vni:
                    continue
                if local_vf >= 0 and i != local_vf:
                    continue
                if bum and local_vf < 0 and not (f[0] & 1) and \
                        memcmp(self.vfs[i].mac, f, 6) != 0:
                    continue
                for j in range(produced):
                    if loc.count >= loc.size:
                        break
                    p = &loc.pkts[loc.count]
                    p.off = loc.headroom + SN_VNET_HDR_LEN
                    memcpy(p.data + p.off, out.pkts[k + j].data + out.pkts[k + j].off,
                           out.pkts[k + j].len)
                    p.len = out.pkts[k + j].len
                    p.port = i
                    p.drop = 0
                    p.flags = SN_PKT_LOCAL
                    p.hash = 0
                    if sa != NULL:
                        r = sn_esp_encap_deferred(sa, p, h.l2len, &owed)
                        if r == SN_OK and p.off < SN_VNET_HDR_LEN:
                            r = SN_DROP_NO_ROOM
                        if r != SN_OK:
                            c.drops[r] += 1
                            continue
                        if owed:
                            L.account(sa, owed)
                        c.tx_esp += 1
                    p.off -= SN_VNET_HDR_LEN
                    p.len += SN_VNET_HDR_LEN
                    memset(p.data + p.off, 0, SN_VNET_HDR_LEN)
                    loc.count += 1
                    c.tx_local += 1
        if dst_count == 0:
            return SN_OK

        # Replicate for every further destination before ESP (each copy gets its own
        # sequence number), then finish each packet.
        for d in range(1, dst_count):
            for j in range(produced):
                p = &out.pkts[k + d * produced + j]
                p.off = out.headroom
                p.len = out.pkts[k + j].len
                p.drop = 0
                p.flags = out.pkts[k + j].flags
                memcpy(p.data + p.off, out.pkts[k + j].data + out.pkts[k + j].off, p.len)
        j = 0
        for d in range(dst_count):
            tx = self.vteps[dests[d]].tx      # once per frame and destination
            tx.vni = v.vni
            fhash = 0
            for i in range(produced):
                p = &out.pkts[k + d * produced + i]
                r = self._finish_tx(c, L, p, sa, h.l2len, &tx, &fhash, dests[d])
                if r != SN_OK:
                    c.drops[r] += 1
                    continue
                if k + j != k + d * produced + i:
                    _swap(&out.pkts[k + j], p)
                j += 1
        out.count = k + j
        c.tx_packets += j
        return SN_OK

    cdef int _tx_burst(self, _Lane L, int vfi, Batch inb, int start, Batch out,
                       Batch loc) noexcept nogil:
        cdef int i, r
        cdef fp_vf *v = &self.vfs[vfi]
        cdef fp_counters *c = &L.vc[vfi]
        for i in range(start, inb.count):
            if inb.pkts[i].drop:
                continue
            if v.mirror and inb.pkts[i].len > SN_VNET_HDR_LEN:
                self._mirror(L.mirror, L.mirror_ts, vfi,
                             inb.pkts[i].data + inb.pkts[i].off + SN_VNET_HDR_LEN,
                             inb.pkts[i].len - SN_VNET_HDR_LEN, False)
            r = self._tx_frame(L, vfi, &inb.pkts[i], out, loc)
            if r == -1:
                L.settle()
                return i
            c.tx_frames += 1
            c.tx_bytes += inb.pkts[i].len
            if r != SN_OK:
                inb.pkts[i].drop = r
                c.drops[r] += 1
        L.settle()
        return inb.count

    def tx_burst(self, int vf, Batch inb not None, int start, Batch out not None,
                 Batch loc not None, int qp=0):
        """Frames (virtio-net header + Ethernet) of VF `vf` from inb[start:] into `out`
        (outer IP packets, .port = VTEP index) and `loc` (frames for local VFs, .port = VF
        index; their receivers' inbound checks done: refused ones get .drop), in the lane
        of queue pair `qp`. Returns the index of the first frame not consumed (out/loc
        were full)."""
        cdef int r
        cdef _Lane L
        if vf < 0 or vf >= FP_MAX_VF or not self.vfs[vf].used:
            raise ValueError("no such VF")
        if qp < 0 or qp >= FP_MAX_QP:
            raise ValueError("no such queue pair")
        L = self._lane(vf, qp)
        with nogil:
            PyThread_acquire_lock(L.lock, WAIT_LOCK)
            r = self._tx_burst(L, vf, inb, start, out, loc)
            PyThread_acquire_lock(self.rx_lock, WAIT_LOCK)
            self._local_in(loc)
            PyThread_release_lock(self.rx_lock)
            PyThread_release_lock(L.lock)
        return r

    cdef int _rx_packet(self, sn_pkt *p, Batch extra,
                        const sn_peer_slot **last) noexcept nogil:
        """One outer IP packet from the underlay -> a frame for a VF (virtio-net header in
        front, .port = VF index); a broadcast or multicast frame also leaves a copy in
        `extra` for every further VF of its VNI, each through that VF's own checks.
        *last: the admission the previous packet of this burst matched (a burst mostly
        comes from one VTEP; the table cannot change under the RX lock).
        Returns SN_OK, a drop reason counted on the uplink (> 0), or minus one counted on
        the VF (< 0)."""
        cdef uint8_t *b = p.data + p.off
        cdef uint32_t ihl, esp_off, spi
        cdef uint8_t proto, nh
        cdef int r, i, j, k, vfi = -1
        cdef fp_sa_ref *slot
        cdef sn_vxlan_rx info
        cdef const sn_peer_slot *peer
        cdef sn_pkt *q
        if p.len < 20:
            return SN_DROP_MALFORMED_L3
        if (b[0] >> 4) == 4:
            ihl = (b[0] & 15) * 4
            proto = b[9]
        elif (b[0] >> 4) == 6 and p.len >= 40:
            ihl = 40
            proto = b[6]
        else:
            return SN_DROP_MALFORMED_L3
        if ihl < 20 or ihl > p.len:
            return SN_DROP_MALFORMED_L3

        # Device-terminated ESP between VTEPs: raw ESP or ESP-in-UDP (non-zero SPI word).
        esp_off = 0
        if proto == 50:
            esp_off = ihl
        elif proto == 17 and p.len >= ihl + 12 and ((b[ihl + 2] << 8) | b[ihl + 3]) == 4500:
            if b[ihl + 8] | b[ihl + 9] | b[ihl + 10] | b[ihl + 11]:
                esp_off = ihl + 8
        if esp_off:
            spi = sn_esp_read_spi(p, esp_off)
            slot = self._sa_find(FP_UPLINK, spi, SN_DIR_IN)
            if slot == NULL:
                return SN_DROP_NO_SA
            r = sn_esp_decap(slot.sa, p, 0, esp_off, &nh)
            if r != SN_OK:
                return r
            self.ul.rx_esp += 1
            p.flags |= SN_PKT_ESP
        elif self.ul_mode != FP_UL_OFF:
            return SN_DROP_POLICY       # the underlay policy requires ESP between VTEPs

        r = sn_vxlan_decap(p, &info)
        if r != SN_OK:
            return r
        # Who may speak for this VNI: a VTEP the configuration names for it. Anyone who
        # reaches the VXLAN port could otherwise put frames (ARP, ND, which pass in every
        # mode) into a VM, and learning would even let them redirect its traffic.
        peer = last[0]
        if peer == NULL or peer.vni != info.vni or peer.family != info.family or \
                memcmp(peer.addr, info.src, 16) != 0:
            peer = sn_peer_lookup(&self.peers.t, info.vni, info.family, info.src)
            if peer == NULL:
                return SN_DROP_UNKNOWN_VTEP
            last[0] = peer
        b = p.data + p.off

        # The VF: by VNI and destination MAC; a group address goes to each VF of the VNI.
        for k in range(self.n_active):
            i = self.active[k]
            if self.vfs[i].vni == info.vni and \
                    ((b[0] & 1) or memcmp(self.vfs[i].mac, b, 6) == 0):
                vfi = i
                break
        if vfi < 0:
            for k in range(self.n_active):
                if self.vfs[self.active[k]].vni == info.vni:
                    return SN_DROP_NO_FDB
            return SN_DROP_UNKNOWN_VNI
        if self.learning:
            self._learn(info.vni, b + 6, peer.vtep)
        if b[0] & 1:
            # Copies first: the first VF's checks may decrypt its frame in place.
            for j in range(k + 1, self.n_active):
                i = self.active[j]
                if self.vfs[i].vni != info.vni:
                    continue
                if extra.count >= extra.size or \
                        p.len > <uint32_t>(extra.slot_size - extra.headroom):
                    self.vfs[i].c.drops[<int>SN_DROP_NO_ROOM] += 1
                    continue
                q = &extra.pkts[extra.count]
                extra.count += 1
                q.off = extra.headroom
                q.len = p.len
                q.flags = p.flags
                q.hash = 0
                memcpy(q.data + q.off, b, p.len)
                r = self._rx_to_vf(i, q)
                q.drop = r
        r = self._rx_to_vf(vfi, p)
        return -r

    cdef int _rx_to_vf(self, int vfi, sn_pkt *p) noexcept nogil:
        """An Ethernet frame from the underlay at p, for VF vfi: the VF's inbound checks,
        then the virtio-net header in front and .port set. Returns SN_OK or the drop
        reason, counted on the VF."""
        cdef fp_vf *v = &self.vfs[vfi]
        cdef uint16_t vnet_flags = 0
        cdef sn_vnet_hdr *vh
        cdef int r = self._vf_inbound(vfi, p, &vnet_flags)
        if r == SN_OK and p.off < SN_VNET_HDR_LEN:
            r = SN_DROP_NO_ROOM
        if r != SN_OK:
            v.c.drops[r] += 1
            return r
        p.off -= SN_VNET_HDR_LEN
        p.len += SN_VNET_HDR_LEN
        vh = <sn_vnet_hdr *>(p.data + p.off)
        memset(vh, 0, SN_VNET_HDR_LEN)
        vh.flags = vnet_flags
        p.port = vfi
        v.c.rx_frames += 1
        v.c.rx_bytes += p.len - SN_VNET_HDR_LEN
        return SN_OK

    cdef int _vf_inbound(self, int vfi, sn_pkt *p, uint16_t *vnet_flags) noexcept nogil:
        """A VF's inbound processing of one Ethernet frame at p (from the underlay, or
        switched from a VF here): its ESP by (VF, SPI), then its inbound policy, by its
        mode. Decryption happens in place (p moves); *vnet_flags gets DATA_VALID for a
        decrypted frame. Returns SN_OK or a drop reason (the caller counts it). Caller
        holds rx_lock: an inbound SA has one user at a time.

        The rules (RFC 4301 5.2 for what comes out of an SA):
          ESP with the VF's SPI: decrypted; in enforce mode what comes out must match an
            inbound protect policy of that SA (its reqid group); no policy at all is a
            drop. In offload mode a policy that matches must be that SA's, no policy
            leaves it to the SA (NIC semantics). Bypass and discard policies refuse it.
          ESP with another SPI: no_sa in enforce, passed untouched in offload.
          Clear IP: passes a bypass policy, or no policy in offload; a protect or
            discard policy, or no policy in enforce, refuses it.
          ARP, neighbour discovery and non-IP: pass in every mode."""
        cdef fp_vf *v = &self.vfs[vfi]
        cdef uint8_t *b = p.data + p.off
        cdef uint32_t esp_off, spi
        cdef uint8_t nh
        cdef int r, act
        cdef fp_sa_ref *slot
        cdef fp_sa_ref *ref
        cdef sn_hdrs h
        cdef fp_sel sel
        r = sn_parse_frame(b, p.len, &h)
        if r != SN_OK:
            return r
        vnet_flags[0] = 0
        if v.mode == FP_MODE_OFF or not h.ipver or _is_neighbour_discovery(b, &h, p.len):
            return SN_OK
        esp_off = 0
        if h.l4proto == 50 and not h.is_fragment:
            esp_off = h.l4off
        elif h.l4proto == 17 and h.l4hdrlen and p.len >= h.l4off + 12 and \
                ((b[h.l4off + 2] << 8) | b[h.l4off + 3]) == 4500 and \
                (b[h.l4off + 8] | b[h.l4off + 9] | b[h.l4off + 10] | b[h.l4off + 11]):
            esp_off = h.l4off + 8
        if esp_off:
            spi = sn_esp_read_spi(p, esp_off)
            slot = self._sa_find(vfi, spi, SN_DIR_IN)
            if slot == NULL or slot.sa == NULL:
                if v.mode == FP_MODE_ENFORCE:
                    return SN_DROP_NO_SA
                v.c.rx_esp_passthrough += 1     # the guest's own IPsec: not ours
                return SN_OK
            r = sn_esp_decap(slot.sa, p, h.l2len, esp_off, &nh)
            if r != SN_OK:
                return r
            b = p.data + p.off
            r = sn_parse_frame(b, p.len, &h)
            if r != SN_OK:
                return r
            # A protect policy names its SA, or with a reqid the group of SAs a rekey
            # moves through.
            if _selector(b, &h, &sel):
                act = _spd(self.spd, vfi, SN_DIR_IN, &sel, &ref)
                if act == SN_POLICY_PROTECT:
                    if ref != slot and (ref == NULL or ref.reqid == 0 or
                                        ref.reqid != slot.reqid):
                        return SN_DROP_POLICY
                elif act != SN_POLICY_NONE or v.mode == FP_MODE_ENFORCE:
                    return SN_DROP_POLICY
            v.c.rx_esp += 1
            vnet_flags[0] = VIRTIO_NET_HDR_F_DATA_VALID
        elif _selector(b, &h, &sel):
            act = _spd(self.spd, vfi, SN_DIR_IN, &sel, &ref)
            if (act != SN_POLICY_NONE and act != SN_POLICY_BYPASS) or \
                    (act == SN_POLICY_NONE and v.mode == FP_MODE_ENFORCE):
                return SN_DROP_POLICY
        return SN_OK

    cdef void _local_in(self, Batch loc) noexcept nogil:
        """The receivers' inbound processing of frames switched between VFs here (marked
        SN_PKT_LOCAL by _tx_frame): each meets its receiver's mode, SAs and inbound policy
        exactly as a frame from the underlay would (_vf_inbound), so what a VF accepts
        does not depend on where its peer runs. Refused frames get .drop (counted on the
        receiver). Caller holds rx_lock."""
        cdef int i, r
        cdef sn_pkt *p
        cdef fp_vf *v
        cdef uint16_t vnet_flags
        for i in range(loc.count):
            p = &loc.pkts[i]
            if p.drop or not (p.flags & SN_PKT_LOCAL) or p.port >= FP_MAX_VF:
                continue
            p.flags &= ~SN_PKT_LOCAL
            v = &self.vfs[p.port]
            if v.mode != FP_MODE_OFF:
                p.off += SN_VNET_HDR_LEN
                p.len -= SN_VNET_HDR_LEN
                r = self._vf_inbound(p.port, p, &vnet_flags)
                if r == SN_OK and vnet_flags and p.off < SN_VNET_HDR_LEN:
                    r = SN_DROP_NO_ROOM
                if r != SN_OK:
                    p.drop = r
                    v.c.drops[r] += 1
                    continue
                p.off -= SN_VNET_HDR_LEN
                p.len += SN_VNET_HDR_LEN
                if vnet_flags:              # decrypted: the sender's header is gone
                    memset(p.data + p.off, 0, SN_VNET_HDR_LEN)
                    (<sn_vnet_hdr *>(p.data + p.off)).flags = vnet_flags
            v.c.rx_frames += 1
            v.c.rx_bytes += p.len - SN_VNET_HDR_LEN

    cdef void _learn(self, uint32_t vni, const uint8_t *mac, uint32_t vt) noexcept nogil:
        """Learn (VNI, inner source MAC) -> the VTEP the packet came from (RFC 7348 4.1),
        which admission has already found for this VNI. A known entry only gets its
        last-seen time; a new or moved one changes the FDB under the lanes' locks, taken
        without waiting (the next packet will try again)."""
        cdef sn_fdb_slot *e
        cdef timespec t
        cdef uint64_t now
        if mac[0] & 1:
            return
        clock_gettime(CLOCK_MONOTONIC, &t)
        now = <uint64_t>t.tv_sec * 1000000000 + t.tv_nsec
        e = sn_fdb_find(&self.fdb.f, vni, mac)
        if e != NULL and (not e.learned or e.vtep == vt):
            if e.learned:
                e.seen = now
            return                  # static entries are never overridden
        if self._try_lock_lanes():
            sn_fdb_learn(&self.fdb.f, vni, mac, vt, now)
            self._unlock_lanes()

    cdef int _rx_burst(self, Batch inb, int start, Batch extra, int *ok) noexcept nogil:
        """RX over inb[start:], in place. Stops after a packet that left copies in extra
        (the caller delivers in order, then goes on). Returns the index after the last
        packet processed; *ok gets the survivors in inb."""
        cdef int i, r, before
        cdef const sn_peer_slot *last = NULL
        for i in range(start, inb.count):
            if inb.pkts[i].drop:
                continue
            self.ul.rx_packets += 1
            before = extra.count
            r = self._rx_packet(&inb.pkts[i], extra, &last)
            if r > 0:
                self.ul.drops[r] += 1
                inb.pkts[i].drop = r
            elif r < 0:
                inb.pkts[i].drop = -r     # already counted on the VF
            else:
                ok[0] += 1
            if extra.count != before:
                return i + 1
        return inb.count

    def rx_burst(self, Batch inb not None, Batch extra=None):
        """Outer IP packets in `inb`, processed in place: survivors become frames with a
        virtio-net header and .port = VF index; the rest get .drop. Copies of broadcast
        frames for further VFs of a VNI are appended to `extra` (or discarded without
        one). Returns the survivors in inb."""
        cdef int ok = 0, start = 0
        cdef Batch ex = extra if extra is not None else self.rx_extra
        with nogil:
            PyThread_acquire_lock(self.rx_lock, WAIT_LOCK)
            if extra is None:
                ex.count = 0
            while start < inb.count:
                start = self._rx_burst(inb, start, ex, &ok)
            PyThread_release_lock(self.rx_lock)
        return ok

    # ---- capture --------------------------------------------------------------------

    cdef void _mirror(self, Batch m, uint64_t *ts, uint32_t scope, const uint8_t *data,
                      uint32_t n, bint ip_only) noexcept nogil:
        """Copy one frame (at most snaplen bytes) into a mirror, with its arrival time;
        uplink packets (ip_only) get an Ethernet header so captures are all Ethernet."""
        cdef sn_pkt *p
        cdef uint32_t take, l2 = 14 if ip_only else 0
        cdef timespec t
        if m.count >= m.size:
            self.mirror_dropped += 1
            return
        p = &m.pkts[m.count]
        take = n if n + l2 <= self.snaplen else self.snaplen - l2
        p.off = m.headroom
        if ip_only:
            memset(p.data + p.off, 0, 12)
            p.data[p.off + 12] = 0x86 if (n and (data[0] >> 4) == 6) else 0x08
            p.data[p.off + 13] = 0xDD if p.data[p.off + 12] == 0x86 else 0x00
        memcpy(p.data + p.off + l2, data, take)
        p.len = take + l2
        p.port = scope
        p.hash = n + l2                  # the original length
        p.drop = 0
        clock_gettime(CLOCK_REALTIME, &t)
        ts[m.count] = <uint64_t>t.tv_sec * 1000000000 + t.tv_nsec
        m.count += 1

    cdef void _mirror_batch(self, Batch m, uint64_t *ts, Batch b) noexcept nogil:
        cdef int i
        for i in range(b.count):
            if not b.pkts[i].drop:
                self._mirror(m, ts, FP_MIRROR_UPLINK, b.pkts[i].data + b.pkts[i].off,
                             b.pkts[i].len, True)

    def set_capture(self, int vf, bint on):
        """Mirror a VF's frames (both ways), or with vf = -1 the uplink's packets."""
        self._lock()
        try:
            if vf < 0:
                self.ul_mirror = on
            elif vf < FP_MAX_VF and self.vfs[vf].used:
                self.vf_mirrors += (1 if on else 0) - (1 if self.vfs[vf].mirror else 0)
                self.vfs[vf].mirror = on
            else:
                raise ValueError("no such VF")
        finally:
            self._unlock()

    def drain_capture(self):
        """Take what the mirrors hold: a list of (scope, time, frame, original length);
        scope is the VF index or -1 for the uplink."""
        out = []
        for lane in self.lanes:
            out.extend(self._drain_one((<_Lane>lane).mirror, (<_Lane>lane).mirror_ts,
                                       (<_Lane>lane).lock))
        out.extend(self._drain_one(self.rx_mirror, self.rx_mirror_ts, self.rx_lock))
        out.sort(key=lambda x: x[1])
        return out

    cdef list _drain_one(self, Batch m, uint64_t *ts, PyThread_type_lock lock):
        cdef int i
        cdef list res = []
        with nogil:
            PyThread_acquire_lock(lock, WAIT_LOCK)
        try:
            for i in range(m.count):
                res.append((-1 if m.pkts[i].port == FP_MIRROR_UPLINK else m.pkts[i].port,
                            ts[i] / 1e9, m.get(i), m.pkts[i].hash))
            m.count = 0
        finally:
            PyThread_release_lock(lock)
        return res

    # ---- vhost-user VFs ---------------------------------------------------------------
    # A guest's rings enter and leave the fast path in one place, _vhost_set, under every
    # lock: when it returns no burst is inside them, and none will look at the old ones.
    # Each ring is used with the memory table it was translated in (vh_vq.mem), so a ring
    # and the memory it points into can never come from two connections.

    def attach_vhost(self, int vf, int qp, Virtq rx not None, Virtq tx not None,
                     bint mergeable, bint guest_csum, bint guest_tso):
        """Serve queue pair `qp` of VF `vf` from a guest's rings (rx = the guest's receive
        queue; tx.kick_fd its TX kick eventfd, read by vhost_drain_kick). Features are the
        device's: the same for every pair."""
        if vf < 0 or vf >= FP_MAX_VF or not self.vfs[vf].used:
            raise ValueError("no such VF")
        if qp < 0 or qp >= FP_MAX_QP:
            raise ValueError(f"queue pair: must be 0..{FP_MAX_QP - 1}")
        self._vhost_set(vf, qp, rx, tx, mergeable, guest_csum, guest_tso)

    def detach_vhost(self, int vf, int qp=-1):
        """Stop using queue pair `qp` (-1: every pair) of the guest's rings; when this
        returns no burst touches them."""
        if vf < 0 or vf >= FP_MAX_VF:
            raise ValueError("no such VF")
        if qp < -1 or qp >= FP_MAX_QP:
            raise ValueError(f"queue pair: must be 0..{FP_MAX_QP - 1}")
        self._vhost_set(vf, qp, None, None, False, False, False)

    cdef void _vhost_set(self, int vf, int qp, Virtq rx, Virtq tx, bint mergeable,
                         bint guest_csum, bint guest_tso):
        """rx/tx None: detach qp (-1: all). vhost_refs keeps attached Virtqs alive."""
        cdef int i
        cdef fp_vf *v
        self._lock()
        try:
            v = &self.vfs[vf]
            for i in range(FP_MAX_QP):
                if (qp < 0 or i == qp) and rx is None:
                    v.vq_rx[i] = NULL
                    v.vq_tx[i] = NULL
                    v.kick_fd[i] = -1
                    self.vhost_refs.pop((vf, i), None)
            if rx is not None:
                v.vq_rx[qp] = &rx.q
                v.vq_tx[qp] = &tx.q
                v.kick_fd[qp] = tx.kick_fd
                v.mergeable = mergeable
                v.guest_csum = guest_csum
                v.guest_tso = guest_tso and guest_csum
                self.vhost_refs[(vf, qp)] = (rx, tx)
            self._pack_rxq(vf)
        finally:
            self._unlock()

    cdef void _pack_rxq(self, int vf):
        """The running RX rings in queue-pair order: received flows are spread over
        these by their hash, so a flow keeps its ring (and its order)."""
        cdef fp_vf *v = &self.vfs[vf]
        cdef int i
        v.n_rxq = 0
        for i in range(FP_MAX_QP):
            if v.vq_rx[i] != NULL:
                v.rxq[v.n_rxq] = v.vq_rx[i]
                v.n_rxq += 1

    def vhost_queues(self, int vf):
        """The queue pairs being served for VF `vf`."""
        if vf < 0 or vf >= FP_MAX_VF:
            raise ValueError("no such VF")
        return [i for i in range(FP_MAX_QP) if self.vfs[vf].vq_tx[i] != NULL]

    def vhost_kicks(self, int vf, int qp, bint enable):
        """Ask the guest for kicks on TX ring `qp` (idle) or not (busy polling)."""
        cdef _Lane L
        if vf < 0 or vf >= FP_MAX_VF or qp < 0 or qp >= FP_MAX_QP:
            raise ValueError("no such queue")
        L = self._lane(vf, qp)
        with nogil:
            PyThread_acquire_lock(L.lock, WAIT_LOCK)
            if self.vfs[vf].vq_tx[qp] != NULL:
                vq_enable_kicks(self.vfs[vf].vq_tx[qp], enable)
            PyThread_release_lock(L.lock)

    def vhost_drain_kick(self, int vf, int qp):
        """Consume the kick count of TX ring `qp` (its eventfd was readable). Under the
        pair's lane lock: the fd is read only while attached, so never after the backend
        closed it and the number went to another file. Never waits (RWF_NOWAIT: the
        guest shares the open file description and may clear O_NONBLOCK on it)."""
        cdef _Lane L
        cdef int fd
        if vf < 0 or vf >= FP_MAX_VF or qp < 0 or qp >= FP_MAX_QP:
            raise ValueError("no such queue")
        L = self._lane(vf, qp)
        with nogil:
            PyThread_acquire_lock(L.lock, WAIT_LOCK)
            fd = self.vfs[vf].kick_fd[qp]
            if self.vfs[vf].vq_tx[qp] != NULL and fd >= 0:
                fp_read_eventfd(fd)
            PyThread_release_lock(L.lock)

    cdef int _vhost_read(self, _Lane L, int vf, int qp, Batch inb) noexcept nogil:
        cdef int i, n
        cdef fp_vf *v = &self.vfs[vf]
        for i in range(inb.size):
            L.vbufs[i] = inb.pkts[i].data + inb.headroom
            L.vcaps[i] = inb.pkts[i].cap - inb.headroom
        n = vq_pop_chains(v.vq_tx[qp], v.vq_tx[qp].mem, L.vbufs, L.vcaps, L.vgot, inb.size)
        for i in range(n):
            inb.pkts[i].off = inb.headroom
            inb.pkts[i].len = L.vgot[i]
            inb.pkts[i].drop = 0
            inb.pkts[i].flags = 0
        return n

    # ---- poll loops for TAP VFs and the Underlay (one call = one burst, no GIL) ---------

    def poll_tx(self, int vf, int qp=0):
        """Read a burst from a VF (TAP, or the guest's TX ring of queue pair `qp`), run it
        through TX in the pair's lane, send it. Returns frames read."""
        cdef int n, start, fd, i
        cdef _Lane L
        cdef Batch inb, out, loc
        if self.underlay is None:
            raise RuntimeError("no underlay attached")
        if vf < 0 or vf >= FP_MAX_VF or not self.vfs[vf].used or qp < 0 or qp >= FP_MAX_QP:
            return 0
        L = self._lane(vf, qp)
        inb, out, loc = L.tin, L.tout, L.tlocal
        fd = self.vfs[vf].tap_fd if qp == 0 else -1
        with nogil:
            PyThread_acquire_lock(L.lock, WAIT_LOCK)
            inb.count = 0
            if self.vfs[vf].vq_tx[qp] != NULL:
                n = self._vhost_read(L, vf, qp, inb)
            elif fd >= 0:
                n = sn_tap_read(fd, inb.pkts, inb.size, inb.headroom, &self.vfs[vf].tap)
            else:
                n = 0
            inb.count = n
            start = 0
            while start < n:
                out.count = 0
                loc.count = 0
                start = self._tx_burst(L, vf, inb, start, out, loc)
                if out.count:
                    if self.ul_mirror:
                        self._mirror_batch(L.mirror, L.mirror_ts, out)
                    L.txq.send_pkts(out.pkts, out.count)
                    for i in range(out.count):      # what the underlay refused
                        if out.pkts[i].drop:
                            L.vc[vf].drops[out.pkts[i].drop] += 1
                if loc.count:
                    PyThread_acquire_lock(self.rx_lock, WAIT_LOCK)
                    self._local_in(loc)
                    self._deliver(loc, 0, loc.count, L.mirror, L.mirror_ts)
                    PyThread_release_lock(self.rx_lock)
            PyThread_release_lock(L.lock)
        return n

    def poll_rx(self):
        """Receive a burst from the underlay, run RX, write frames to the VFs."""
        cdef int n, start, end, ok = 0
        cdef Batch inb = self.rx_in
        cdef Batch extra = self.rx_extra
        if self.underlay is None:
            raise RuntimeError("no underlay attached")
        with nogil:
            PyThread_acquire_lock(self.rx_lock, WAIT_LOCK)
            inb.count = 0
            n = self.underlay.recv_pkts(inb.pkts, inb.size, inb.headroom)
            inb.count = n
            if n > 0:
                if self.ul_mirror:
                    self._mirror_batch(self.rx_mirror, self.rx_mirror_ts, inb)
                start = 0
                while start < n:
                    extra.count = 0
                    end = self._rx_burst(inb, start, extra, &ok)
                    self._deliver(inb, start, end, self.rx_mirror, self.rx_mirror_ts)
                    if extra.count:
                        self._deliver(extra, 0, extra.count, self.rx_mirror,
                                      self.rx_mirror_ts)
                    start = end
            PyThread_release_lock(self.rx_lock)
        return n

    cdef void _deliver(self, Batch b, int start, int end, Batch mirror,
                       uint64_t *mirror_ts) noexcept nogil:
        """Hand each live frame to its VF: a TAP write per frame (TAP has no batch write),
        or one push per burst into a guest's RX ring. Runs of TCP segments of one flow are
        first coalesced into one GSO frame (receive offload, as the kernel's GRO would)
        where the VF accepts them, so its stack sees 64 KB frames and softnic makes one
        syscall or ring entry where it would make forty. A guest with several RX rings
        gets each flow on the ring its hash picks (as RSS would). Caller holds rx_lock (a
        guest ring has one producer). Frames b[start:end]."""
        cdef int i = start, j, pend_vf = -1, ring, pend_ring = -1
        cdef uint32_t n_ok
        cdef int npend = 0, ngro = 0
        cdef fp_vf *v
        cdef fp_gro g
        cdef sn_pkt *target
        cdef sn_pkt *p
        if self.vf_mirrors:
            for j in range(start, end):
                p = &b.pkts[j]
                if not p.drop and p.port < FP_MAX_VF and self.vfs[p.port].mirror and \
                        p.len > SN_VNET_HDR_LEN:
                    self._mirror(mirror, mirror_ts, p.port, p.data + p.off + SN_VNET_HDR_LEN,
                                 p.len - SN_VNET_HDR_LEN, False)
        while i < end:
            p = &b.pkts[i]
            if p.drop or p.port >= FP_MAX_VF:
                i += 1
                continue
            v = &self.vfs[p.port]
            if not v.used or (v.n_rxq == 0 and v.tap_fd < 0):
                i += 1
                continue
            if v.n_rxq:
                ring = 0
                if v.n_rxq > 1 and p.len > SN_VNET_HDR_LEN:
                    ring = sn_flow_hash(p.data + p.off + SN_VNET_HDR_LEN,
                                        p.len - SN_VNET_HDR_LEN) % v.n_rxq
                if pend_vf != <int>p.port or pend_ring != ring:
                    self._vhost_flush(pend_vf, pend_ring, npend)
                    npend = 0
                    ngro = 0
                    pend_vf = p.port
                    pend_ring = ring
            # A run of segments to merge?
            j = i + 1
            if (v.n_rxq == 0 or v.guest_tso) and _gro_start(p, &g):
                while j < end and not b.pkts[j].drop and b.pkts[j].port == p.port \
                        and _gro_fits(&g, &b.pkts[j]):
                    j += 1
            if j - i >= 2:
                if v.n_rxq and (ngro == FP_VH_GRO or npend == FP_VH_PENDING):
                    self._vhost_flush(pend_vf, pend_ring, npend)
                    npend = 0
                    ngro = 0
                target = self.gro if v.n_rxq == 0 else &self.vgro.pkts[ngro]
                target.off = 64
                n_ok = _gro_build(&g, b.pkts, i, j, target)
                if n_ok >= 2:
                    v.c.rx_coalesced += n_ok
                    if v.n_rxq == 0:
                        if sn_tap_write(v.tap_fd, target, 1, &v.tap) != 1:
                            v.c.drops[<int>SN_DROP_RING_FULL] += n_ok
                    else:
                        self.vframes[npend] = target.data + target.off
                        self.vlens[npend] = target.len
                        npend += 1
                        ngro += 1
                    i += n_ok
                    continue
            # One frame as it is.
            if v.n_rxq == 0:
                if sn_tap_write(v.tap_fd, p, 1, &v.tap) != 1:
                    v.c.drops[p.drop if p.drop else <int>SN_DROP_RING_FULL] += 1
            else:
                if npend == FP_VH_PENDING:
                    self._vhost_flush(pend_vf, pend_ring, npend)
                    npend = 0
                    ngro = 0
                if not v.guest_csum:
                    p.data[p.off] = 0       # no DATA_VALID unless GUEST_CSUM was agreed
                self.vframes[npend] = p.data + p.off
                self.vlens[npend] = p.len
                npend += 1
            i += 1
        self._vhost_flush(pend_vf, pend_ring, npend)

    cdef void _vhost_flush(self, int vf, int ring, int n) noexcept nogil:
        cdef int done
        cdef fp_vf *v
        if vf < 0 or n == 0:
            return
        v = &self.vfs[vf]
        if ring < 0 or <uint32_t>ring >= v.n_rxq:
            return
        done = vq_push_frames(v.rxq[ring], v.rxq[ring].mem, self.vframes, self.vlens, n,
                              v.mergeable)
        if done < n:
            v.c.drops[<int>SN_DROP_RING_FULL] += n - done


# ---- receive coalescing ---------------------------------------------------------------
# A run of frames is merged when every one is [vnet hdr][Ethernet][IPv4 without options, or
# IPv6 without extension headers][TCP with only ACK/PSH set], of the same flow, with the
# same IP header fields and identical TCP options (so timestamps match, as Linux's GRO
# requires), contiguous sequence numbers, and equal payload sizes but for the last. Each
# segment's TCP checksum is verified while its payload is copied; the merged frame goes to
# the VF as a GSO frame with NEEDS_CSUM, the form the kernel's own TAP output takes.

ctypedef struct fp_gro:
    uint32_t l3off          # from the frame start (after the vnet header)
    uint32_t l4off
    uint32_t hdrlen         # Ethernet + IP + TCP
    uint32_t mss            # payload of the first segment
    uint32_t total          # payload bytes so far
    uint32_t next_seq
    uint32_t last_len       # payload of the last segment taken
    uint8_t v6
    const uint8_t *first    # the first frame (after the vnet header)


cdef inline uint32_t _rd32be(const uint8_t *b) noexcept nogil:
    return (<uint32_t>b[0] << 24) | (<uint32_t>b[1] << 16) | (<uint32_t>b[2] << 8) | b[3]


cdef bint _gro_shape(const sn_pkt *p, uint32_t *l4off, uint32_t *paylen,
                     uint8_t *v6) noexcept nogil:
    cdef const uint8_t *f = p.data + p.off + SN_VNET_HDR_LEN
    cdef uint32_t n, iplen, doff
    if p.len < SN_VNET_HDR_LEN + 14 + 40:
        return False
    n = p.len - SN_VNET_HDR_LEN
    if f[12] == 0x08 and f[13] == 0x00:
        if f[14] != 0x45 or f[23] != 6 or (f[20] & 0x3F) or f[21]:
            return False            # options, not TCP, or a fragment
        iplen = (<uint32_t>f[16] << 8) | f[17]
        if iplen + 14 != n:
            return False            # padding or truncation: not ours to merge
        l4off[0] = 34
        v6[0] = 0
    elif f[12] == 0x86 and f[13] == 0xDD:
        if f[20] != 6 or (f[14] >> 4) != 6:
            return False
        iplen = ((<uint32_t>f[18] << 8) | f[19]) + 40
        if iplen + 14 != n:
            return False
        l4off[0] = 54
        v6[0] = 1
    else:
        return False
    doff = (f[l4off[0] + 12] >> 4) * 4
    if doff < 20 or l4off[0] + doff >= n:
        return False
    # Only ACK (and PSH) may be set: SYN, FIN, RST, URG, ECE, CWR end a run.
    if (f[l4off[0] + 13] & 0xF7) != 0x10:
        return False
    paylen[0] = n - l4off[0] - doff
    return True


cdef bint _gro_start(const sn_pkt *p, fp_gro *g) noexcept nogil:
    cdef uint32_t l4off, paylen
    cdef uint8_t v6
    if not _gro_shape(p, &l4off, &paylen, &v6):
        return False
    g.first = p.data + p.off + SN_VNET_HDR_LEN
    g.l3off = 14
    g.l4off = l4off
    g.hdrlen = l4off + (g.first[l4off + 12] >> 4) * 4
    g.mss = paylen
    g.total = paylen
    g.last_len = paylen
    g.v6 = v6
    g.next_seq = _rd32be(g.first + l4off + 4) + paylen
    return True


cdef bint _gro_fits(fp_gro *g, const sn_pkt *p) noexcept nogil:
    cdef uint32_t l4off, paylen
    cdef uint8_t v6
    cdef const uint8_t *f = p.data + p.off + SN_VNET_HDR_LEN
    if g.last_len != g.mss:
        return False                # the previous segment was short: it ended the train
    if not _gro_shape(p, &l4off, &paylen, &v6) or v6 != g.v6 or l4off != g.l4off:
        return False
    if paylen == 0 or paylen > g.mss or g.hdrlen + g.total + paylen > 65535 - 64:
        return False
    if l4off + (f[l4off + 12] >> 4) * 4 != g.hdrlen:
        return False
    # Same MACs and ethertype; IPv4: same TOS, TTL, DF, addresses; IPv6: same first word
    # (traffic class and flow label), hop limit and addresses.
    if memcmp(f, g.first, 14) != 0:
        return False
    if v6:
        if memcmp(f + 14, g.first + 14, 4) != 0 or f[21] != g.first[21] or \
                memcmp(f + 22, g.first + 22, 32) != 0:
            return False
    else:
        if f[15] != g.first[15] or f[20] != g.first[20] or f[22] != g.first[22] or \
                memcmp(f + 26, g.first + 26, 8) != 0:
            return False
    # Same ports, contiguous sequence, same ACK and window, identical options.
    if memcmp(f + l4off, g.first + l4off, 4) != 0 or _rd32be(f + l4off + 4) != g.next_seq:
        return False
    if memcmp(f + l4off + 8, g.first + l4off + 8, 4) != 0 or \
            memcmp(f + l4off + 14, g.first + l4off + 14, 2) != 0:
        return False
    if memcmp(f + l4off + 20, g.first + l4off + 20, g.hdrlen - l4off - 20) != 0:
        return False
    g.next_seq += paylen
    g.total += paylen
    g.last_len = paylen
    return True


cdef uint32_t _gro_build(fp_gro *g, sn_pkt *pkts, int i, int j, sn_pkt *out) noexcept nogil:
    """Merge pkts[i:j] into out (a 64 KB slot). Returns how many segments made it in: a
    segment whose TCP checksum fails stops the merge there."""
    cdef uint8_t *d = out.data + out.off
    cdef uint8_t *f
    cdef const uint8_t *s
    cdef sn_vnet_hdr *vh = <sn_vnet_hdr *>d
    cdef uint32_t k, pay, off = SN_VNET_HDR_LEN + g.hdrlen, taken = 0, tcplen
    cdef uint64_t acc
    cdef uint8_t psh = 0
    memcpy(d + SN_VNET_HDR_LEN, g.first, g.hdrlen)
    f = d + SN_VNET_HDR_LEN
    for k in range(<uint32_t>i, <uint32_t>j):
        s = pkts[k].data + pkts[k].off + SN_VNET_HDR_LEN
        pay = pkts[k].len - SN_VNET_HDR_LEN - g.hdrlen
        tcplen = g.hdrlen - g.l4off + pay
        if g.v6:
            acc = sn_csum_pseudo6(s + 22, s + 38, 6, tcplen)
        else:
            acc = sn_csum_pseudo4(s + 26, s + 30, 6, tcplen)
        acc = sn_csum_partial(s + g.l4off, g.hdrlen - g.l4off, acc)
        acc = sn_csum_copy(d + off, s + g.hdrlen, pay, acc)
        if sn_csum_sum16(acc) != 0xFFFF:
            break
        psh |= s[g.l4off + 13] & 0x08
        off += pay
        taken += 1
    if taken < 2:
        return taken
    # Headers of the merged frame: lengths, PSH from any segment, checksum left for the
    # receiver (NEEDS_CSUM with the pseudo-header sum in place, as virtio-net has it).
    tcplen = off - SN_VNET_HDR_LEN - g.l4off
    if g.v6:
        sn_st16(f + 18, <uint16_t>tcplen)
        acc = sn_csum_pseudo6(f + 22, f + 38, 6, tcplen)
    else:
        sn_st16(f + 16, <uint16_t>(tcplen + 20))
        f[24] = 0
        f[25] = 0
        sn_st16(f + 24, sn_csum_finish(sn_csum_partial(f + 14, 20, 0)))
        acc = sn_csum_pseudo4(f + 26, f + 30, 6, tcplen)
    f[g.l4off + 13] |= psh
    sn_st16(f + g.l4off + 16, <uint16_t>(~sn_csum_finish(acc)))
    memset(vh, 0, SN_VNET_HDR_LEN)
    vh.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM
    vh.gso_type = VIRTIO_NET_HDR_GSO_TCPV6 if g.v6 else VIRTIO_NET_HDR_GSO_TCPV4
    vh.hdr_len = g.hdrlen
    vh.gso_size = g.mss
    vh.csum_start = g.l4off
    vh.csum_offset = 16
    out.len = off
    return taken


cdef inline void _swap(sn_pkt *a, sn_pkt *b) noexcept nogil:
    cdef sn_pkt t = a[0]
    a[0] = b[0]
    b[0] = t


def _mac(mac):
    if isinstance(mac, (bytes, bytearray)):
        b = bytes(mac)
    else:
        parts = str(mac).split(":")
        if len(parts) != 6:
            raise ValueError("mac: must be six hex octets")
        b = bytes(int(x, 16) for x in parts)
    if len(b) != 6:
        raise ValueError("mac: must be 6 bytes")
    return b
