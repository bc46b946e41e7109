"""A VF served to a QEMU guest over vhost-user: softnic's side of vhost.VhostNetDevice.

The vhost package runs the protocol; this class hands the guest's rings to the fast path
when a queue pair starts and takes them back (under the data plane's locks) before the
backend unmaps guest memory. The VF offers `queues` pairs (VIRTIO_NET_F_MQ); each pair that
the guest enables is served by the TX lane the data plane assigns it, and received flows
are spread over the running RX rings by their hash.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from vhost.backend import VhostNetDevice, VhostUserBackend, VhostUserClient, VhostUserServer
from vhost.protocol import Feature

log = logging.getLogger("softnic.vhost")


class VhostVF(VhostNetDevice):
    """The device behind one vhost-user VF socket."""

    def __init__(self, name: str, index: int, socket_path: str, mode: str,
                 attach: Callable[[int, int, Any, Any, bool, bool, bool], None],
                 detach: Callable[[int, int], None],
                 kick: Callable[[int, int, int | None], None],
                 event: Callable[[dict[str, Any]], None], queue_pairs: int = 1) -> None:
        self.name = name
        self.index = index
        self._attach = attach
        self._detach = detach
        self._kick = kick
        self._event = event
        self.backend: VhostUserBackend | None = None
        self.running: set[int] = set()          # queue pairs handed to the data plane
        self.endpoint: VhostUserServer | VhostUserClient
        if mode == "client":
            self.endpoint = VhostUserClient(socket_path, self, queue_pairs=queue_pairs)
        else:
            self.endpoint = VhostUserServer(socket_path, self, queue_pairs=queue_pairs)

    def start(self, mode: int = 0o600, uid: int = -1, gid: int = -1) -> None:
        """Listen (server mode: the socket gets mode, uid and gid, -1 for the daemon's,
        before it is reachable) or start connecting (client mode). vhost.sockfile's rules
        apply either way: nothing is followed through a symlink, and in server mode only
        a dead socket of ours is replaced (OSError for anything else at the path)."""
        if isinstance(self.endpoint, VhostUserServer):
            self.endpoint.start(mode=mode, uid=uid, gid=gid)
        else:
            self.endpoint.start()

    def stop(self) -> None:
        self.endpoint.stop()

    # ---- VhostNetDevice ---------------------------------------------------------------

    def connected(self, backend: VhostUserBackend) -> None:
        self.backend = backend
        self._event({"type": "vf-guest", "vf": self.name, "state": "connected"})

    def queue_started(self, backend: VhostUserBackend, qp: int) -> None:
        rx, tx = backend.vq(2 * qp), backend.vq(2 * qp + 1)
        self._attach(self.index, qp, rx, tx, backend.mergeable,
                     backend.has(Feature.GUEST_CSUM),
                     backend.has(Feature.GUEST_TSO4) or backend.has(Feature.GUEST_TSO6))
        self._kick(self.index, qp, tx.kick_fd)
        up = not self.running
        self.running.add(qp)
        if up:
            self._event({"type": "vf-link", "vf": self.name, "state": "up"})

    def queue_stopped(self, backend: VhostUserBackend, qp: int) -> None:
        self._kick(self.index, qp, None)
        self._detach(self.index, qp)      # returns once no burst touches the rings
        self.running.discard(qp)
        if not self.running:
            self._event({"type": "vf-link", "vf": self.name, "state": "down"})

    def queue_broken(self, backend: VhostUserBackend, qp: int, vq: int, reason: str) -> None:
        log.warning("%s: the guest broke ring %d: %s", self.name, vq, reason)
        self._event({"type": "vf-broken", "vf": self.name, "reason": reason, "ring": vq})

    def disconnected(self, backend: VhostUserBackend) -> None:
        self.backend = None
        self._event({"type": "vf-guest", "vf": self.name, "state": "disconnected"})

    def stats(self) -> dict[str, Any]:
        b = self.backend
        return b.stats() if b is not None else {}
