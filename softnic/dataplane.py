"""The running data plane: the compiled Datapath, its ports, and the worker threads.

This implements softnic.control.Datapath for the Controller. Ports are TAP VFs
(softnic.tap), vhost-user VFs (softnic.vhostport) and the underlay (softnic.uplink); the
packet work happens in softnic._fastpath without the GIL, one burst per call. Workers
match the pipeline's locks: one TX worker per lane, each serving the VF queues the data
plane assigns to its lane (a VF's queue pairs are spread over the lanes), and one RX
worker for the underlay. Each polls while there is traffic and sleeps in epoll when there
is none.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from softnic import model
from softnic._esp import SecurityAssociation
from softnic._fastpath import Datapath as FastPath
from softnic.seqstate import SeqState
from softnic.tap import TapPort
from softnic.uplink import Uplink
from softnic.vhostport import VhostVF
from vhost.memory import DEFAULT_MAX_MEMORY

log = logging.getLogger("softnic.dataplane")

_EVENT_TYPES = {
    "soft_expired": "sa-soft-expire",
    "hard_expired": "sa-hard-expire",
    "seq_near_end": "sa-seq-near-exhaustion",
    "seq_exhausted": "sa-seq-exhausted",
}
_BUSY_POLLS = 64        # bursts in a row before looking at epoll again
_IDLE_WAIT = 0.2        # seconds an idle worker sleeps in epoll (also the stop latency)
_EVENT_PERIOD = 0.5     # how often SA events are collected
_FDB_MAX_AGE_NS = 300 * 10**9   # learned MACs are forgotten after 5 minutes of silence
_CAPTURE_PERIOD = 0.02  # how often capture mirrors are drained (they hold 1024 frames)


def _name_thread(name: str) -> None:
    """Give the calling thread its name in the kernel too (top -H, perf, /proc), so a
    profile of the daemon says which worker is which."""
    try:
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)    # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def default_tx_workers() -> int:
    """One TX worker per CPU but the one left for RX, from 1 to 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    return max(1, min(8, cpus - 1))


class _Port:
    def __init__(self, index: int, vf: model.VF, tap: TapPort | None,
                 vhost: VhostVF | None = None) -> None:
        self.index = index
        self.vf = vf
        self.tap = tap
        self.vhost = vhost
        self.kick_fds: dict[int, int] = {}    # queue pair -> the guest's TX kick eventfd
        self.closing = False                  # being deleted: no queue pair comes up again


