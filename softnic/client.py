"""Python client of the admin socket (protocol: docs/admin-protocol.md).

    with softnic.Client("/run/softnic/admin.sock") as c:
        c.sa_add(scope="vm1", dir="out", src="10.0.0.1", dst="10.0.0.2", spi=0x1000,
                 alg="aes-gcm", key=key_bytes, icv_bits=128, reqid=1)
        for ev in c.monitor():          # SA expiry etc., until the loop is left
            ...

Every call returns the reply's `result` or raises `AdminError(code, message, field)`.
Streams (monitor, capture) use a connection of their own, so the client stays usable.
Key arguments may be bytes or "0x..." strings; neither is kept by the client.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import socket
import threading
from collections.abc import Generator
from typing import Any

DEFAULT_SOCKET = "/run/softnic/admin.sock"

__all__ = ["Client", "AdminError", "DEFAULT_SOCKET", "default_socket"]


def default_socket() -> str:
    return os.environ.get("SOFTNIC_SOCKET", DEFAULT_SOCKET)


class AdminError(Exception):
    """The daemon answered with an error (or could not be reached: code "unreachable")."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.code = code
        self.message = message
        self.field = field


def _hexkeys(params: dict[str, Any]) -> dict[str, Any]:
    out = dict(params)
    for k in ("key", "auth_key"):
        if isinstance(out.get(k), bytes | bytearray | memoryview):
            # Hex straight from the caller's buffer: no raw copy is made here (a caller
            # holding its key in a bytearray can wipe it afterwards).
            out[k] = "0x" + memoryview(out[k]).hex()
    return out


