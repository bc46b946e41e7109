"""softnicctl: the command line of the admin socket (docs/admin-protocol.md).

SA and policy words are those of ip-xfrm(8) (see softnic/xfrm.py), so `ip xfrm state add`
habits carry over; scope them with `vf NAME` or `uplink`. Tables for people, `--json` for
machines, `--prometheus` for stats. Exit status: 0 success, 1 the daemon refused or could
not be reached, 2 a usage mistake. A user mistake prints one line, never a traceback.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from .client import AdminError, Client, default_socket
from .model import UPLINK, ValidationError
from .xfrm import (
    format_policy,
    format_state,
    parse_policy,
    parse_policy_id,
    parse_state,
    parse_state_id,
)

USAGE = """\
usage: softnicctl [-s SOCKET] [--json] COMMAND ...

  version
  vf add NAME kind tap|vhost-user mac MAC vni N [mtu N] [ipsec off|offload|enforce]
         [ifname IF] [netns NS] [addr A/LEN]... [socket PATH] [mode server|client] [queues N]
  vf del NAME | vf list | vf show NAME [--qemu]
  sa add vf NAME|uplink dir in|out src A dst B proto esp spi SPI [reqid N]
         [mode tunnel|transport] aead 'rfc4106(gcm(aes))' 0xKEY 128
         (any KEY may be @FILE or - for a line of stdin: keeps keys out of argv)
         | aead 'rfc7539esp(chacha20,poly1305)' 0xKEY 128
         | enc 'cbc(aes)' 0xKEY auth-trunc 'hmac(sha256)' 0xKEY 128
         [replay-window N] [flag esn] [encap espinudp SPORT DPORT 0.0.0.0]
         [limit byte-soft|byte-hard|packet-soft|packet-hard N]... [engine E]
  sa del|get vf NAME|uplink spi SPI [dir in|out] [src A] [dst B]
  sa list [vf NAME|uplink] | sa flush [vf NAME|uplink]
  policy add vf NAME|uplink src PFX dst PFX [proto P [sport N] [dport N]] dir in|out
         [priority N] [action protect|bypass|discard] [reqid N | spi SPI | tmpl ... reqid N]
  policy del vf NAME|uplink src PFX dst PFX [proto P ...] dir in|out
  policy list [vf NAME|uplink]
  fdb add|replace|del vni N mac MAC|flood|accept remote ADDR | fdb list [vni N]
  stats [--prometheus]
  top [--interval S] [--count N]
  monitor [--count N] [TYPE]...
  capture vf NAME|uplink [--count N] [--snaplen N] --pcap FILE | capture stop HANDLE
  reload
