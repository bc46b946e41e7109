"""Unix socket files made, reused and removed safely (unix(7) "Pathname sockets",
path_resolution(7), openat(2)'s O_PATH / O_NOFOLLOW, the sticky bit of inode(7)).

A pathname socket is a file, and a server running as root that binds, chmods or unlinks
a path someone names can be turned against any file: unlink `/etc/motd`, chmod through a
symlink, delete another server's live socket. Every socket file made here follows these
rules instead (the admin socket of softnic and each vhost-user VF socket use them):

- It lives in a directory only its owner can change: owned by root or by this process's
  user, and writable by nobody else unless sticky (S_ISVTX: then nobody else may remove
  or rename what is in it; /tmp is such a directory). Everything is done relative to that
  directory's descriptor, so a directory swapped in above it changes nothing.
- It is bound inside a fresh private (0700) directory made there, given its owner, group
  and mode, set listening, and only then moved into place: it is never reachable with a
  wider mode, and no chmod or chown goes through a symlink.
- What is already at the path is replaced only if it is "ours and dead": a socket owned
  by the user this server gives its sockets, on which nobody listens -- the leftover of a
  server that was SIGKILLed. A file, a symlink, a directory, a socket someone else owns or
  one that answers is refused and left alone.
- At stop the path is removed only if it still holds the very socket this process made
  (same device and inode): never a newer server's, never something put there since.
- A client connects without following a symlink in the last component (O_PATH |
  O_NOFOLLOW, then connect through /proc/self/fd), and only to a socket.

This module knows nothing of softnic; softnic imports it, as it imports the rest of vhost.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import stat

__all__ = ["SocketFile", "connect", "listen", "open_dir"]


def _uid_name(uid: int) -> str:
    return "root" if uid == 0 else f"uid {uid}"


def open_dir(path: str, *, create: bool = False) -> int:
    """A descriptor of the directory `path` (made 0755 if missing and `create`), after
    checking that nobody but its owner -- root or this process's user -- can change what
    is in it. Raises OSError naming the directory and the reason."""
    if create:
        os.makedirs(path, mode=0o755, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid not in (0, os.geteuid()):
            raise OSError(errno.EPERM, f"{path}: owned by {_uid_name(st.st_uid)}, not by"
                          " root or this daemon's user: not a safe place for sockets")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            raise OSError(errno.EPERM, f"{path}: writable by others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}) without the sticky bit: "
                          "not a safe place for sockets")
    except BaseException:
        os.close(fd)
        raise
    return fd


class SocketFile:
    """A socket file this process made. remove() deletes it only while the path still
    holds that very file (device and inode), so it never removes what it did not make."""

    def __init__(self, path: str, dev: int, ino: int) -> None:
        self.path = path
        self.dev = dev
        self.ino = ino

    def remove(self) -> bool:
        parent, name = os.path.split(self.path)
        try:
            dfd = os.open(parent or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if (st.st_dev, st.st_ino) != (self.dev, self.ino):
                return False
            # Only our own user (or root) can change the entry between the stat and the
            # unlink: open_dir() made sure of that when the socket was made.
            os.unlink(name, dir_fd=dfd)
            return True
        except OSError:
            return False
        finally:
            os.close(dfd)


def _alive(dfd: int, name: str) -> bool:
    """Does a process listen on the socket `name`? A non-blocking connect says so without
    waiting: refused means nobody listens; accepted (or a full backlog) means somebody
    does. Anything else counts as alive, so an unclear answer never replaces a socket."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC
                          | socket.SOCK_NONBLOCK)
    try:
        probe.connect(f"/proc/self/fd/{dfd}/{name}")
    except ConnectionRefusedError:
        return False
    except FileNotFoundError:
        return False
    except OSError:
        return True
    finally:
        probe.close()
    return True


def _check_existing(dfd: int, name: str, path: str, owner: int) -> bool:
    """True if a leftover socket of ours is at `name` (to be replaced), False if nothing
    is there; raises OSError if something is there that must not be touched."""
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path}: is a symbolic link (left alone)")
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path}: exists and is not a socket (left alone)")
    if st.st_uid != owner:
        raise OSError(errno.EEXIST, f"{path}: a socket of {_uid_name(st.st_uid)}, not one"
                      " this daemon made (left alone)")
    if _alive(dfd, name):
        raise OSError(errno.EADDRINUSE, f"{path}: another process is listening on it")
    return True


def listen(path: str, *, mode: int = 0o600, uid: int = -1, gid: int = -1,
           backlog: int = 16, create_dir: bool = False) -> tuple[socket.socket, SocketFile]:
    """Bind and listen on the Unix socket `path` by the rules of this module: a leftover
    socket of ours is replaced, anything else there is refused (OSError: EEXIST, or
    EADDRINUSE when a process listens). uid/gid (-1: unchanged) and mode are given to the
    socket before it becomes reachable. Returns the listening socket (close-on-exec) and
    the SocketFile that removes it later."""
    parent, name = os.path.split(os.path.abspath(path))
    if not name or name in (".", ".."):
        raise OSError(errno.EINVAL, f"{path}: not a socket file name")
    dfd = open_dir(parent, create=create_dir)
    owner = os.geteuid() if uid == -1 else uid
    tmpdir = f".sock-{secrets.token_hex(6)}"
    tmp = f"{tmpdir}/s"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        stale = _check_existing(dfd, name, path, owner)
        os.mkdir(tmpdir, 0o700, dir_fd=dfd)
        try:
            # Bound through the directory's descriptor: the short /proc path also keeps
            # long directory names within sun_path's 108 bytes.
            sock.bind(f"/proc/self/fd/{dfd}/{tmp}")
            if uid != -1 or gid != -1:
                os.chown(tmp, uid, gid, dir_fd=dfd, follow_symlinks=False)
            os.chmod(tmp, mode, dir_fd=dfd)  # inside our private directory: no symlinks
            sock.listen(backlog)
            st = os.stat(tmp, dir_fd=dfd, follow_symlinks=False)
            if stale:
                # Only the owner of the leftover (us) can remove or rename it meanwhile
                # (open_dir: the directory is ours, or sticky), so this replaces exactly it.
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            else:
                # link() fails if something appeared at the path since the check: a
                # racing server's socket is never replaced.
                os.link(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
                os.unlink(tmp, dir_fd=dfd)
        finally:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except FileNotFoundError:
                pass
            os.rmdir(tmpdir, dir_fd=dfd)
    except FileExistsError:
        sock.close()
        os.close(dfd)
        raise OSError(errno.EEXIST, f"{path}: appeared while the socket was made (left alone)"
                      ) from None
    except BaseException:
        sock.close()
        os.close(dfd)
        raise
    os.close(dfd)
    return sock, SocketFile(os.path.join(parent, name), st.st_dev, st.st_ino)


def connect(path: str, timeout: float | None = None) -> socket.socket:
    """Connect to the Unix socket at `path` without following a symlink there; OSError
    (ENOTSOCK) if it is not a socket."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise OSError(errno.ENOTSOCK, f"{path}: not a socket (left alone)")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(f"/proc/self/fd/{fd}")
        except BaseException:
            sock.close()
            raise
        return sock
    finally:
        os.close(fd)
