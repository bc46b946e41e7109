"""The admin socket: JSON messages, one per line (JSON Lines), over a Unix stream socket.

The protocol is documented in docs/admin-protocol.md. Request and reply shapes follow
JSON-RPC 2.0's (id / method / params -> id / result | error) without its envelope; errors
carry a string `code`, a `message` and, for a rejected value, the `field` it names.

The socket is a security boundary (unix(7)): it is created mode 0600 (0660 with a
configured group) inside a private directory and renamed into place, so it is never
reachable with a wider mode; every connection's SO_PEERCRED must be uid 0, the daemon's
uid, or (with a group) a member of that group. Each connection has its own thread, a
bound on the connection count, a message size limit, a deadline to finish a started line,
an idle timeout and a send timeout: a slow, silent or malicious client holds only its own
thread, never the controller lock (which is only taken while a change is applied).
Key bytes are never in a reply, an event or a log line; requests are logged by method only.
"""

from __future__ import annotations

import base64
import grp
import json
import logging
import os
import queue
import select
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from vhost import sockfile

from . import __version__
from .control import ControlError, Controller, scrub
from .model import SA, UPLINK, VF, Daemon, FdbEntry, Policy, ValidationError, _int

log = logging.getLogger("softnic.admin")

PROTOCOL_VERSION = 1
MAX_MESSAGE = 64 * 1024
_UCRED = struct.Struct("3i")

__all__ = ["AdminServer", "MetricsServer", "PROTOCOL_VERSION", "MAX_MESSAGE"]


class _ConnClosed(Exception):
    pass