"""

OPTS_WITH_VALUE = {"-s", "--socket", "--count", "--pcap", "--snaplen", "--interval"}
FLAGS = {"--json", "--prometheus", "--qemu", "-h", "--help"}


class Usage(Exception):
    pass


def _out(s: str) -> None:
    sys.stdout.write(s + ("\n" if not s.endswith("\n") else ""))
    sys.stdout.flush()


def _num(v: str, what: str) -> int:
    try:
        return int(v, 0)
    except ValueError:
        raise Usage(f"{what}: '{v[:40]}' is not a number") from None


def _table(rows: list[dict[str, Any]], cols: Sequence[tuple[str, str]]) -> str:
    if not rows:
        return "(none)"
    cells = [[h for h, _ in cols]] + [["-" if r.get(k) is None else str(r.get(k))
                                       for _, k in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def _scope_words(words: list[str]) -> str | None:
    if not words:
        return None
    if words == [UPLINK]:
        return UPLINK
    if len(words) == 2 and words[0] == "vf":
        return words[1]
    raise Usage("expected 'vf NAME' or 'uplink'")


def _read_secret(word: str) -> str:
    """A key given as `@FILE` (hex in a file) or `-` (one line of stdin, per `-`)."""
    if word == "-":
        line = sys.stdin.readline()
        if not line:
            raise Usage("key '-': no line left on stdin")
        return line
    try:
        with open(word[1:], encoding="ascii") as f:
            return f.read(4096)
    except (OSError, UnicodeDecodeError) as e:
        raise Usage(f"key file {word[1:]}: {getattr(e, 'strerror', None) or 'not hex text'}") \
            from None


def _warn_inline_key(field: str) -> None:
    """A key typed as a word of the command line is in this process's argv, which every
    local user can read (ps, /proc/PID/cmdline) while it runs, and often in a shell
    history: say so, once per key, and how to avoid it."""
    sys.stderr.write(f"softnicctl: warning: {field} given on the command line, where every"
                     " local user can read it (ps, /proc/PID/cmdline): give it as @FILE or"
                     " - (a line of stdin) instead\n")


def _vf_params(name: str, words: list[str]) -> dict[str, Any]:
    p: dict[str, Any] = {"name": name}
    keys = {"kind": "kind", "mac": "mac", "vni": "vni", "mtu": "mtu", "ipsec": "ipsec",
            "ifname": "ifname", "netns": "netns", "socket": "socket", "mode": "vhost_mode",
            "queues": "queues"}
    i = 0
    while i < len(words):
        w = words[i]
        if i + 1 >= len(words):
            raise Usage(f"missing value after '{w}'")
        v = words[i + 1]
        if w in ("addr", "address"):
            p.setdefault("addresses", []).append(v)
        elif w in keys:
            p[keys[w]] = _num(v, w) if w in ("vni", "mtu", "queues") else v
        else:
            raise Usage(f"unknown word '{w[:40]}'")
        i += 2
    return p


def _fdb_params(words: list[str]) -> dict[str, Any]:
    p: dict[str, Any] = {}
    i = 0
    while i < len(words):
        w = words[i]
        if i + 1 >= len(words):
            raise Usage(f"missing value after '{w}'")
        if w == "vni":
            p["vni"] = _num(words[i + 1], "vni")
        elif w == "mac":
            p["mac"] = words[i + 1]
        elif w in ("remote", "dst"):
            p["remote"] = words[i + 1]
        else:
            raise Usage(f"unknown word '{w[:40]}'")
        i += 2
    return p


class Ctl:
    def __init__(self, socket_path: str, as_json: bool, opts: dict[str, Any]) -> None:
        self.client = Client(socket_path)
        self.json = as_json
        self.opts = opts

    def show(self, result: Any, human: str | None = None) -> None:
        if self.json or human is None:
            _out(json.dumps(result, indent=None if self.json else 2, sort_keys=True))
        else:
            _out(human)

    def run(self, words: list[str]) -> int:
        if not words:
            raise Usage("missing COMMAND")
        obj, rest = words[0], words[1:]
        verb = rest[0] if rest else "list"
        args = rest[1:]
        c = self.client
        if obj == "version":
            r = c.version()
            self.show(r, f"softnic {r['version']} (admin protocol {r['protocol']})")
        elif obj == "vf":
            if verb == "add":
                if not args:
                    raise Usage("vf add needs NAME")
                self._changed(c.vf_add(**_vf_params(args[0], args[1:])))
            elif verb in ("del", "show"):
                if len(args) != 1:
                    raise Usage(f"vf {verb} needs NAME")
                if verb == "del":
                    self._changed(c.vf_del(args[0]))
                elif self.opts.get("qemu"):
                    r = c.vf_show(args[0])
                    if r["vf"].get("kind") != "vhost-user":
                        raise Usage(f"--qemu: VF {args[0][:32]} is not kind vhost-user")
                    argv = qemu_args(r["vf"])
                    self.show({"qemu": argv, "libvirt": libvirt_interface(r["vf"])},
                              qemu_text(r["vf"]))
                else:
                    r = c.vf_show(args[0])
                    self.show(r, self._vf_show_text(r))
            elif verb == "list":
                vfs = c.vf_list()
                self.show(vfs, _table([dict(v, port=v.get("ifname") or v.get("socket"))
                                       for v in vfs],
                                      [("NAME", "name"), ("KIND", "kind"), ("PORT", "port"),
                                       ("MAC", "mac"), ("VNI", "vni"), ("MTU", "mtu"),
                                       ("IPSEC", "ipsec"), ("SAS", "sas"), ("LINK", "link"),
                                       ("GUEST", "guest")]))
            else:
                raise Usage(f"unknown vf verb '{verb[:20]}'")
        elif obj == "sa":
            if verb == "add":
                self._changed(c.call("sa.add", **parse_state(args, _read_secret,
                                                             _warn_inline_key)))
            elif verb in ("del", "get"):
                p = parse_state_id(args)
                if verb == "del":
                    self._changed(c.call("sa.del", **p))
                else:
                    r = c.call("sa.get", **p)
                    st = r.get("stats", {})
                    self.show(r, format_state(r) + "\n    stats: " +
                              (" ".join(f"{k} {v}" for k, v in sorted(st.items())) or "-"))
            elif verb in ("list", "flush"):
                scope = _scope_words(args)
                p = {} if scope is None else {"scope": scope}
                if verb == "flush":
                    self._changed(c.call("sa.flush", **p))
                else:
                    r = c.call("sa.list", **p)
                    self.show(r, _table(r, [("SCOPE", "scope"), ("DIR", "dir"), ("SPI", "spi"),
                                            ("SRC", "src"), ("DST", "dst"), ("MODE", "mode"),
                                            ("ALG", "alg"), ("ICV", "icv_bits"),
                                            ("REQID", "reqid"), ("ESN", "esn"),
                                            ("ENCAP", "encap_dport")]))
            else:
                raise Usage(f"unknown sa verb '{verb[:20]}'")
        elif obj == "policy":
            if verb == "add":
                self._changed(c.call("policy.add", **parse_policy(args)))
            elif verb == "del":
                self._changed(c.call("policy.del", **parse_policy_id(args)))
            elif verb == "list":
                scope = _scope_words(args)
                r = c.call("policy.list", **({} if scope is None else {"scope": scope}))
                self.show(r, "\n".join(format_policy(p) for p in r) or "(none)")
            else:
                raise Usage(f"unknown policy verb '{verb[:20]}'")
        elif obj == "fdb":
            if verb in ("add", "del", "replace"):
                p = _fdb_params(args)
                for f in ("vni", "mac", "remote"):
                    if f not in p:
                        raise Usage(f"fdb {verb} needs {f}")
                if verb == "replace":
                    p["replace"] = True
                self._changed(c.call("fdb.del" if verb == "del" else "fdb.add", **p))
            elif verb == "list":
                p = _fdb_params(args)
                r = c.call("fdb.list", **p)
                self.show(r, _table(r, [("VNI", "vni"), ("MAC", "mac"), ("REMOTE", "remote")]))
            else:
                raise Usage(f"unknown fdb verb '{verb[:20]}'")
        elif obj == "stats":
            if rest:
                raise Usage("stats takes no words")
            if self.opts.get("prometheus"):
                sys.stdout.write(c.metrics())
            else:
                r = c.stats()
                self.show(r, self._stats_text(r))
        elif obj == "top":
            self._top()
        elif obj == "monitor":
            self._monitor(rest)
        elif obj == "capture":
            self._capture(rest)
        elif obj == "reload":
            if rest:
                raise Usage("reload takes no words")
            self._changed(c.reload())
        elif obj in ("help", "-h", "--help"):
            _out(USAGE)
        else:
            raise Usage(f"unknown command '{obj[:20]}'")
        return 0

    def _changed(self, r: Any) -> None:
        changes = r.get("changes", []) if isinstance(r, dict) else []
        self.show(r, "\n".join(changes) if changes else "no change")

    @staticmethod
    def _vf_show_text(r: dict[str, Any]) -> str:
        vf = r["vf"]
        lines = [f"{k}: {', '.join(v) if isinstance(v, list) else v}"
                 for k, v in vf.items() if v not in (None, [])]
        if r.get("state"):
            lines.append("state: " + " ".join(f"{k}={v}" for k, v in r["state"].items()))
        if r.get("stats"):
            lines.append("stats: " + " ".join(f"{k}={v}" for k, v in sorted(r["stats"].items())))
        for i, q in enumerate(r.get("queues", [])):
            lines.append(f"queue {i}: " + " ".join(f"{k}={v}" for k, v in sorted(q.items())))
        lines += ["sa: " + format_state(s).replace("\n", "\n    ") for s in r.get("sas", [])]
        lines += ["policy: " + format_policy(p) for p in r.get("policies", [])]
        return "\n".join(lines)

    @staticmethod
    def _stats_text(r: dict[str, Any]) -> str:
        out = []
        vfs = r.get("vf", {})
        if vfs:
            cols = sorted({k for c in vfs.values() for k in c})
            out.append(_table([dict(c, _name=n) for n, c in sorted(vfs.items())],
                              [("VF", "_name")] + [(k.upper(), k) for k in cols]))
        if r.get("uplink"):
            out.append("uplink: " + " ".join(f"{k}={v}" for k, v in sorted(r["uplink"].items())))
        drops = {k: v for k, v in r.get("drops", {}).items() if v}
        out.append("drops: " + (" ".join(f"{k}={v}" for k, v in sorted(drops.items()))
                                or "none"))
        sas = r.get("sa", [])
        if sas:
            cols = sorted({k for s in sas for k in s} - {"scope", "dir", "spi"})
            out.append(_table(sas, [("SCOPE", "scope"), ("DIR", "dir"), ("SPI", "spi")]
                              + [(k.upper(), k) for k in cols]))
        return "\n\n".join(out)

    def _top(self) -> None:
        """Rates per VF and SA from two stats samples, refreshed every --interval s."""
        interval = float(self.opts.get("interval", 1.0))
        count = int(self.opts.get("count", 0))
        prev = self.client.stats()
        n = 0
        while count == 0 or n < count:
            time.sleep(interval)
            cur = self.client.stats()
            rows = []
            for name, c in sorted(cur.get("vf", {}).items()):
                p = prev.get("vf", {}).get(name, {})
                rows.append({"obj": f"vf {name}", **{k: f"{(v - p.get(k, 0)) / interval:.0f}"
                                                      for k, v in c.items()}})
            psa = {(s["scope"], s["dir"], s["spi"]): s for s in prev.get("sa", [])}
            for s in cur.get("sa", []):
                p = psa.get((s["scope"], s["dir"], s["spi"]), {})
                rows.append({"obj": f"sa {s['scope']}/{s['dir']}/{s['spi']}",
                             **{k: f"{(v - p.get(k, 0)) / interval:.0f}" for k, v in s.items()
                                if isinstance(v, int)}})
            if self.json:
                _out(json.dumps({"time": time.time(), "rates": rows}))
            else:
                cols = sorted({k for r in rows for k in r} - {"obj"})
                if sys.stdout.isatty():
                    sys.stdout.write("\x1b[H\x1b[2J")
                _out(f"softnic top - per second over {interval:g} s\n" + _table(
                    rows, [("OBJECT", "obj")] + [(k.upper(), k) for k in cols]))
            prev = cur
            n += 1

    def _monitor(self, types: list[str]) -> None:
        count = int(self.opts.get("count", 0))
        n = 0
        stream = self.client.monitor(types or None)
        try:
            for ev in stream:
                if self.json:
                    _out(json.dumps(ev, sort_keys=True))
                else:
                    t = time.strftime("%H:%M:%S", time.localtime(ev.get("time", 0)))
                    rest = " ".join(f"{k}={v}" for k, v in ev.items()
                                    if k not in ("type", "time", "seq"))
                    _out(f"{t} {ev['type']} {rest}".rstrip())
                n += 1
                if count and n >= count:
                    break
        finally:
            stream.close()

    def _capture(self, words: list[str]) -> None:
        if words[:1] == ["stop"]:
            if len(words) != 2:
                raise Usage("capture stop needs HANDLE")
            self.show(self.client.capture_stop(_num(words[1], "HANDLE")), "stopped")
            return
        scope = _scope_words(words)
        if scope is None:
            raise Usage("capture needs 'vf NAME' or 'uplink'")
        path = self.opts.get("pcap")
        if not path:
            raise Usage("capture needs --pcap FILE")
        count = int(self.opts.get("count", 0))
        snaplen = int(self.opts.get("snaplen", 65535))
        try:
            n = self.client.capture_pcap(scope, path, count, snaplen)
        except OSError as e:
            raise Usage(f"{path}: {e.strerror or e}") from None
        summary = getattr(self.client, "capture_summary", {})
        self.show({"packets": n, "file": path, **summary},
                  f"{n} packets written to {path}"
                  + (f" ({summary['dropped']} dropped: too slow)"
                     if summary.get("dropped") else ""))


# ---- `vf show NAME --qemu`: how to attach a VM (QEMU docs/interop/vhost-user.rst, and
# docs/system/devices/vhost-user.rst: the backend maps guest RAM, so it must be a shared fd).

QEMU_MEM = "1024M"   # -m and the memfd backend size must be equal; change both together


def _queues(vf: dict[str, Any]) -> int:
    """The VF's queue pairs: softnic answers GET_QUEUE_NUM with this, and QEMU refuses to
    start if its netdev asks for more."""
    return int(vf.get("queues") or 1)


def qemu_args(vf: dict[str, Any], mem: str = QEMU_MEM) -> list[str]:
    """The QEMU arguments (argv items) that attach one VM NIC to vhost-user VF `vf` (a
    `vf show` dict): shared memfd RAM as NUMA node 0, the chardev on the VF's socket
    (QEMU listens when the VF is in client mode; otherwise it connects and reconnects
    after a softnic restart), the netdev, and virtio-net-pci with the VF's MAC and the
    offloads softnic implements (virtio 1.x 5.1.3)."""
    name, sock = vf["name"], vf["socket"].replace(",", ",,")   # QEMU's escape for ','
    queues = _queues(vf)
    chardev = f"socket,id=chr-{name},path={sock}"
    chardev += ",server=on,wait=off" if vf.get("vhost_mode") == "client" else ",reconnect=1"
    netdev = f"vhost-user,id=net-{name},chardev=chr-{name}"
    device = (f"virtio-net-pci,netdev=net-{name},mac={vf['mac']},mrg_rxbuf=on,"
              "csum=on,guest_csum=on,host_tso4=on,host_tso6=on,guest_tso4=on,guest_tso6=on,"
              f"event_idx=on,indirect_desc=on,host_mtu={int(vf.get('mtu') or 1500)}")
    if queues > 1:
        netdev += f",queues={queues}"
        device += f",mq=on,vectors={2 * queues + 2}"
    return ["-m", mem,
            "-object", f"memory-backend-memfd,id=mem0,size={mem},share=on",
            "-numa", "node,memdev=mem0",
            "-chardev", chardev, "-netdev", netdev, "-device", device]


def libvirt_interface(vf: dict[str, Any]) -> str:
    """A libvirt domain XML <interface type='vhostuser'> for the VF. libvirt's source mode
    is QEMU's side: 'client' when softnic listens (server mode), 'server' otherwise."""
    client = vf.get("vhost_mode") == "client"
    queues = _queues(vf)
    mode = "server" if client else "client"
    reconnect = "" if client else "\n    <reconnect enabled='yes' timeout='1'/>\n  "
    src = (f"<source type='unix' path='{_xml_attr(vf['socket'])}' mode='{mode}'>"
           f"{reconnect}</source>" if reconnect else
           f"<source type='unix' path='{_xml_attr(vf['socket'])}' mode='{mode}'/>")
    q = f" queues='{queues}'" if queues > 1 else ""
    return (
        "<interface type='vhostuser'>\n"
        f"  <mac address='{vf['mac']}'/>\n"
        f"  {src}\n"
        "  <model type='virtio'/>\n"
        f"  <mtu size='{int(vf.get('mtu') or 1500)}'/>\n"
        f"  <driver{q}>\n"
        "    <host csum='on' tso4='on' tso6='on' mrg_rxbuf='on'/>\n"
        "    <guest csum='on' tso4='on' tso6='on'/>\n"
        "  </driver>\n"
        "</interface>"
    )


