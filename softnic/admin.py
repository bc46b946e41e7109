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
import errno
import grp
import http.server
import json
import logging
import os
import queue
import select
import socket
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

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
        parent = os.path.dirname(os.path.abspath(self.path)) or "/"
        os.makedirs(parent, mode=0o755, exist_ok=True)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(errno.EEXIST, f"{self.path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
                raise OSError(errno.EADDRINUSE, f"{self.path}: another daemon is listening")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(self.path)  # stale socket of a dead daemon
            finally:
                probe.close()
        # Bind inside a fresh 0700 directory, fix the mode, then rename into place: there
        # is no moment at which the socket is reachable with a wider mode.
        tmpdir = tempfile.mkdtemp(prefix=".admin-", dir=parent)
        tmp = os.path.join(tmpdir, "s")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(tmp)
            if self._gid is not None:
                os.chown(tmp, -1, self._gid)
                os.chmod(tmp, 0o660)
            else:
                os.chmod(tmp, 0o600)
            s.listen(64)
            os.rename(tmp, self.path)
        except BaseException:
            s.close()
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        finally:
            os.rmdir(tmpdir)
        return s

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
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> AdminServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- connections --------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)  # EMFILE and friends: back off, keep serving
                continue
            if not self._slots.acquire(blocking=False):
                self._refuse(conn, "busy", "too many connections")
                continue
            threading.Thread(target=self._conn_main, args=(conn,), name="admin-conn",
                             daemon=True).start()

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


class MetricsServer:
    """Optional HTTP listener for Prometheus: GET /metrics. Bind it to loopback or a
    management network; it serves counters only, never configuration or keys."""

    def __init__(self, controller: Controller, host: str, port: int) -> None:
        ctl = controller

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                try:
                    body = ctl.metrics_text().encode()
                except ControlError:
                    self.send_error(503)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("metrics: " + fmt, *args)

        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class Server(http.server.ThreadingHTTPServer):
            address_family = family
            daemon_threads = True

        self.httpd = Server((host, port), Handler)
        self.httpd.timeout = 5
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics",
                                        daemon=True)

    @classmethod
    def from_config(cls, controller: Controller, daemon: Daemon) -> MetricsServer | None:
        """The listener `[daemon] metrics_listen` asks for, or None (not started)."""
        if not daemon.metrics_listen:
            return None
        host, _, port = daemon.metrics_listen.rpartition(":")
        return cls(controller, host.strip("[]"), int(port))

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