class _Conn:
    def __init__(self, path: str, timeout: float | None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise AdminError("unreachable", f"cannot connect to {path}: {e.strerror or e}") \
                from None
        self.buf = bytearray()

    def send(self, msg: dict[str, Any]) -> None:
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise AdminError("unreachable", f"send failed: {e.strerror or e}") from None

    def recv(self) -> dict[str, Any]:
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line = bytes(self.buf[:nl])
                del self.buf[:nl + 1]
                try:
                    msg = json.loads(line)
                except ValueError:
                    raise AdminError("protocol-error", "daemon sent a malformed line") from None
                if not isinstance(msg, dict):
                    raise AdminError("protocol-error", "daemon sent a non-object")
                return msg
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise AdminError("timeout", "no reply from the daemon") from None
            except OSError as e:
                raise AdminError("unreachable", f"receive failed: {e.strerror or e}") from None
            if not chunk:
                raise AdminError("unreachable", "the daemon closed the connection")
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def _result(msg: dict[str, Any]) -> Any:
    if "error" in msg:
        e = msg["error"] if isinstance(msg["error"], dict) else {}
        raise AdminError(str(e.get("code", "error")), str(e.get("message", "")),
                         e.get("field"))
    return msg.get("result")


class Client:
    """A connection to the admin socket. Thread-safe (calls are serialised)."""

    def __init__(self, path: str | None = None, timeout: float | None = 30.0) -> None:
        self.path = path or default_socket()
        self.timeout = timeout
        self._conn: _Conn | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def call(self, method: str, **params: Any) -> Any:
        """Send one request and return its result; raises AdminError."""
        with self._lock:
            if self._conn is None:
                self._conn = _Conn(self.path, self.timeout)
            rid = next(self._ids)
            try:
                self._conn.send({"id": rid, "method": method, "params": params})
                msg = self._conn.recv()
            except AdminError:
                self.close()
                raise
            return _result(msg)

    # --- verbs --------------------------------------------------------------------

    def version(self) -> dict[str, Any]:
        return self.call("version")

    def vf_add(self, **vf: Any) -> dict[str, Any]:
        return self.call("vf.add", **vf)

    def vf_del(self, name: str) -> dict[str, Any]:
        return self.call("vf.del", name=name)

    def vf_list(self) -> list[dict[str, Any]]:
        return self.call("vf.list")

    def vf_show(self, name: str) -> dict[str, Any]:
        return self.call("vf.show", name=name)

    def sa_add(self, **sa: Any) -> dict[str, Any]:
        return self.call("sa.add", **_hexkeys(sa))

    def sa_del(self, scope: str, spi: int, **match: Any) -> dict[str, Any]:
        return self.call("sa.del", scope=scope, spi=spi, **match)

    def sa_get(self, scope: str, spi: int, **match: Any) -> dict[str, Any]:
        return self.call("sa.get", scope=scope, spi=spi, **match)

    def sa_list(self, scope: str | None = None) -> list[dict[str, Any]]:
        return self.call("sa.list", **({} if scope is None else {"scope": scope}))

    def sa_flush(self, scope: str | None = None) -> dict[str, Any]:
        return self.call("sa.flush", **({} if scope is None else {"scope": scope}))

    def policy_add(self, **policy: Any) -> dict[str, Any]:
        return self.call("policy.add", **policy)

    def policy_del(self, **selector: Any) -> dict[str, Any]:
        return self.call("policy.del", **selector)

    def policy_list(self, scope: str | None = None) -> list[dict[str, Any]]:
        return self.call("policy.list", **({} if scope is None else {"scope": scope}))

    def fdb_add(self, vni: int, mac: str, remote: str, replace: bool = False
                ) -> dict[str, Any]:
        return self.call("fdb.add", vni=vni, mac=mac, remote=remote,
                         **({"replace": True} if replace else {}))

    def fdb_del(self, vni: int, mac: str, remote: str) -> dict[str, Any]:
        return self.call("fdb.del", vni=vni, mac=mac, remote=remote)

    def fdb_list(self, vni: int | None = None) -> list[dict[str, Any]]:
        return self.call("fdb.list", **({} if vni is None else {"vni": vni}))

    def stats(self) -> dict[str, Any]:
        return self.call("stats")

    def metrics(self) -> str:
        """Stats in the Prometheus text format."""
        return str(self.call("stats", format="prometheus")["text"])

    def reload(self) -> dict[str, Any]:
        return self.call("reload")

    def capture_stop(self, handle: int) -> dict[str, Any]:
        return self.call("capture.stop", capture=handle)

    # --- streams ------------------------------------------------------------------

    def _stream(self, method: str, params: dict[str, Any]
                ) -> Generator[dict[str, Any], None, None]:
        conn = _Conn(self.path, None)
        try:
            conn.send({"id": 1, "method": method, "params": params})
            first = conn.recv()
            yield {"start": _result(first)}
            while True:
                yield conn.recv()
        finally:
            conn.close()

    def monitor(self, types: list[str] | None = None
                ) -> Generator[dict[str, Any], None, None]:
        """Yield events until the generator is closed (or the daemon goes away)."""
        params: dict[str, Any] = {} if types is None else {"types": types}
        stream = self._stream("monitor", params)
        try:
            next(stream)  # the subscription's acknowledgement (or AdminError)
            for msg in stream:
                if "event" in msg:
                    yield msg["event"]
        finally:
            stream.close()

    def capture(self, scope: str, count: int = 0, snaplen: int = 65535
                ) -> Generator[tuple[float, bytes, int], None, None]:
        """Yield (time, frame, original length) seen on a VF or "uplink"; stops after
        `count` frames (0: until closed). The last frame count is in `capture_summary`."""
        stream = self._stream("capture.start", {"scope": scope, "count": count,
                                                 "snaplen": snaplen})
        try:
            start = next(stream)["start"]
            self.capture_handle = start.get("capture")
            for msg in stream:
                if "packet" in msg:
                    p = msg["packet"]
                    yield float(p["time"]), base64.b64decode(p["data"]), int(p["len"])
                elif "end" in msg:
                    self.capture_summary = msg["end"]
                    return
                elif "error" in msg:
                    _result(msg)
        finally:
            stream.close()

    def capture_pcap(self, scope: str, path: str, count: int = 0,
                     snaplen: int = 65535) -> int:
        """Capture into a pcap file (Ethernet link type), written with dpkt. Returns the
        number of frames written."""
        import dpkt

        n = 0
        with open(path, "wb") as f:
            w = dpkt.pcap.Writer(f, snaplen=snaplen, linktype=dpkt.pcap.DLT_EN10MB)
            for ts, frame, _orig in self.capture(scope, count, snaplen):
                w.writepkt(frame, ts=ts)
                f.flush()
                n += 1
        return n
