"""A VF served to a QEMU guest over vhost-user: softnic's side of vhost.VhostNetDevice.

The vhost package runs the protocol; this class hands the guest's rings to the fast path
when a queue pair starts and takes them back (under the data plane's locks) before the
backend unmaps guest memory. Only queue pair 0 carries traffic; more pairs are refused at
negotiation by offering one.
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
                 attach: Callable[[int, Any, Any, bool, bool, bool], None],
                 detach: Callable[[int], None],
                 kick: Callable[[int, int | None], None],
                 event: Callable[[dict[str, Any]], None]) -> None:
        self.name = name
        self.index = index
        self._attach = attach
        self._detach = detach
        self._kick = kick
        self._event = event
        self.backend: VhostUserBackend | None = None
        self.endpoint: VhostUserServer | VhostUserClient
        if mode == "client":
            self.endpoint = VhostUserClient(socket_path, self)
        else:
            self.endpoint = VhostUserServer(socket_path, self)

    def start(self) -> None:
        if isinstance(self.endpoint, VhostUserServer):
            self.endpoint.start(mode=0o660)
        else:
            self.endpoint.start()

    def stop(self) -> None:
        self.endpoint.stop()

    # ---- VhostNetDevice ---------------------------------------------------------------

    def connected(self, backend: VhostUserBackend) -> None:
        self.backend = backend
        self._event({"type": "vf-guest", "vf": self.name, "state": "connected"})

    def queue_started(self, backend: VhostUserBackend, qp: int) -> None:
        if qp != 0:
            return
        rx, tx = backend.vq(0), backend.vq(1)
        self._attach(self.index, rx, tx, backend.mergeable,
                     backend.has(Feature.GUEST_CSUM),
                     backend.has(Feature.GUEST_TSO4) or backend.has(Feature.GUEST_TSO6))
        self._kick(self.index, tx.kick_fd)
        self._event({"type": "vf-link", "vf": self.name, "state": "up"})

    def queue_stopped(self, backend: VhostUserBackend, qp: int) -> None:
        if qp != 0:
            return
        self._kick(self.index, None)
        self._detach(self.index)      # returns once no burst touches the rings
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
