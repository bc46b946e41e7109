"""`softnic run -c CONFIG.toml`: the daemon in the foreground.

Start order: configuration (validated whole; an error names the field and nothing
starts), the data plane with every object of the file, the admin socket, the metrics
listener, then the workers. SIGINT/SIGTERM stop it cleanly (every TAP, socket and thread
released); SIGHUP reloads the file, applying only what changed.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from types import FrameType

from softnic import config as configmod
from softnic.admin import AdminServer, MetricsServer
from softnic.control import ControlError, Controller
from softnic.dataplane import Dataplane

log = logging.getLogger("softnic")


def run(path: str, ready: threading.Event | None = None,
        stop: threading.Event | None = None) -> int:
    try:
        cfg = configmod.load(path)
    except (configmod.ConfigError, OSError) as e:
        print(f"softnic: {e}", file=sys.stderr)
        return 2
    stop = stop or threading.Event()
    try:
        dp = Dataplane(tx_workers=cfg.daemon.tx_workers, seq_state=cfg.daemon.seq_state,
                       vhost_max_memory=cfg.daemon.vhost_max_memory_mib << 20)
    except OSError as e:
        print(f"softnic: seq_state: {e}", file=sys.stderr)
        return 2
    admin = metrics = None
    try:
        try:
            ctl = Controller(dp, cfg, loader=lambda: configmod.load(path))
        except ControlError as e:
            print(f"softnic: {e}", file=sys.stderr)
            return 2
        os.makedirs(os.path.dirname(cfg.daemon.admin_socket) or ".", exist_ok=True)
        admin = AdminServer.from_config(ctl, cfg.daemon)
        admin.start()
        metrics = MetricsServer.from_config(ctl, cfg.daemon)
        if metrics is not None:
            metrics.start()
        dp.start()

        def on_stop(signum: int, frame: FrameType | None) -> None:
            stop.set()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            ctl.request_reload()

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, on_stop)
            signal.signal(signal.SIGTERM, on_stop)
            signal.signal(signal.SIGHUP, on_hup)
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
            cfg = configmod.load(args.config)
        except (configmod.ConfigError, OSError) as e:
            print(f"softnic: {e}", file=sys.stderr)
            return 2
        print(f"{args.config}: ok ({len(cfg.vfs)} VFs, {len(cfg.sas)} SAs, "
              f"{len(cfg.policies)} policies, {len(cfg.fdb)} FDB entries)")
        return 0
    return run(args.config)


if __name__ == "__main__":
    sys.exit(main())
