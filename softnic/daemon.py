"""`softnic run -c CONFIG.toml`: the daemon in the foreground.

Start order: core dumps off (the process holds keys), configuration (validated whole; a
file holding keys must be private, config.load(private=True); an error names the field
and nothing starts), the instance lock beside the admin socket (a second daemon on the
same socket stops there, in one line, having touched nothing), the data plane with every
object of the file, the admin socket, the metrics listener, then the workers.
SIGINT/SIGTERM stop it cleanly (every TAP, socket and thread released; only files this
process made are removed); SIGHUP reloads the file, applying only what changed.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import grp
import logging
import os
import pwd
import signal
import stat
import sys
import threading
from types import FrameType

from softnic import config as configmod
from softnic.admin import AdminServer, MetricsServer
from softnic.control import ControlError, Controller
from softnic.dataplane import Dataplane
from softnic.model import Daemon
from vhost import sockfile

log = logging.getLogger("softnic")

PR_SET_DUMPABLE = 4  # prctl(2)


def no_core_dumps() -> bool:
    """prctl(PR_SET_DUMPABLE, 0): no core file of this process (it would hold every key),
    and no ptrace or /proc/PID/mem access by anyone but root. True if it took."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class AlreadyRunning(Exception):
    def __init__(self, pid: int | None) -> None:
        super().__init__(f"pid {pid}" if pid else "pid unknown")
        self.pid = pid


