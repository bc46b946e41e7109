"""Outbound ESP sequence numbers that survive a restart.

A static SA (keys from the config file, no IKE) that starts again at sequence number 1
after a daemon restart is dead to its peer: the peer's inbound SA has seen those numbers
and drops them as replays (RFC 4303 §3.4.3) until someone re-keys by hand. So the daemon
keeps, per outbound SA, a high-water mark on disk that no sequence number sent can pass:
an SA starts at its saved mark (or 0), and its mark is then written STEP ahead before a
single packet goes out; a worker thread moves the mark on, STEP ahead of the SA's
counter, whenever the counter comes within STEP / 2 of it. A crash therefore loses at
most STEP numbers per restart (of 2^32 without ESN: 64 restarts), never sends one twice.

The file holds SA identities and numbers only: no key, nothing derived from one. It is
replaced atomically (write, fsync, rename, fsync of the directory).
"""

from __future__ import annotations

import json
import logging
import os
import threading

log = logging.getLogger("softnic.seqstate")

STEP = 1 << 26          # 67 M: at 0.5 s between checks, safe to 130 M packets/s per SA
SEQ_MAX_32 = 0xFFFFFFFF
SEQ_MAX_ESN = 0xFFFFFFFFFFFFFFFF
_VERSION = 1


class SeqState:
    """The marks of one daemon, in the JSON file at `path`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._marks: dict[str, int] = {}
        self._dirty = False
        try:
            with open(path) as f:
                doc = json.load(f)
            if not isinstance(doc, dict) or doc.get("version") != _VERSION or \
                    not isinstance(doc.get("sa"), dict):
                raise ValueError("not a softnic sequence-number file")
            self._marks = {str(k): int(v) for k, v in doc["sa"].items()
                           if isinstance(v, int) and v >= 0}
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            # Starting from 0 only costs replays at the peer (IVs are masked per SA
            # instance, so no nonce repeats): say so and go on.
            log.warning("%s: %s; outbound sequence numbers start at 1", path, e)

    @staticmethod
    def key(scope: str, spi: int) -> str:
        return f"{scope}/{spi:08x}"

    def start(self, key: str, esn: bool) -> int:
        """The last sequence number to count as sent for a new outbound SA (its first
        packet gets this + 1); its new mark is on disk when this returns."""
        top = SEQ_MAX_ESN if esn else SEQ_MAX_32
        with self._lock:
            begin = min(self._marks.get(key, 0), top)
            self._marks[key] = min(begin + STEP, top)
            self._save()
        return begin

    def advance(self, key: str, seq: int) -> None:
        """The SA has sent up to seq: move its mark on if seq is near it (saved by
        flush())."""
        with self._lock:
            mark = self._marks.get(key)
            if mark is not None and seq + STEP // 2 > mark:
                self._marks[key] = seq + STEP
                self._dirty = True

    def forget(self, key: str) -> None:
        with self._lock:
            if self._marks.pop(key, None) is not None:
                self._dirty = True

    def flush(self) -> None:
        with self._lock:
            if self._dirty:
                self._save()

    def marks(self) -> dict[str, int]:
        with self._lock:
            return dict(self._marks)

    def _save(self) -> None:
        tmp = f"{self.path}.tmp"
        data = json.dumps({"version": _VERSION, "sa": self._marks}, sort_keys=True)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700,
                        exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            self._dirty = False
        except OSError as e:
            log.error("%s: cannot save outbound sequence numbers: %s", self.path, e)
            raise
