"""vhost-user backend (device side) for virtio-net; knows nothing of softnic.

Implements QEMU's docs/interop/vhost-user.rst (back-end side, net device) and virtio 1.1
§2.6 split virtqueues / §5.1 net device. Layout, in the manner of rust-vmm's vhost crates:

- vhost.protocol  -- message framing with SCM_RIGHTS fds; syntax and framing checks;
                     typed errors (VhostError and its subclasses).
- vhost.memory    -- GuestMemory: memory table validation, MAP_SHARED mappings.
- vhost.backend   -- VhostUserBackend (one per connection: meaning checks, state, replies),
                     VhostNetDevice (the narrow interface a device implements),
                     VhostUserServer (listens) and VhostUserClient (connects, reconnects).
- vhost._virtq    -- compiled, GIL-free split-ring data path; cimport it from Cython:

      from vhost._virtq cimport Virtq, vq_pop_chains, vq_push_frames
      n = vq_pop_chains(&vq.q, &vq.mem.m, bufs, caps, lens, max)      # TX
      m = vq_push_frames(&vq.q, &vq.mem.m, frames, lens, n, mergeable)  # RX

- vhost.testing   -- a vhost-user frontend (QEMU + guest driver) with memfd guest RAM and
                     compiled driver rings (vhost._frontend), a loopback device, a
                     no-socket ring harness for fuzzing.
- vhost.bench     -- `python -m vhost.bench`: frames/s through the loopback device.

Offered: VERSION_1, MRG_RXBUF, CSUM, GUEST_CSUM, HOST_TSO4/6, GUEST_TSO4/6, MTU, MQ (with
more than one queue pair), EVENT_IDX, INDIRECT_DESC, PROTOCOL_FEATURES; protocol features
MQ, REPLY_ACK, MTU, CONFIGURE_MEM_SLOTS, STATUS. Not offered (so refused if used): packed
rings, CTRL_VQ (QEMU serves it), LOG_ALL / LOG_SHMFD (no dirty logging, no migration).
"""