class InstanceLock:
    """An flock(2)ed file beside the admin socket, held for the daemon's life: a second
    daemon with the same admin socket finds it locked and stops before it touches
    anything. The file holds the holder's pid (for the error line); it is created with
    O_NOFOLLOW in a directory vhost.sockfile.open_dir trusts, and removed at exit only
    while it is still the file this process locked."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._ident: tuple[int, int] | None = None

    def acquire(self) -> None:
        parent, name = os.path.split(self.path)
        dfd = sockfile.open_dir(parent, create=True)
        try:
            while True:
                try:
                    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 0o644, dir_fd=dfd)
                except OSError as e:
                    if e.errno == errno.ELOOP:
                        raise OSError(e.errno, f"{self.path}: is a symbolic link") from None
                    raise
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, os.geteuid()):
                    os.close(fd)
                    raise OSError(errno.EEXIST, f"{self.path}: not a lock file of this"
                                  " daemon's user (left alone)")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                    os.close(fd)
                    raise AlreadyRunning(int(text) if text.isdigit() else None) from None
                # A daemon that was stopping may have removed the file between our open
                # and our lock: then we hold a lock nobody else can see. Retry.
                try:
                    now = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    os.close(fd)
                    continue
                if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    os.close(fd)
                    continue
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._fd, self._ident = fd, (st.st_dev, st.st_ino)
                return
        finally:
            os.close(dfd)

    def release(self) -> None:
        if self._fd is None:
            return
        # Removed while still locked, and only if it is our file: the next daemon then
        # either opens it before the unlink (and retries, see acquire) or makes a new one.
        if self._ident is not None:
            sockfile.SocketFile(self.path, *self._ident).remove()
        os.close(self._fd)
        self._fd = None


def socket_owner(d: Daemon) -> tuple[int, int, int]:
    """(mode, uid, gid) for server-mode VF sockets from [daemon] vhost_socket_*
    (-1: the daemon's own). Raises ValueError naming the field."""
    uid = gid = -1
    if d.vhost_socket_user is not None:
        try:
            uid = pwd.getpwnam(d.vhost_socket_user).pw_uid
        except KeyError:
            raise ValueError("daemon.vhost_socket_user: no such user") from None
    if d.vhost_socket_group is not None:
        try:
            gid = grp.getgrnam(d.vhost_socket_group).gr_gid
        except KeyError:
            raise ValueError("daemon.vhost_socket_group: no such group") from None
    return d.vhost_mode, uid, gid


def run(path: str, ready: threading.Event | None = None,
        stop: threading.Event | None = None) -> int:
    if not no_core_dumps():
        log.warning("could not turn core dumps off (prctl PR_SET_DUMPABLE)")
    try:
        cfg = configmod.load(path, private=True)
    except (configmod.ConfigError, OSError) as e:
        print(f"softnic: {e}", file=sys.stderr)
        return 2
    try:
        perms = socket_owner(cfg.daemon)
    except ValueError as e:
        print(f"softnic: {e}", file=sys.stderr)
        return 2
    lock = InstanceLock(cfg.daemon.lock_file)
    try:
        lock.acquire()
    except AlreadyRunning as e:
        print(f"softnic: already running, {e} (admin socket {cfg.daemon.admin_socket})",
              file=sys.stderr)
        return 1
    except OSError as e:
        print(f"softnic: lock: {e.strerror or e}", file=sys.stderr)
        return 1
    try:
        return _run_locked(path, cfg, perms, ready, stop or threading.Event())
    finally:
        lock.release()


def _run_locked(path: str, cfg: configmod.Config, perms: tuple[int, int, int],
                ready: threading.Event | None, stop: threading.Event) -> int:
    try:
        os.close(sockfile.open_dir(cfg.daemon.vhost_dir, create=True))
    except OSError as e:
        print(f"softnic: vhost_socket_dir: {e.strerror or e}", file=sys.stderr)
        return 2
    try:
        dp = Dataplane(tx_workers=cfg.daemon.tx_workers, seq_state=cfg.daemon.seq_state,
                       vhost_socket=perms,
                       vhost_max_memory=cfg.daemon.vhost_max_memory_mib << 20)
    except OSError as e:
        print(f"softnic: seq_state: {e}", file=sys.stderr)
        return 2
    admin = metrics = None
    ctl: Controller | None = None

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        if ctl is not None:
            ctl.request_reload()

    # Before anything is served: a SIGTERM while the daemon starts (its admin socket may
    # already answer) is a clean stop once the start is done, not a death half-way.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
    try:
        try:
            ctl = Controller(dp, cfg, loader=lambda: configmod.load(path, private=True))
        except ControlError as e:
            print(f"softnic: {e}", file=sys.stderr)
            return 2
        admin = AdminServer.from_config(ctl, cfg.daemon)
        try:
            admin.start()
        except (OSError, ControlError) as e:
            admin = None
            print(f"softnic: admin socket: {getattr(e, 'strerror', None) or e}",
                  file=sys.stderr)
            return 1
        try:
            metrics = MetricsServer.from_config(ctl, cfg.daemon)
        except OSError as e:
            print(f"softnic: metrics_listen: {e.strerror or e}", file=sys.stderr)
            return 1
        if metrics is not None:
            metrics.start()
            log.info("metrics listening on %s port %d", cfg.daemon.metrics_listen,
                     metrics.port)
        dp.start()

        log.info("softnic running: %d VF(s), admin socket %s", len(cfg.vfs),
                 cfg.daemon.admin_socket)
        print(f"softnic: running, admin socket {cfg.daemon.admin_socket}", flush=True)
        if ready is not None:
            ready.set()
        while not stop.wait(0.5):
            pass
        return 0
    finally:
        if metrics is not None:
            metrics.stop()
        if admin is not None:
            admin.stop()
        dp.close()
        log.info("softnic stopped")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="softnic", description="A userspace software NIC.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the daemon in the foreground")
    r.add_argument("-c", "--config", required=True, help="configuration file (TOML)")
    r.add_argument("-v", "--verbose", action="store_true")
    c = sub.add_parser("check", help="validate a configuration file and exit")
    c.add_argument("-c", "--config", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False)
                        else logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.cmd == "check":
        try:
            cfg = configmod.load(args.config, private=True)
        except (configmod.ConfigError, OSError) as e:
            print(f"softnic: {e}", file=sys.stderr)
            return 2
        print(f"{args.config}: ok ({len(cfg.vfs)} VFs, {len(cfg.sas)} SAs, "
              f"{len(cfg.policies)} policies, {len(cfg.fdb)} FDB entries)")
        return 0
    return run(args.config)


if __name__ == "__main__":
    sys.exit(main())
