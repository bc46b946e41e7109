# The packet buffer and drop-reason contract shared by every stage of the data plane.
#
# A packet lives in a slot: `data[0:cap]` is the slot, `data[off:off+len]` the packet.
# Stages that prepend headers (ESP tunnel, VXLAN) move `off` down into the headroom;
# stages that append (ESP trailer, ICV) grow `len` into the tailroom. A stage never
# writes outside `data[0:cap]`: if it would, the packet is dropped with SN_DROP_NO_ROOM.
#
# Every per-packet stage function is `nogil`, returns 0 (SN_OK) on success or a
# sn_drop reason, and leaves the packet untouched on failure where it can (so a caller
# may pass it on unchanged, e.g. offload mode's "not mine" case). Batch loops live in
# softnic/_fastpath.pyx; they count drops by reason.

from libc.stdint cimport uint8_t, uint16_t, uint32_t

cdef enum:
    # Room in front of a packet for everything the TX path may prepend:
    # outer Ethernet 14 + outer IPv6 40 + UDP 8 + VXLAN 8 + ESP tunnel IPv6 40 + ESP 8
    # + IV 16 + UDP-encap 8, rounded up generously.
    SN_HEADROOM = 256
    # Room behind: ESP padding (<= 255 + 2) and an ICV (<= 16).
    SN_TAILROOM = 320
    # Default slot for one MTU-sized packet plus head and tail room.
    SN_SLOT_SIZE = 2048 + SN_HEADROOM + SN_TAILROOM
    # A TSO frame from a guest or TAP: 64 KB of IP plus L2 and a virtio-net header.
    SN_MAX_FRAME = 65536 + 64

ctypedef struct sn_pkt:
    uint8_t *data     # slot start (owned by the batch, never freed by a stage)
    uint32_t cap      # slot size in bytes
    uint32_t off      # offset of the first packet byte in the slot
    uint32_t len      # packet length in bytes
    uint32_t hash     # inner flow hash (VXLAN source port, SA selection); 0 = not computed
    uint32_t port     # context: VF index on delivery, remote VTEP index to/from underlay
    uint16_t drop     # sn_drop reason set by the batch loop; SN_OK while alive
    uint16_t flags    # SN_PKT_* below

# virtio-net header (virtio 1.x, 5.1.6), little-endian; 12 bytes as both vhost-user
# (VERSION_1 / MRG_RXBUF) and TAP (TUNSETVNETHDRSZ 12) use it here.
ctypedef packed struct sn_vnet_hdr:
    uint8_t flags         # VIRTIO_NET_HDR_F_*
    uint8_t gso_type      # VIRTIO_NET_HDR_GSO_*
    uint16_t hdr_len      # bytes of headers (L2..L4) in a GSO frame
    uint16_t gso_size     # MSS for a GSO frame
    uint16_t csum_start   # where checksumming starts (NEEDS_CSUM)
    uint16_t csum_offset  # where from csum_start the checksum is stored
    uint16_t num_buffers  # mergeable RX buffers used for this frame

cdef enum:
    SN_VNET_HDR_LEN = 12
    VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
    VIRTIO_NET_HDR_F_DATA_VALID = 2
    VIRTIO_NET_HDR_GSO_NONE = 0
    VIRTIO_NET_HDR_GSO_TCPV4 = 1
    VIRTIO_NET_HDR_GSO_UDP = 3
    VIRTIO_NET_HDR_GSO_TCPV6 = 4
    VIRTIO_NET_HDR_GSO_UDP_L4 = 5
    VIRTIO_NET_HDR_GSO_ECN = 0x80

cdef enum:
    SN_PKT_ESP = 1        # the packet was produced by / decrypted from ESP
    SN_PKT_TSO = 2        # the packet is a segment of a TSO frame
    SN_PKT_LOCAL = 4      # switched between two VFs here: its receiver's inbound checks are due

# Why a packet was dropped. Names for Python are in softnic._fastpath.DROP_REASONS,
# in this order; append only.
cdef enum sn_drop:
    SN_OK = 0
    SN_DROP_MALFORMED_L2 = 1      # runt Ethernet, bad VLAN nesting
    SN_DROP_MALFORMED_L3 = 2      # bad IP version, header or total length
    SN_DROP_MALFORMED_L4 = 3      # truncated TCP/UDP header, bad data offset
    SN_DROP_BAD_VNET_HDR = 4      # nonsensical virtio-net header (gso_size, hdr_len, csum_*)
    SN_DROP_TOO_BIG = 5           # does not fit the tunnel MTU and cannot be segmented
    SN_DROP_NO_ROOM = 6           # slot head/tail room exhausted
    SN_DROP_NO_SA = 7             # no SA for (VF, SPI) or for the policy
    SN_DROP_POLICY = 8            # discard policy, enforce mode, or inner addresses != SA
    SN_DROP_REPLAY = 9            # duplicate or left of the anti-replay window
    SN_DROP_ICV = 10              # authentication failed
    SN_DROP_BAD_TRAILER = 11      # bad ESP pad length, pad bytes or next header
    SN_DROP_SEQ_EXHAUSTED = 12    # outbound sequence number would wrap
    SN_DROP_SA_EXPIRED = 13       # hard byte/packet lifetime reached
    SN_DROP_BAD_VXLAN = 14        # VXLAN flags / reserved bits / truncated
    SN_DROP_UNKNOWN_VNI = 15      # VNI of no VF
    SN_DROP_NO_FDB = 16           # no remote VTEP for the destination and no flood list
    SN_DROP_RING_FULL = 17        # receiver (guest RX ring, TAP, socket) could not take it
    SN_DROP_MALFORMED_ESP = 18    # ESP shorter than header + IV + ICV, bad block alignment
    SN_DROP_CRYPTO = 19           # the crypto engine failed (not an authentication failure)
    SN_DROP_NO_ROUTE = 20         # the underlay refused the packet (unreachable, link down)
    SN_DROP_UNKNOWN_VTEP = 21     # VXLAN from a source no FDB/flood/accept entry admits
    SN_DROP_MAX = 22