def _xml_attr(s: str) -> str:
    return (s.replace("&", "&amp;").replace("'", "&apos;").replace("<", "&lt;")
            .replace(">", "&gt;"))


def qemu_text(vf: dict[str, Any]) -> str:
    """`vf show NAME --qemu` for people: the arguments as shell lines, then notes."""
    import shlex

    argv = qemu_args(vf)
    who = ("QEMU listens (server=on), softnic connects and reconnects"
           if vf.get("vhost_mode") == "client" else
           "softnic listens, QEMU connects (reconnect=1: survives a softnic restart)")
    pairs = [" ".join(shlex.quote(a) for a in argv[i:i + 2]) for i in range(0, len(argv), 2)]
    lines = [f"# QEMU arguments for VF {vf['name']} (vhost-user; {who})"]
    lines += [p + " \\" for p in pairs[:-1]] + [pairs[-1]]
    lines += [
        "# Guest RAM must be shared with softnic: memfd share=on, size equal to -m.",
        "# TCG hosts (no KVM): give -device vectors=0 (legacy INTx); QEMU 7.2",
        "# under TCG crashes when the guest starts a vhost-user NIC with MSI-X vectors.",
    ]
    if _queues(vf) > 1:
        lines += [
            f"# {_queues(vf)} queue pairs: a Linux guest uses as many as it has vCPUs "
            "(ethtool -L eth0 combined N",
            "# to change); softnic spreads them over its TX workers ([daemon] tx_workers).",
        ]
    lines += [
        "",
        "# libvirt: guest RAM shared with softnic, in <domain>:",
        "#   <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>",
        "# and in <devices>:",
        libvirt_interface(vf),
    ]
    return "\n".join(lines)


