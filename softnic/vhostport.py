"""A VF served to a QEMU guest over vhost-user: softnic's side of vhost.VhostNetDevice.

The vhost package runs the protocol; this class hands the guest's rings to the data plane
when a queue pair starts and takes them back before the backend touches them again
(reset, new memory table, unmapping, closing the eventfds). Both go through one pair of
callbacks the data plane binds to this VF's port (`up`, `down`): the rings and the TX
kick eventfd are attached and watched, or unwatched and detached, in one step under one
lock, so no worker is ever left on a ring the backend has let go. The VF offers `queues`
pairs (VIRTIO_NET_F_MQ); each pair the guest enables is served by the TX lane the data
plane assigns it, and received flows are spread over the running RX rings by their hash.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from vhost._virtq import Virtq
from vhost.backend import VhostNetDevice, VhostUserBackend, VhostUserClient, VhostUserServer
from vhost.memory import DEFAULT_MAX_MEMORY
from vhost.protocol import Feature

log = logging.getLogger("softnic.vhost")

#: up(qp, rx, tx, mergeable, guest_csum, guest_tso): serve queue pair qp from these rings
Up = Callable[[int, Virtq, Virtq, bool, bool, bool], None]
#: down(qp): stop serving queue pair qp; returns once no worker touches its rings
Down = Callable[[int], None]


class VhostVF(VhostNetDevice):
    """The device behind one vhost-user VF socket. max_memory: bytes of guest memory a
    frontend may map (None: no cap)."""

    def __init__(self, name: str, socket_path: str, mode: str, *, up: Up, down: Down,
                 event: Callable[[dict[str, Any]], None], queue_pairs: int = 1,
                 max_memory: int | None = DEFAULT_MAX_MEMORY) -> None:
        self.name = name
        self._up = up
        self._down = down
        self._event = event
        self.backend: VhostUserBackend | None = None
        self.running: set[int] = set()          # queue pairs handed to the data plane
        self.endpoint: VhostUserServer | VhostUserClient
        kw: dict[str, Any] = {"queue_pairs": queue_pairs, "max_memory": max_memory}
        if mode == "client":
            self.endpoint = VhostUserClient(socket_path, self, **kw)
        else:
            self.endpoint = VhostUserServer(socket_path, self, **kw)

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
        """Ends the connection and the listener; every queue pair is down on return."""
        self.endpoint.stop()

    # ---- VhostNetDevice ---------------------------------------------------------------

    def connected(self, backend: VhostUserBackend) -> None:
        self.backend = backend
        self._event({"type": "vf-guest", "vf": self.name, "state": "connected"})

    def queue_started(self, backend: VhostUserBackend, qp: int) -> None:
        rx, tx = backend.vq(2 * qp), backend.vq(2 * qp + 1)
        self._up(qp, rx, tx, backend.mergeable, backend.has(Feature.GUEST_CSUM),
                 backend.has(Feature.GUEST_TSO4) or backend.has(Feature.GUEST_TSO6))
        up = not self.running
        self.running.add(qp)
        if up:
            self._event({"type": "vf-link", "vf": self.name, "state": "up"})

    def queue_stopped(self, backend: VhostUserBackend, qp: int) -> None:
        # The backend resets and unmaps right after this returns: the rings are taken
        # back first, whatever else fails.
        try:
            self._down(qp)
        finally:
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