def _params(p: Any, allowed: set[str], required: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(p, dict):
        raise ControlError("invalid-params", "params must be an object", "params")
    for k in p:
        if k not in allowed:
            raise ControlError("invalid-params", "unknown parameter", str(k)[:64])
    for k in required:
        if k not in p:
            raise ControlError("invalid-params", "is required", k)
    return p


def _scope(p: dict[str, Any], required: bool = True) -> str | None:
    s = p.get("scope")
    if s is None and not required:
        return None
    if not isinstance(s, str) or not s:
        raise ControlError("invalid-params", f"must be a VF name or '{UPLINK}'", "scope")
    return s


def _spi(v: Any) -> int:
    try:
        return _int(v, "spi", 256, 0xFFFFFFFF)
    except ValidationError as e:
        raise ControlError.invalid(e) from None


def _sa_filter(p: dict[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if p.get("dir") is not None:
        if p["dir"] not in ("in", "out"):
            raise ControlError("invalid-params", "must be in|out", "dir")
        kw["dir"] = p["dir"]
    for f in ("src", "dst"):
        if p.get(f) is not None:
            if not isinstance(p[f], str):
                raise ControlError("invalid-params", "must be an address", f)
            kw[f] = p[f]
    return kw


def _build(cls: Any, p: Any) -> Any:
    try:
        return cls.from_dict(p, "")
    except ValidationError as e:
        raise ControlError.invalid(e) from None


class AdminServer:
    """Serves a Controller on a Unix socket. start() returns once the socket is listening;
    stop() closes the listener and every connection and removes the socket file."""

    def __init__(self, controller: Controller, path: str, *, group: str | None = None,
                 max_clients: int = 64, max_message: int = MAX_MESSAGE,
                 line_timeout: float = 10.0, idle_timeout: float = 600.0,
                 send_timeout: float = 10.0) -> None:
        self.ctl = controller
        self.path = path
        self.group = group
        self.max_message = max_message
        self.line_timeout = line_timeout
        self.idle_timeout = idle_timeout
        self.send_timeout = send_timeout
        self._slots = threading.BoundedSemaphore(max_clients)
        self._sock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._gid: int | None = None
        self._file: sockfile.SocketFile | None = None
        self._methods: dict[str, Callable[[Any], Any]] = {
            "version": self._version,
            "vf.add": lambda p: self.ctl.add_vf(_build(VF, p)),
            "vf.del": self._vf_del, "vf.list": self._vf_list, "vf.show": self._vf_show,
            "sa.add": lambda p: self.ctl.add_sa(_build(SA, p)),
            "sa.del": self._sa_del, "sa.get": self._sa_get, "sa.list": self._sa_list,
            "sa.flush": self._sa_flush,
            "policy.add": lambda p: self.ctl.add_policy(_build(Policy, p)),
            "policy.del": self._policy_del, "policy.list": self._policy_list,
            "fdb.add": self._fdb_add,
            "fdb.del": lambda p: self.ctl.del_fdb(_build(FdbEntry, p)),
            "fdb.list": self._fdb_list,
            "stats": self._stats, "reload": self._reload,
            "capture.stop": self._capture_stop,
        }
        # Methods that turn the connection into a stream; they do their own replies.
        self._streams: dict[str, Callable[[socket.socket, Any, Any], None]] = {
            "monitor": self._monitor, "capture.start": self._capture,
        }

    @classmethod
    def from_config(cls, controller: Controller, daemon: Daemon) -> AdminServer:
        """The server the `[daemon]` table describes (not started)."""
        return cls(controller, daemon.admin_socket, group=daemon.admin_group,
                   max_clients=daemon.admin_max_clients)

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        if self.group is not None:
            try:
                self._gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                raise ControlError("invalid-params", "no such group", "admin_group") from None
        self._sock = self._bind()
        self._thread = threading.Thread(target=self._accept_loop, name="admin-accept",
                                        daemon=True)
        self._thread.start()
        log.info("admin socket listening on %s", self.path)

    def _bind(self) -> socket.socket:
        # vhost.sockfile: bound in a private directory with its final mode, then moved into
        # place; a dead daemon's leftover socket is replaced, a live one or anything that
        # is not a socket of ours is refused (OSError) and left alone.
        sock, self._file = sockfile.listen(
            self.path, mode=0o660 if self._gid is not None else 0o600,
            gid=-1 if self._gid is None else self._gid, backlog=64, create_dir=True)
        return sock

    def stop(self) -> None:
        self._stopping.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
        if self._file is not None:
            self._file.remove()  # only if the path still holds the socket we made
            self._file = None

    def __enter__(self) -> AdminServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- connections --------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._sock is not None
        last_error = 0.0
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except (InterruptedError, ConnectionAbortedError):
                continue
            except OSError as e:
                if self._stopping.is_set():
                    return
                # EMFILE and friends: the client waits in the backlog; back off and take
                # it once there is room (said at most once a second).
                now = time.monotonic()
                if now - last_error >= 1.0:
                    log.warning("admin: accept failed: %s (still listening)",
                                e.strerror or e)
                    last_error = now
                time.sleep(0.05)
                continue
            if not self._slots.acquire(blocking=False):
                self._refuse(conn, "busy", "too many connections")
                continue
            try:
                threading.Thread(target=self._conn_main, args=(conn,), name="admin-conn",
                                 daemon=True).start()
            except RuntimeError:  # no thread to be had: this client is refused, not all
                self._slots.release()
                self._refuse(conn, "busy", "cannot serve a connection now")

    def _refuse(self, conn: socket.socket, code: str, message: str) -> None:
        try:
            conn.settimeout(1.0)
            conn.sendall(json.dumps({"id": None, "error": {"code": code,
                                                           "message": message}}).encode() + b"\n")
        except OSError:
            pass
        conn.close()

    def _peer_allowed(self, conn: socket.socket) -> tuple[bool, int]:
        pid, uid, gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      _UCRED.size))
        if uid == 0 or uid == os.geteuid():
            return True, uid
        if self._gid is not None:
            if gid == self._gid:
                return True, uid
            try:  # supplementary groups of the peer process
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("Groups:"):
                            if str(self._gid) in line.split()[1:]:
                                return True, uid
            except OSError:
                pass
        return False, uid

    def _conn_main(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.add(conn)
        try:
            ok, uid = self._peer_allowed(conn)
            if not ok:
                log.warning("admin: refused connection from uid %d", uid)
                self._refuse(conn, "permission-denied", "not allowed to use this socket")
                return
            self._serve(conn, uid)
        except (_ConnClosed, OSError):
            pass
        except Exception:  # noqa: BLE001 - one broken connection never kills the server
            log.exception("admin: connection handler failed")
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            conn.close()
            self._slots.release()

    def _send(self, conn: socket.socket, msg: dict[str, Any]) -> None:
        data = json.dumps(msg, separators=(",", ":"), default=str).encode() + b"\n"
        conn.settimeout(self.send_timeout)
        try:
            conn.sendall(data)
        except (TimeoutError, OSError):
            raise _ConnClosed() from None

    def _read_line(self, conn: socket.socket, buf: bytearray) -> bytes | None:
        """The next line (without newline), or None on EOF. A started line must complete
        within line_timeout; an idle connection closes after idle_timeout."""
        deadline: float | None = None
        while True:
            nl = buf.find(b"\n")
            if nl >= 0:
                line = bytes(buf[:nl])
                del buf[:nl + 1]
                return line
            if len(buf) > self.max_message:
                self._send(conn, {"id": None, "error": {
                    "code": "too-large", "message": f"message exceeds {self.max_message} bytes"}})
                raise _ConnClosed()
            now = time.monotonic()
            if buf and deadline is None:
                deadline = now + self.line_timeout
            timeout = self.idle_timeout if deadline is None else deadline - now
            if timeout <= 0:
                self._send(conn, {"id": None, "error": {
                    "code": "timeout", "message": "incomplete message"}})
                raise _ConnClosed()
            conn.settimeout(timeout)
            try:
                chunk = conn.recv(min(65536, self.max_message + 1 - len(buf)) or 1)
            except TimeoutError:
                if deadline is None:
                    raise _ConnClosed() from None  # idle
                continue
            if not chunk:
                return None  # EOF; a half line is dropped, there is no one to answer
            buf += chunk

    def _serve(self, conn: socket.socket, uid: int) -> None:
        buf = bytearray()
        while not self._stopping.is_set():
            line = self._read_line(conn, buf)
            if line is None:
                return
            if not line.strip():
                continue
            rid, reply = self._handle(conn, line, uid)
            if reply is not None:
                self._send(conn, reply)

    def _handle(self, conn: socket.socket, line: bytes, uid: int
                ) -> tuple[Any, dict[str, Any] | None]:
        try:
            req = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested too deep
            return None, {"id": None, "error": {"code": "parse-error",
                                                "message": "not a JSON object"}}
        if not isinstance(req, dict):
            return None, {"id": None, "error": {"code": "invalid-request",
                                                "message": "not a JSON object"}}
        rid = req.get("id")
        if isinstance(rid, bool) or not (rid is None or isinstance(rid, int)
                                         or isinstance(rid, str) and len(rid) <= 128):
            return None, {"id": None, "error": {"code": "invalid-request",
                                                "message": "id must be a string or integer",
                                                "field": "id"}}
        method = req.get("method")
        params = req.get("params", {})
        extra = set(req) - {"id", "method", "params"}
        if extra:
            return rid, {"id": rid, "error": {"code": "invalid-request",
                                              "message": "unknown member",
                                              "field": sorted(extra)[0][:64]}}
        if not isinstance(method, str) or (method not in self._methods
                                           and method not in self._streams):
            return rid, {"id": rid, "error": {"code": "method-not-found",
                                              "message": "unknown method", "field": "method"}}
        t0 = time.monotonic()
        try:
            if method in self._streams:
                self._streams[method](conn, rid, params)
                log.info("admin: uid %d %s done", uid, method)
                return rid, None
            result = self._methods[method](params)
            log.info("admin: uid %d %s ok (%.1f ms)", uid, method,
                     1e3 * (time.monotonic() - t0))
            return rid, {"id": rid, "result": result}
        except ControlError as e:
            log.info("admin: uid %d %s failed: %s %s", uid, method, e.code, e.field or "")
            err: dict[str, Any] = {"code": e.code, "message": scrub(e.message)}
            if e.field:
                err["field"] = e.field
            return rid, {"id": rid, "error": err}
        except _ConnClosed:
            raise
        except Exception as e:  # noqa: BLE001 - a bug answers an error, never kills the conn
            log.error("admin: uid %d %s internal error: %s", uid, method,
                      scrub(f"{type(e).__name__}: {e}"))
            return rid, {"id": rid, "error": {"code": "internal-error",
                                              "message": "internal error (see daemon log)"}}

    # --- methods ------------------------------------------------------------------

    def _version(self, p: Any) -> Any:
        _params(p, set())
        return {"version": __version__, "protocol": PROTOCOL_VERSION,
                "methods": sorted(list(self._methods) + list(self._streams)),
                "consistent": not self.ctl.broken}

    def _vf_del(self, p: Any) -> Any:
        p = _params(p, {"name"}, ("name",))
        return self.ctl.del_vf(str(p["name"]))

    def _vf_list(self, p: Any) -> Any:
        _params(p, set())
        return self.ctl.list_vfs()

    def _vf_show(self, p: Any) -> Any:
        p = _params(p, {"name"}, ("name",))
        return self.ctl.show_vf(str(p["name"]))

    _SA_ID = {"scope", "spi", "dir", "src", "dst"}

    def _sa_del(self, p: Any) -> Any:
        p = _params(p, self._SA_ID, ("scope", "spi"))
        return self.ctl.del_sa(_scope(p) or "", _spi(p["spi"]), **_sa_filter(p))

    def _sa_get(self, p: Any) -> Any:
        p = _params(p, self._SA_ID, ("scope", "spi"))
        return self.ctl.get_sa(_scope(p) or "", _spi(p["spi"]), **_sa_filter(p))

    def _sa_list(self, p: Any) -> Any:
        p = _params(p, {"scope"})
        return self.ctl.list_sas(_scope(p, required=False))

    def _sa_flush(self, p: Any) -> Any:
        p = _params(p, {"scope"})
        return self.ctl.flush_sas(_scope(p, required=False))

    def _policy_del(self, p: Any) -> Any:
        p = _params(p, {"scope", "dir", "src", "dst", "proto", "sport", "dport"},
                    ("scope", "dir", "src", "dst"))
        return self.ctl.del_policy(_build(Policy, dict(p, action="bypass")))

    def _policy_list(self, p: Any) -> Any:
        p = _params(p, {"scope"})
        return self.ctl.list_policies(_scope(p, required=False))

    def _fdb_add(self, p: Any) -> Any:
        p = _params(p, {"vni", "mac", "remote", "replace"})
        replace = p.pop("replace", False)
        if not isinstance(replace, bool):
            raise ControlError("invalid-params", "must be true or false", "replace")
        return self.ctl.add_fdb(_build(FdbEntry, p), replace)

    def _fdb_list(self, p: Any) -> Any:
        p = _params(p, {"vni"})
        vni = p.get("vni")
        if vni is not None:
            try:
                vni = _int(vni, "vni", 0, (1 << 24) - 1)
            except ValidationError as e:
                raise ControlError.invalid(e) from None
        return self.ctl.list_fdb(vni)

    def _stats(self, p: Any) -> Any:
        p = _params(p, {"format"})
        fmt = p.get("format", "json")
        if fmt == "prometheus":
            return {"text": self.ctl.metrics_text()}
        if fmt != "json":
            raise ControlError("invalid-params", "must be json|prometheus", "format")
        return self.ctl.stats()

    def _reload(self, p: Any) -> Any:
        _params(p, set())
        return self.ctl.reload()

    def _capture_stop(self, p: Any) -> Any:
        p = _params(p, {"capture"}, ("capture",))
        if isinstance(p["capture"], bool) or not isinstance(p["capture"], int):
            raise ControlError("invalid-params", "must be a capture handle", "capture")
        self.ctl.capture_stop(p["capture"])
        return {"stopped": p["capture"]}

    # --- streams ------------------------------------------------------------------

    def _peer_gone(self, conn: socket.socket) -> bool:
        """True if the client closed its side; anything it sends meanwhile is discarded.
        Never blocks (a socket timeout would make recv wait first, hence the select)."""
        try:
            readable, _, _ = select.select([conn], [], [], 0)
            if not readable:
                return False
            conn.settimeout(0)
            data = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return False
        except (OSError, ValueError):
            return True
        return not data

    def _monitor(self, conn: socket.socket, rid: Any, p: Any) -> None:
        p = _params(p, {"types", "max_queue"})
        types = p.get("types")
        if types is not None and (not isinstance(types, list)
                                  or not all(isinstance(t, str) for t in types)):
            raise ControlError("invalid-params", "must be a list of event types", "types")
        maxq = p.get("max_queue", 1024)
        if isinstance(maxq, bool) or not isinstance(maxq, int) or not 1 <= maxq <= 65536:
            raise ControlError("invalid-params", "must be in 1..65536", "max_queue")
        with self.ctl.subscribe(maxq, types) as sub:
            self._send(conn, {"id": rid, "result": {"monitoring": True}})
            while not self._stopping.is_set():
                for ev in sub.get(timeout=0.5):
                    self._send(conn, {"event": ev})
                if self._peer_gone(conn):
                    return

    def _capture(self, conn: socket.socket, rid: Any, p: Any) -> None:
        """Stream frames seen on a VF or the uplink. The client writes the pcap (with its
        own permissions: the daemon never opens a path a client names)."""
        p = _params(p, {"scope", "count", "snaplen", "max_queue"}, ("scope",))
        scope = _scope(p) or ""
        try:
            count = _int(p.get("count", 0), "count", 0, 1 << 32)
            snaplen = _int(p.get("snaplen", 65535), "snaplen", 64, 262144)
            maxq = _int(p.get("max_queue", 4096), "max_queue", 1, 65536)
        except ValidationError as e:
            raise ControlError.invalid(e) from None
        q: queue.Queue[tuple[float, bytes, int]] = queue.Queue(maxq)
        dropped = [0]

        def sink(ts: float, frame: bytes) -> None:  # datapath thread: never blocks
            try:
                q.put_nowait((ts, bytes(frame[:snaplen]), len(frame)))
            except queue.Full:
                dropped[0] += 1

        handle = self.ctl.capture_start(scope, sink, snaplen)
        sent = 0
        try:
            self._send(conn, {"id": rid, "result": {"capture": handle, "linktype": 1,
                                                    "snaplen": snaplen}})
            while not self._stopping.is_set() and (count == 0 or sent < count):
                try:
                    ts, data, orig = q.get(timeout=0.5)
                except queue.Empty:
                    if not self.ctl.capture_active(handle) or self._peer_gone(conn):
                        break
                    continue
                self._send(conn, {"packet": {"time": ts, "len": orig,
                                             "data": base64.b64encode(data).decode()}})
                sent += 1
        finally:
            if self.ctl.capture_active(handle):
                try:
                    self.ctl.capture_stop(handle)
                except ControlError:
                    pass
        self._send(conn, {"id": rid, "end": {"packets": sent, "dropped": dropped[0]}})


class _HttpConn:
    __slots__ = ("sock", "deadline", "buf", "out")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buf = bytearray()
        self.out: memoryview | None = None


class MetricsServer:
    """Optional HTTP listener for Prometheus: GET /metrics (an HTTP/1.0 subset of RFC 9112:
    one request per connection, then close). It serves counters only, never configuration
    or keys; a bare port in the config is bound to loopback.

    It must never cost the daemon more than a few descriptors, whoever connects: one thread
    and one selector serve every connection (an idle client costs a socket, never a
    thread); at most `max_clients` are open at once and any more are closed on arrival; a
    client has `timeout` seconds to send its request head (at most `max_request` bytes) and
    `timeout` more to read the answer, then it is closed. An accept() error (EMFILE,
    ENFILE, ENOBUFS) pauses accepting for a moment, never ends the listener."""

    def __init__(self, controller: Controller, host: str, port: int, *,
                 max_clients: int = 32, timeout: float = 5.0,
                 max_request: int = 8192) -> None:
        self.ctl = controller
        self.max_clients = max_clients
        self.timeout = timeout
        self.max_request = max_request
        self.refused = 0           # connections closed on arrival: the cap was reached
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._lsock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._lsock.bind((host, port))
            self._lsock.listen(128)
            self._lsock.setblocking(False)
        except BaseException:
            self._lsock.close()
            raise
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics", daemon=True)

    @classmethod
    def from_config(cls, controller: Controller, daemon: Daemon) -> MetricsServer | None:
        """The listener `[daemon] metrics_listen` asks for, or None (not started)."""
        if not daemon.metrics_listen:
            return None
        host, _, port = daemon.metrics_listen.rpartition(":")
        return cls(controller, host.strip("[]"), int(port))

    @property
    def port(self) -> int:
        return int(self._lsock.getsockname()[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(5)
        for s in (self._lsock, self._wake_r, self._wake_w):
            s.close()

    # --- the loop -----------------------------------------------------------------

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        conns: dict[int, _HttpConn] = {}
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        sel.register(self._lsock, selectors.EVENT_READ, None)
        paused_until: float | None = None
        last_error = 0.0
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                if paused_until is not None and now >= paused_until:
                    sel.register(self._lsock, selectors.EVENT_READ, None)
                    paused_until = None
                wake = min([c.deadline for c in conns.values()]
                           + ([paused_until] if paused_until is not None else [])
                           + [now + 1.0])
                for key, mask in sel.select(max(0.0, wake - now)):
                    now = time.monotonic()
                    if key.fileobj is self._wake_r:
                        continue
                    if key.fileobj is self._lsock:
                        err = self._accept(sel, conns, now)
                        if err is not None:
                            # The pending clients wait in the backlog (no descriptor of
                            # ours); try again shortly.
                            sel.unregister(self._lsock)
                            paused_until = now + 0.1
                            if now - last_error >= 1.0:
                                log.warning("metrics: accept failed: %s (still listening)",
                                            err.strerror or err)
                                last_error = now
                        continue
                    c = key.data
                    if c.sock.fileno() in conns:
                        self._io(sel, conns, c, mask, now)
                now = time.monotonic()
                for c in [c for c in conns.values() if c.deadline <= now]:
                    self._close(sel, conns, c)     # too slow to ask, or to read the answer
        finally:
            for c in list(conns.values()):
                self._close(sel, conns, c)
            sel.close()

    def _accept(self, sel: selectors.BaseSelector, conns: dict[int, _HttpConn],
                now: float) -> OSError | None:
        for _ in range(64):      # then let the open connections have their turn
            try:
                s, _ = self._lsock.accept()
            except BlockingIOError:
                return None
            except (InterruptedError, ConnectionAbortedError):
                continue
            except OSError as e:
                return e
            if len(conns) >= self.max_clients:
                self.refused += 1
                s.close()
                continue
            s.setblocking(False)
            c = _HttpConn(s, now + self.timeout)
            conns[s.fileno()] = c
            sel.register(s, selectors.EVENT_READ, c)
        return None

    def _close(self, sel: selectors.BaseSelector, conns: dict[int, _HttpConn],
               c: _HttpConn) -> None:
        conns.pop(c.sock.fileno(), None)
        try:
            sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()

    def _io(self, sel: selectors.BaseSelector, conns: dict[int, _HttpConn], c: _HttpConn,
            mask: int, now: float) -> None:
        try:
            if c.out is None:
                data = c.sock.recv(4096)
                if not data:
                    self._close(sel, conns, c)
                    return
                c.buf += data
                end = c.buf.find(b"\r\n\r\n")
                if end < 0:
                    end = c.buf.find(b"\n\n")
                if end < 0 and len(c.buf) <= self.max_request:
                    return
                c.out = memoryview(self._answer(bytes(c.buf[:max(end, 0)])
                                                if end >= 0 else None))
                c.deadline = now + self.timeout
                sel.modify(c.sock, selectors.EVENT_WRITE, c)
            n = c.sock.send(c.out)
            c.out = c.out[n:]
            if not c.out:
                self._close(sel, conns, c)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(sel, conns, c)

    def _answer(self, head: bytes | None) -> bytes:
        if head is None:
            return self._response(431, "Request Header Fields Too Large", b"")
        words = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split()
        if len(words) != 3 or not words[2].startswith(b"HTTP/"):
            return self._response(400, "Bad Request", b"")
        method, target = words[0], words[1]
        if method not in (b"GET", b"HEAD"):
            return self._response(405, "Method Not Allowed", b"")
        if target.split(b"?")[0] != b"/metrics":
            return self._response(404, "Not Found", b"")
        try:
            body = self.ctl.metrics_text().encode()
        except ControlError:
            return self._response(503, "Service Unavailable", b"")
        except Exception:  # noqa: BLE001 - a bug answers 500, the listener lives on
            log.exception("metrics: building the answer failed")
            return self._response(500, "Internal Server Error", b"")
        return self._response(200, "OK", body, head_only=method == b"HEAD")

    @staticmethod
    def _response(code: int, reason: str, body: bytes, head_only: bool = False) -> bytes:
        ctype = "text/plain; version=0.0.4" if code == 200 else "text/plain"
        head = (f"HTTP/1.0 {code} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        return head if head_only else head + body