def _split_opts(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    opts: dict[str, Any] = {}
    words: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            words += argv[i + 1:]
            break
        name, eq, val0 = a.partition("=")
        val: Any = val0
        if name in OPTS_WITH_VALUE:
            if not eq:
                if i + 1 >= len(argv):
                    raise Usage(f"{name} needs a value")
                i += 1
                val = argv[i]
            key = {"-s": "socket"}.get(name, name.lstrip("-"))
            if key in ("count", "snaplen"):
                val = _num(val, name)
                if val < 0:
                    raise Usage(f"{name} must not be negative")
            elif key == "interval":
                try:
                    val = float(val)
                except ValueError:
                    raise Usage(f"{name}: not a number") from None
                if not 0.05 <= val <= 3600:
                    raise Usage(f"{name} must be in 0.05..3600")
            opts[key] = val
        elif a in FLAGS:
            opts[a.lstrip("-")] = True
        elif a.startswith("-") and len(a) > 1 and not a[1:].isdigit():
            raise Usage(f"unknown option '{a[:40]}'")
        else:
            words.append(a)
        i += 1
    return opts, words


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in args
    try:
        opts, words = _split_opts(args)
        if opts.get("h") or opts.get("help"):
            _out(USAGE)
            return 0
        ctl = Ctl(opts.get("socket") or default_socket(), bool(opts.get("json")), opts)
        try:
            return ctl.run(words)
        finally:
            ctl.client.close()
    except Usage as e:
        sys.stderr.write(f"softnicctl: {e}\n(see softnicctl --help)\n")
        return 2
    except ValidationError as e:  # xfrm words
        _err(as_json, "invalid-params", e.message, e.field)
        return 2
    except AdminError as e:
        _err(as_json, e.code, e.message, e.field)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


def _err(as_json: bool, code: str, message: str, field: str | None) -> None:
    if as_json:
        _out(json.dumps({"error": {"code": code, "message": message, "field": field}}))
    sys.stderr.write(f"softnicctl: {code}: " + (f"{field}: " if field else "") + message + "\n")


if __name__ == "__main__":
    sys.exit(main())