class Dataplane:
    """softnic.control.Datapath over softnic._fastpath.Datapath."""

    def __init__(self, tx_workers: int | None = None, seq_state: str | None = None,
                 vhost_socket: tuple[int, int, int] = (0o600, -1, -1),
                 vhost_max_memory: int | None = DEFAULT_MAX_MEMORY) -> None:
        self.tx_workers = tx_workers or default_tx_workers()
        self.vhost_socket = vhost_socket    # (mode, uid, gid) of server-mode VF sockets
        # Guest memory one vhost-user VF may map, in bytes (None: no cap).
        self.vhost_max_memory = vhost_max_memory
        # Outbound sequence numbers kept over restarts (softnic.seqstate), if asked for.
        self._seq = SeqState(seq_state) if seq_state else None
        self._fp: FastPath | None = None
        self._uplink_cfg: model.Uplink | None = None
        self._uplink: Uplink | None = None
        self._ports: dict[str, _Port] = {}
        self._sas: dict[tuple[str, str, int], tuple[model.SA, SecurityAssociation]] = {}
        self._policies: dict[tuple[str, str], dict[Any, model.Policy]] = {}
        self._fdb: dict[Any, model.FdbEntry] = {}
        self._sink: Callable[[dict[str, Any]], None] = lambda ev: None
        self._lock = threading.RLock()
        # Guest rings coming up or going down (a vhost-user connection's thread), against
        # the TX workers' fd tables and a VF being closed. Never held while waiting for
        # a connection thread: del_vf holds _lock, not this, while it joins one.
        self._rings_lock = threading.Lock()
        self._stop = threading.Event()
        # Per TX worker: its epoll and what each fd in it is (port, queue pair).
        self._tx_epolls = [select.epoll() for _ in range(self.tx_workers)]
        self._tx_fds: list[dict[int, tuple[_Port, int]]] = [{} for _ in self._tx_epolls]
        self._rx_epoll = select.epoll()
        self._threads: list[threading.Thread] = []
        self._captures: dict[int, tuple[int, Callable[[float, bytes], None], int]] = {}
        self._capture_thread: threading.Thread | None = None
        self._next_capture = 1

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        workers: list[tuple[str, Callable[[], None]]] = [
            (f"softnic-tx{w}", lambda w=w: self._tx_worker(w))   # type: ignore[misc]
            for w in range(self.tx_workers)]
        workers.append(("softnic-rx", self._rx_worker))
        for name, fn in workers:
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()
        self._checkpoint_seqs()
        if self._capture_thread is not None:
            self._capture_thread.join(timeout=5)
        with self._lock:
            for name in list(self._ports):
                self._close_port(name)
            if self._uplink is not None:
                self._uplink.close()
                self._uplink = None
        for ep in self._tx_epolls:
            ep.close()
        self._rx_epoll.close()

    # ---- the Datapath protocol -----------------------------------------------------------

    def set_event_sink(self, sink: Callable[[dict[str, Any]], None]) -> None:
        self._sink = sink

    def set_uplink(self, uplink: model.Uplink | None) -> None:
        with self._lock:
            if uplink == self._uplink_cfg:
                return
            if self._ports or self._sas:
                raise ValueError("uplink: changing the uplink needs a restart while VFs or "
                                 "SAs exist")
            old = self._uplink
            if old is not None:
                for fd in old.filenos():
                    self._rx_epoll.unregister(fd)
                old.close()
                self._uplink = None
                self._fp = None
                self._uplink_cfg = None
            if uplink is None:
                return
            fp = FastPath(str(uplink.local), uplink.mtu, ipsec=uplink.ipsec,
                          learning=uplink.fdb_learning, sa_select=uplink.sa_select,
                          tx_lanes=self.tx_workers)
            ul = Uplink(str(uplink.local), vxlan_port=uplink.vxlan_port,
                        esp=uplink.ipsec == "esp", espinudp=uplink.ipsec == "espinudp")
            fp.attach_underlay(ul.underlay)
            for fd in ul.filenos():
                self._rx_epoll.register(fd, select.EPOLLIN)
            self._fp, self._uplink, self._uplink_cfg = fp, ul, uplink

    def _need_fp(self) -> FastPath:
        if self._fp is None:
            raise ValueError("uplink: configure the uplink first")
        return self._fp

    def add_vf(self, vf: model.VF) -> None:
        with self._lock:
            fp = self._need_fp()
            if vf.name in self._ports:
                raise ValueError(f"vf {vf.name}: exists")
            used = {p.index for p in self._ports.values()}
            index = next(i for i in range(256) if i not in used)
            if vf.kind == "vhost-user":
                self._add_vhost_vf(fp, vf, index)
                return
            tap = TapPort(vf.ifname, netns=vf.netns, mac=vf.mac, mtu=vf.mtu,
                          addrs=[str(a) for a in vf.addresses])
            port = _Port(index, vf, tap)
            try:
                fp.set_vf(index, vf.mac, vf.vni, vf.mtu, vf.ipsec, tap.fileno())
                self._watch(port, 0, tap.fileno())
            except Exception:
                tap.close()
                raise
            self._ports[vf.name] = port
            self._sink({"type": "vf-link", "vf": vf.name, "state": "up"})

    def _add_vhost_vf(self, fp: FastPath, vf: model.VF, index: int) -> None:
        assert vf.socket is not None
        fp.set_vf(index, vf.mac, vf.vni, vf.mtu, vf.ipsec, -1)
        port = _Port(index, vf, None)
        # The device reaches this port, never an index looked up later: a VF deleted and
        # re-added reuses its index, and a late call must not land on the new one.
        dev = VhostVF(vf.name, vf.socket, vf.vhost_mode or "server",
                      up=lambda qp, rx, tx, mrg, csum, tso: self._rings_up(
                          port, qp, rx, tx, mrg, csum, tso),
                      down=lambda qp: self._rings_down(port, qp),
                      event=lambda ev: self._sink(ev), queue_pairs=vf.queues or 1,
                      max_memory=self.vhost_max_memory)
        port.vhost = dev
        self._ports[vf.name] = port
        try:
            dev.start(*self.vhost_socket)
        except Exception:
            del self._ports[vf.name]
            fp.del_vf(index)
            raise

    def _watch(self, port: _Port, qp: int, fd: int) -> None:
        """Have the TX worker of this queue's lane wait on fd."""
        assert self._fp is not None
        w = self._fp.lane_of(port.index, qp)
        self._tx_fds[w][fd] = (port, qp)
        self._tx_epolls[w].register(fd, select.EPOLLIN)

    def _unwatch(self, fd: int) -> None:
        for ep, fds in zip(self._tx_epolls, self._tx_fds, strict=True):
            if fds.pop(fd, None) is not None:
                try:
                    ep.unregister(fd)
                except (OSError, ValueError):
                    pass

    # The one way a guest's rings enter and leave the data plane. Up: the rings go to
    # the fast path (under its locks), then their kick eventfd into the lane's epoll.
    # Down: the reverse, and it returns only once no burst can touch the rings and no
    # worker holds their kick fd, which the backend closes next (a stale fd number would
    # be read by the worker after the kernel gave it to something else).

    def _rings_up(self, port: _Port, qp: int, rx: Any, tx: Any, mergeable: bool,
                  guest_csum: bool, guest_tso: bool) -> None:
        fp = self._need_fp()
        with self._rings_lock:
            if port.closing:
                return              # the VF is going away; its backend is being stopped
            self._rings_off(port, qp, fp)
            fp.attach_vhost(port.index, qp, rx, tx, mergeable, guest_csum, guest_tso)
            if tx.kick_fd >= 0:
                try:
                    self._watch(port, qp, tx.kick_fd)
                except Exception:
                    fp.detach_vhost(port.index, qp)
                    raise
                port.kick_fds[qp] = tx.kick_fd

    def _rings_down(self, port: _Port, qp: int) -> None:
        fp = self._fp
        with self._rings_lock:
            self._rings_off(port, qp, fp)

    def _rings_off(self, port: _Port, qp: int, fp: FastPath | None) -> None:
        """Caller holds _rings_lock."""
        old = port.kick_fds.pop(qp, None)
        if old is not None:
            self._unwatch(old)
        if fp is not None:
            fp.detach_vhost(port.index, qp)

    def del_vf(self, name: str) -> None:
        with self._lock:
            if name not in self._ports:
                raise KeyError(name)
            for key in [k for k in self._sas if k[0] == name]:
                del self._sas[key]
            for pkey in [k for k in self._policies if k[0] == name]:
                del self._policies[pkey]
            self._close_port(name)
            self._sink({"type": "vf-link", "vf": name, "state": "down"})

    def _close_port(self, name: str) -> None:
        port = self._ports.pop(name)
        if port.vhost is not None:
            with self._rings_lock:
                port.closing = True
            port.vhost.stop()           # every queue pair goes down (_rings_down) first
            with self._rings_lock:      # and should one not have (a bug), here
                for qp in list(port.kick_fds):
                    self._rings_off(port, qp, self._fp)
        if self._fp is not None:
            self._fp.del_vf(port.index)
        if port.tap is not None:
            self._unwatch(port.tap.fileno())
            port.tap.close()

    def _scope(self, scope: str) -> int:
        if scope == model.UPLINK:
            return -1
        port = self._ports.get(scope)
        if port is None:
            raise ValueError(f"scope: no VF named {scope}")
        return port.index

    def add_sa(self, sa: model.SA) -> None:
        with self._lock:
            fp = self._need_fp()
            index = self._scope(sa.scope)
            lifetime = {k: getattr(sa, k) for k in
                        ("soft_bytes", "hard_bytes", "soft_packets", "hard_packets")
                        if getattr(sa, k) is not None}
            encap = (None if sa.encap_sport is None or sa.encap_dport is None
                     else (sa.encap_sport, sa.encap_dport))
            seq = 0
            if self._seq is not None and sa.dir == "out":
                try:
                    seq = self._seq.start(SeqState.key(sa.scope, sa.spi), sa.esn)
                except OSError as e:
                    raise ValueError(f"seq_state: cannot save sequence numbers: {e}") from None
            obj = SecurityAssociation(
                sa.spi, sa.mode, str(sa.src), str(sa.dst), sa.alg, sa.key.reveal(),
                auth_key=sa.auth_key.reveal() if sa.auth_key is not None else None,
                icv_len=sa.icv_len, esn=sa.esn,
                # The kernel's 0 means "no window"; the data plane always keeps one.
                replay_window=max(32, sa.replay_window), encap=encap,
                lifetime=lifetime or None, engine=sa.engine, seq=seq)
            fp.sa_add(index, sa.dir, obj, sa.reqid)
            self._sas[sa.ident] = (sa, obj)
            try:
                self._sync_policies(sa.scope)
            except Exception:
                fp.sa_del(index, sa.dir, sa.spi)
                del self._sas[sa.ident]
                raise

    def del_sa(self, sa: model.SA) -> None:
        with self._lock:
            fp = self._need_fp()
            if sa.ident not in self._sas:
                raise KeyError(sa.ident)
            # Make-before-break happens above us: the new outbound SA was added (and the
            # policy moved to it) before this call; the old inbound one accepted until now.
            fp.sa_del(self._scope(sa.scope), sa.dir, sa.spi)
            del self._sas[sa.ident]
            if self._seq is not None and sa.dir == "out":
                self._seq.forget(SeqState.key(sa.scope, sa.spi))
                with contextlib.suppress(OSError):     # logged; saved with the next mark
                    self._seq.flush()
            self._sync_policies(sa.scope)

    def _resolve(self, p: model.Policy) -> int | None:
        """The SPI a protect policy uses: its own, or the newest SA with its reqid."""
        if p.action != "protect":
            return None
        if p.spi is not None:
            return p.spi
        candidates = [spi for (scope, d, spi), (sa, _) in self._sas.items()
                      if scope == p.scope and d == p.dir and sa.reqid == p.reqid]
        # The SA added last wins: adding a new outbound SA with the same reqid is a rekey.
        return candidates[-1] if candidates else None

    def _entries(self, scope: str, tables: dict[str, dict[Any, model.Policy]]
                 ) -> list[dict[str, Any]]:
        """The fast path's form of a scope's policies. A protect policy whose SA is not
        there (yet, or any more) stays a protect policy without an SA: what it matches is
        dropped (no_sa), never sent in clear."""
        out = []
        for d in ("out", "in"):
            for p in tables.get(d, {}).values():
                spi = self._resolve(p)
                if spi is not None and (scope, p.dir, spi) not in self._sas:
                    spi = None
                out.append(self._policy_dict(p, spi, p.action))
        return out

    def _sync_policies(self, scope: str) -> None:
        """Push a scope's policies again (an SA came or went: reqids resolve anew)."""
        if scope == model.UPLINK or self._fp is None or scope not in self._ports:
            return
        tables = {d: self._policies.get((scope, d), {}) for d in ("out", "in")}
        self._fp.policy_set(self._ports[scope].index, self._entries(scope, tables))

    @staticmethod
    def _policy_dict(p: model.Policy, spi: int | None, action: str) -> dict[str, Any]:
        return {"dir": p.dir, "src": str(p.src), "dst": str(p.dst), "action": action,
                "proto": p.proto, "sport": p.sport, "dport": p.dport,
                "priority": p.priority, "spi": spi}

    def set_policies(self, scope: str, policies: tuple[model.Policy, ...]) -> None:
        with self._lock:
            tables: dict[str, dict[Any, model.Policy]] = {"out": {}, "in": {}}
            for p in policies:
                if p.scope != scope:
                    raise ValueError(f"scope: policy of {p.scope} given for {scope}")
                tables[p.dir][p.ident] = p
            if scope == model.UPLINK:
                # The uplink's `ipsec` setting protects all VXLAN between VTEPs with the
                # uplink SAs: a protect policy says the same and is kept as a record.
                if any(p.action != "protect" for p in policies):
                    raise ValueError("action: uplink policies can only protect (the "
                                     "uplink's ipsec setting covers all VXLAN)")
                if policies and (self._uplink_cfg is None or self._uplink_cfg.ipsec == "off"):
                    raise ValueError("scope: the uplink's ipsec is off")
            else:
                index = self._scope(scope)
                fp = self._need_fp()
                # The whole table in one call: the fast path validates it, then swaps it
                # in under every lock, so no packet sees a half-changed SPD.
                fp.policy_set(index, self._entries(scope, tables))
            for d in ("out", "in"):
                self._policies[(scope, d)] = tables[d]

    def add_fdb(self, entry: model.FdbEntry) -> None:
        with self._lock:
            fp = self._need_fp()
            if entry.mac == "accept":
                fp.peer_add(entry.vni, str(entry.remote))
            else:
                fp.fdb_add(entry.vni, None if entry.mac == "flood" else entry.mac,
                           str(entry.remote))
            self._fdb[entry.ident] = entry

    def del_fdb(self, entry: model.FdbEntry) -> None:
        with self._lock:
            fp = self._need_fp()
            if entry.mac == "accept":
                fp.peer_del(entry.vni, str(entry.remote))
            else:
                fp.fdb_del(entry.vni, None if entry.mac == "flood" else entry.mac,
                           str(entry.remote))
            self._fdb.pop(entry.ident, None)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"vf": {}, "uplink": {}, "drops": {}}
        fp = self._fp
        if fp is None:
            return out
        totals: dict[str, int] = {}
        for name, port in list(self._ports.items()):
            c = fp.vf_counters(port.index)
            drops = c.pop("drops")
            tap = c.pop("tap")
            flat = dict(c)
            flat.update({f"tap_{k}": v for k, v in tap.items()})
            flat.update({f"drop_{k}": v for k, v in drops.items()})
            out["vf"][name] = flat
            for k, v in drops.items():
                totals[k] = totals.get(k, 0) + v
            if port.vhost is not None:
                # The guest's rings: sizes, state and the per-reason counters of every
                # check on guest input (a broken ring says why).
                qs = port.vhost.stats().get("queues", [])
                # Counters only (they are Prometheus series too): a broken ring is 1 here,
                # its reason goes out as a vf-broken event.
                # `lane`: the TX worker serving the ring's queue pair.
                out.setdefault("queues", {})[name] = [
                    {k: int(bool(v)) if k == "broken" else int(v) for k, v in
                     (q | {"lane": fp.lane_of(port.index, int(q.get("index", 0)) // 2)}).items()
                     if k == "broken" or isinstance(v, bool | int)} for q in qs]
        u = fp.uplink_counters()
        for k, v in u.pop("drops").items():
            u[f"drop_{k}"] = v
            totals[k] = totals.get(k, 0) + v
        if self._uplink is not None:
            for k, v in self._uplink.counters().items():
                if isinstance(v, int):
                    u[f"io_{k}"] = v
        out["uplink"] = u
        out["drops"] = totals
        return out

    def sa_stats(self, sa: model.SA) -> dict[str, int]:
        entry = self._sas.get(sa.ident)
        if entry is None:
            raise KeyError(sa.ident)
        raw = entry[1].stats()
        flat: dict[str, int] = {}
        for k, v in raw.items():
            if k == "spi":
                continue
            if isinstance(v, dict):
                flat.update({f"drop_{kk}": int(vv) for kk, vv in v.items()})
            elif isinstance(v, int | bool):
                flat[k] = int(v)
        return flat

    def capture_start(self, scope: str, sink: Callable[[float, bytes], None],
                      snaplen: int) -> int:
        with self._lock:
            fp = self._need_fp()
            index = -1 if scope == model.UPLINK else self._scope(scope)
            handle = self._next_capture
            self._next_capture += 1
            self._captures[handle] = (index, sink, snaplen)
            fp.set_capture(index, True)
            if self._capture_thread is None:
                self._capture_thread = threading.Thread(target=self._capture_worker,
                                                        name="softnic-capture", daemon=True)
                self._capture_thread.start()
            return handle

    def capture_stop(self, handle: int) -> None:
        with self._lock:
            entry = self._captures.pop(handle, None)
            if entry is None or self._fp is None:
                return
            index = entry[0]
            if not any(c[0] == index for c in self._captures.values()):
                try:
                    self._fp.set_capture(index, False)
                except ValueError:
                    pass        # the VF is gone already

    def _capture_worker(self) -> None:
        """Drain the data plane's capture mirrors and hand frames to the sinks."""
        _name_thread("softnic-capture")
        while not self._stop.wait(_CAPTURE_PERIOD):
            fp = self._fp
            if fp is None or not self._captures:
                continue
            for index, ts, frame, _length in fp.drain_capture():
                for scope, sink, snaplen in list(self._captures.values()):
                    if scope == index:
                        sink(ts, frame[:snaplen])

    # ---- workers -------------------------------------------------------------------------

    def _tx_worker(self, w: int) -> None:
        """Serve the queues of lane w. A queue still busy after its share of bursts
        stays on the hot list and is served again after the others, without a wait in
        epoll, so one busy guest queue cannot starve the rest of the lane."""
        _name_thread(f"softnic-tx{w}")
        epoll, fds = self._tx_epolls[w], self._tx_fds[w]
        hot: dict[int, tuple[_Port, int]] = {}
        while not self._stop.is_set():
            try:
                events = epoll.poll(0 if hot else _IDLE_WAIT)
            except (OSError, ValueError):
                return
            for fd, _ in events:
                entry = fds.get(fd)
                if entry is None:
                    continue
                if entry[0].vhost is not None and self._fp is not None:
                    # under the lane's lock, and only while the rings are attached: the
                    # fd number is not read once the backend may have closed it
                    self._fp.vhost_drain_kick(entry[0].index, entry[1])
                hot[fd] = entry
            for fd, entry in list(hot.items()):
                if fds.get(fd) is not entry:        # the queue went away meanwhile
                    del hot[fd]
                    continue
                port, qp = entry
                busy = self._serve_vhost_tx(port, qp) if port.vhost is not None \
                    else self._serve_tx(port)
                if not busy:
                    del hot[fd]

    def _serve_tx(self, port: _Port) -> bool:
        """A TAP is readable: up to _BUSY_POLLS bursts. True if it may have more."""
        fp = self._fp
        if fp is None:
            return False
        for _ in range(_BUSY_POLLS):
            try:
                n = fp.poll_tx(port.index)
            except Exception:       # a port closing under us: the next epoll round settles it
                log.exception("tx on %s", port.vf.name)
                return False
            if n == 0:
                return False
        return True

    def _serve_vhost_tx(self, port: _Port, qp: int) -> bool:
        """A guest queue kicked (or is hot): drain its TX ring with kicks off (the guest
        need not notify while we poll). Before going idle turn kicks back on and look once
        more, so a frame queued in between is not left behind (virtio 1.1 2.7.10). True
        while the queue is still busy (kicks stay off)."""
        fp = self._fp
        if fp is None:
            return False
        try:
            fp.vhost_kicks(port.index, qp, False)
            for _ in range(_BUSY_POLLS * 4):
                if fp.poll_tx(port.index, qp) == 0:
                    break
            else:
                return True
            fp.vhost_kicks(port.index, qp, True)
            if fp.poll_tx(port.index, qp) == 0:
                return False
            fp.vhost_kicks(port.index, qp, False)
            return True
        except Exception:
            log.exception("tx on %s", port.vf.name)
            return False

    def _rx_worker(self) -> None:
        _name_thread("softnic-rx")
        last_events = next_aging = time.monotonic()
        while not self._stop.is_set():
            try:
                events = self._rx_epoll.poll(_IDLE_WAIT)
            except (OSError, ValueError):
                return
            fp = self._fp
            if events and fp is not None:
                for _ in range(_BUSY_POLLS):
                    try:
                        n = fp.poll_rx()
                    except Exception:
                        log.exception("rx")
                        break
                    if n == 0:
                        break
            if time.monotonic() - last_events > _EVENT_PERIOD:
                last_events = time.monotonic()
                self._collect_events()
                self._checkpoint_seqs()
                if fp is not None and self._uplink_cfg is not None and \
                        self._uplink_cfg.fdb_learning and last_events > next_aging:
                    fp.fdb_age(_FDB_MAX_AGE_NS)
                    next_aging = last_events + _FDB_MAX_AGE_NS / 1e9 / 10

    def _checkpoint_seqs(self) -> None:
        """Keep every outbound SA's mark on disk ahead of its sequence counter."""
        if self._seq is None:
            return
        for (scope, d, spi), (_sa, obj) in list(self._sas.items()):
            if d == "out":
                self._seq.advance(SeqState.key(scope, spi), int(obj.seq))
        try:
            self._seq.flush()
        except OSError:
            pass            # logged by SeqState; tried again next period

    def _collect_events(self) -> None:
        for (scope, d, spi), (_sa, obj) in list(self._sas.items()):
            for name in obj.pop_events():
                self._sink({"type": _EVENT_TYPES.get(name, "sa-" + name), "scope": scope,
                            "dir": d, "spi": spi})
