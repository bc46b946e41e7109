"""The controller and the admin socket, through the real Unix socket: every verb, every
validation error (names its field, changes nothing), atomic rollback, reload diffs, socket
mode and peer credentials, hostile framing, concurrency with stalled clients, events,
capture (read back with dpkt), Prometheus text, and key redaction over everything. Then
the real daemon (issue 10): the socket paths a request may touch, listeners that outlive
idle floods and accept() errors, and key bytes gone from its memory once an SA is."""

import base64
import grp
import json
import logging
import os
import pathlib
import re
import select
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import dpkt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softnic import Client
from softnic.admin import AdminServer, MetricsServer
from softnic.client import AdminError
from softnic.config import load, loads
from softnic.control import Controller
from softnic.model import SA, VF, Daemon, Policy

# An exception in a server or reader thread fails the test, not just warns.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

# A distinctive key; every output and log of these tests is searched for it.
KEY = bytes.fromhex("d1e2f3a4b5c6d7e8f90a1b2c3d4e5f60718293a4")
KEY_FORMS = [KEY.hex(), KEY.hex().upper(), base64.b64encode(KEY).decode(), KEY[:8].hex()]

CONFIG = """
[uplink]
local = "192.0.2.1"
ipsec = "espinudp"

[[vf]]
name = "vm1"
kind = "tap"
mac = "02:00:00:00:00:01"
vni = 100
ipsec = "enforce"
addresses = ["10.0.0.1/24"]

[[vf]]
name = "vm2"
kind = "vhost-user"
socket = "/run/softnic/vm2.sock"
mac = "02:00:00:00:00:02"
vni = 200

[[fdb]]
vni = 100
mac = "flood"
remote = "192.0.2.2"
"""


class RecordingDatapath:
    """An in-memory data plane for the controller: keeps its tables, records each call,
    refuses what a real one would (duplicates, a VF deleted while its SAs remain), and
    fails on demand (`fail(name, arg) -> bool`) to exercise rollback."""

    def __init__(self):
        self.calls = []
        self.vfs, self.sas, self.policies, self.fdb = {}, {}, {}, {}
        self.uplink = None
        self.fail = None
        self.sink = None
        self.captures = {}
        self._handle = 0

    def set_event_sink(self, sink):
        self.sink = sink

    def _rec(self, name, arg):
        if self.fail is not None and self.fail(name, arg):
            raise RuntimeError(f"injected failure in {name} " + KEY.hex())  # must be scrubbed
        self.calls.append((name, getattr(arg, "ident", getattr(arg, "name", arg))))

    def set_uplink(self, uplink):
        self._rec("set_uplink", uplink)
        self.uplink = uplink

    def add_vf(self, vf):
        assert isinstance(vf, VF)
        if vf.name in self.vfs:
            raise KeyError("VF exists")
        self._rec("add_vf", vf)
        self.vfs[vf.name] = vf

    def del_vf(self, name):
        if name not in self.vfs or any(s[0] == name for s in self.sas):
            raise KeyError("no such VF, or SAs remain")
        self._rec("del_vf", name)
        del self.vfs[name]

    def add_sa(self, sa):
        assert isinstance(sa, SA)
        if sa.ident in self.sas or (sa.scope != "uplink" and sa.scope not in self.vfs):
            raise KeyError("SA exists or no scope")
        self._rec("add_sa", sa)
        self.sas[sa.ident] = sa

    def del_sa(self, sa):
        if sa.ident not in self.sas:
            raise KeyError("no SA")
        self._rec("del_sa", sa)
        del self.sas[sa.ident]

    def set_policies(self, scope, policies):
        if scope != "uplink" and scope not in self.vfs:
            raise KeyError("no scope")
        self._rec("set_policies", scope)
        self.policies = {k: v for k, v in self.policies.items() if v.scope != scope}
        self.policies.update({p.ident: p for p in policies})

    def add_fdb(self, e):
        if e.ident in self.fdb:
            raise KeyError("fdb exists")
        self._rec("add_fdb", e)
        self.fdb[e.ident] = e

    def del_fdb(self, e):
        if e.ident not in self.fdb:
            raise KeyError("no fdb")
        self._rec("del_fdb", e)
        del self.fdb[e.ident]

    def stats(self):
        return {"vf": {n: {"rx_packets": 10 * i + 1, "tx_packets": 2, "rx_bytes": 640}
                       for i, n in enumerate(sorted(self.vfs))},
                "uplink": {"rx_packets": 7, "tx_packets": 8},
                "drops": {"replay": 3, "icv": 1, "no_sa": 0},
                "queues": {n: [{"rx_packets": 1}] for n in self.vfs}}

    def sa_stats(self, sa):
        return {"packets": 5, "bytes": 500, "seq": 5}

    def capture_start(self, scope, sink, snaplen):
        self._handle += 1
        self.captures[self._handle] = sink
        return self._handle

    def capture_stop(self, handle):
        del self.captures[handle]

    def tables(self):
        return (dict(self.vfs), dict(self.sas), dict(self.policies), dict(self.fdb), self.uplink)


def sa_params(**kw):
    p = {"scope": "vm1", "dir": "out", "src": "10.0.0.1", "dst": "10.0.0.3", "spi": "0x1001",
         "alg": "aes-gcm", "key": "0x" + KEY.hex(), "icv_bits": 128, "reqid": 1}
    p.update(kw)
    return p


class Env:
    def __init__(self, dp, ctl, srv, path, cfg_path):
        self.dp, self.ctl, self.srv, self.path, self.cfg_path = dp, ctl, srv, path, cfg_path


def short_dir():
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    return tempfile.mkdtemp(prefix="sn-")


@pytest.fixture
def env(caplog):
    caplog.set_level(logging.DEBUG)
    d = short_dir()
    cfg_path = os.path.join(d, "softnic.toml")
    with open(cfg_path, "w") as f:
        f.write(CONFIG)
    dp = RecordingDatapath()
    ctl = Controller(dp, load(cfg_path), loader=lambda: load(cfg_path))
    path = os.path.join(d, "admin.sock")
    srv = AdminServer(ctl, path, line_timeout=0.5, idle_timeout=20, max_clients=40)
    srv.start()
    yield Env(dp, ctl, srv, path, cfg_path)
    srv.stop()
    shutil.rmtree(d, ignore_errors=True)


class Raw:
    """A bare socket client that records every byte it receives."""

    seen: list = []

    def __init__(self, path, timeout=5.0):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.buf = b""

    def send(self, data):
        self.s.sendall(data)

    def line(self):
        while b"\n" not in self.buf:
            chunk = self.s.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        Raw.seen.append(line.decode())
        return json.loads(line)

    def rpc(self, method, params=None, rid=1):
        self.send(json.dumps({"id": rid, "method": method, "params": params or {}}).encode()
                  + b"\n")
        return self.line()

    def closed(self):
        try:
            return self.s.recv(1) == b""
        except OSError:
            return True

    def close(self):
        self.s.close()


def assert_no_key(*texts):
    # pytest.fail, not assert: a failing assertion would print the text, key and all.
    if any(form in t for t in texts for form in KEY_FORMS):
        pytest.fail("key material leaked")


# --- controller ----------------------------------------------------------------------------


def test_apply_installs_config_in_dependency_order():
    dp = RecordingDatapath()
    cfg = loads(CONFIG + "[[sa]]\n" + "\n".join(
        f"{k} = {json.dumps(v)}" for k, v in sa_params(spi=0x1001).items()) + "\n")
    Controller(dp, cfg)
    names = [c[0] for c in dp.calls]
    assert names == ["set_uplink", "add_vf", "add_vf", "add_fdb", "add_sa"]


def test_reload_touches_only_what_changed(env):
    before = list(env.dp.calls)
    with open(env.cfg_path, "w") as f:
        f.write(CONFIG.replace('vni = 200', 'vni = 200\nmtu = 9000')
                + '[[fdb]]\nvni = 200\nmac = "02:00:00:00:00:09"\nremote = "192.0.2.9"\n')
    r = Client(env.path).reload()
    new = env.dp.calls[len(before):]
    assert new == [("del_vf", "vm2"), ("add_vf", "vm2"),
                   ("add_fdb", (200, "02:00:00:00:00:09"))]
    assert r["changes"] == ["del vf vm2", "add vf vm2", "add fdb 200/02:00:00:00:00:09/192.0.2.9"]
    assert Client(env.path).reload() == {"changes": []}


def test_reload_keeps_live_objects_unless_their_vf_goes(env):
    c = Client(env.path)
    c.sa_add(**sa_params())                      # vm1, added live (e.g. by an IKE daemon)
    c.sa_add(**sa_params(scope="vm2", spi=0x3001))
    c.fdb_add(200, "02:00:00:00:00:0b", "192.0.2.7")
    with open(env.cfg_path, "w") as f:           # the file drops vm2
        f.write(CONFIG[:CONFIG.index('[[vf]]\nname = "vm2"')] + CONFIG[CONFIG.index("[[fdb]]"):])
    r = c.reload()
    assert r["changes"] == ["del sa vm2/out/0x00003001", "del fdb 200/02:00:00:00:00:0b/192.0.2.7",
                            "del vf vm2"]
    assert ("vm1", "out", 0x1001) in env.dp.sas and set(env.dp.vfs) == {"vm1"}


def test_sighup_style_reload_in_a_thread(env):
    """request_reload() is what a SIGHUP handler calls: it never takes the lock itself."""
    sub = env.ctl.subscribe(types=["reloaded", "reload-failed"])
    with open(env.cfg_path, "a") as f:
        f.write('[[fdb]]\nvni = 200\nmac = "flood"\nremote = "192.0.2.4"\n')
    with env.ctl._lock:  # as if the signal interrupted a change in progress
        t = env.ctl.request_reload()
        time.sleep(0.1)
        assert t.is_alive()  # waits for the lock instead of changing state under it
    t.join(5)
    assert [e["type"] for e in sub.get(1)] == ["reloaded"]
    with open(env.cfg_path, "a") as f:
        f.write("[[fdb]]\nvni = 5\n")
    env.ctl.request_reload().join(5)
    ev = sub.get(1)
    assert ev[0]["type"] == "reload-failed" and ev[0]["field"] == "fdb[2].mac"
    sub.close()


def test_changed_vf_reinstalls_its_sas_and_policies(env):
    c = Client(env.path)
    c.sa_add(**sa_params())
    c.policy_add(scope="vm1", dir="out", src="10.0.0.1/32", dst="10.0.0.3/32",
                 action="protect", reqid=1)
    mark = len(env.dp.calls)
    cfg = env.ctl.config
    vm1 = cfg.vf("vm1")
    new_vm1 = VF(**{**{f: getattr(vm1, f) for f in vm1.__dataclass_fields__}, "mtu": 1400})
    env.ctl.apply(cfg.replace(vfs=(new_vm1, cfg.vf("vm2"))))
    assert [c[0] for c in env.dp.calls[mark:]] == \
        ["set_policies", "del_sa", "del_vf", "add_vf", "add_sa", "set_policies"]


def test_policy_change_is_one_table_replacement_between_sa_add_and_del(env):
    """A reload that rekeys (new SA, the protect policy moved to it, old SA gone) makes
    one set_policies call for the VF, after the new SA is in and before the old one
    goes: no moment without a protect policy (issue 10, item 8)."""
    sa = ('[[sa]]\nscope = "vm1"\ndir = "out"\nsrc = "10.0.0.1"\ndst = "10.0.0.3"\n'
          'spi = {spi}\nalg = "aes-gcm"\nkey = "0x' + KEY.hex() + '"\n')
    pol = ('[[policy]]\nscope = "vm1"\ndir = "out"\nsrc = "10.0.0.1/32"\n'
           'dst = "10.0.0.3/32"\naction = "protect"\nspi = {spi}\n')
    with open(env.cfg_path, "w") as f:
        f.write(CONFIG + sa.format(spi=0x1001) + pol.format(spi=0x1001))
    Client(env.path).reload()
    mark = len(env.dp.calls)
    with open(env.cfg_path, "w") as f:
        f.write(CONFIG + sa.format(spi=0x1003) + pol.format(spi=0x1003))
    r = Client(env.path).reload()
    assert env.dp.calls[mark:] == [("add_sa", ("vm1", "out", 0x1003)),
                                   ("set_policies", "vm1"), ("del_sa", ("vm1", "out", 0x1001))]
    assert r["changes"] == ["add sa vm1/out/0x00001003",
                            "del policy vm1/out 10.0.0.1/32->10.0.0.3/32",
                            "add policy vm1/out 10.0.0.1/32->10.0.0.3/32",
                            "del sa vm1/out/0x00001001"]
    assert [p.spi for p in env.dp.policies.values()] == [0x1003]


def test_datapath_failure_rolls_back_everything(env, caplog):
    c = Client(env.path)
    c.sa_add(**sa_params())
    tables, config = env.dp.tables(), env.ctl.config
    with open(env.cfg_path, "w") as f:  # many changes; the last step will fail
        f.write(CONFIG.replace("mtu", "x").replace('vni = 200', 'vni = 200\nmtu = 9000')
                + '[[policy]]\nscope = "vm1"\ndir = "out"\nsrc = "10.0.0.0/24"\n'
                  'dst = "10.0.0.0/24"\naction = "bypass"\n')
    env.dp.fail = lambda name, arg: name == "set_policies"
    with pytest.raises(AdminError) as ei:
        c.reload()
    assert ei.value.code == "datapath-failed" and "nothing was changed" in ei.value.message
    assert env.dp.tables() == tables and env.ctl.config is config
    assert not env.ctl.broken
    assert_no_key(str(ei.value), caplog.text)


def test_failed_rollback_is_reported(env):
    c = Client(env.path)
    c.sa_add(**sa_params())
    # The VF change fails at add_vf, and undoing its del_sa fails as well.
    env.dp.fail = lambda name, arg: name == "add_vf" or (name == "add_sa" and env.dp.vfs)
    with open(env.cfg_path, "w") as f:
        f.write(CONFIG.replace('ipsec = "enforce"', 'ipsec = "offload"'))
    with pytest.raises(AdminError) as ei:
        c.reload()
    assert "the rollback failed too" in ei.value.message
    assert env.ctl.broken and c.version()["consistent"] is False


def test_event_fanout_and_slow_subscriber():
    dp = RecordingDatapath()
    ctl = Controller(dp, loads(CONFIG))
    fast, slow = ctl.subscribe(), ctl.subscribe(maxlen=4)
    for i in range(10):
        dp.sink({"type": "sa-soft-expire", "scope": "vm1", "dir": "out", "spi": i,
                 "key": KEY.hex(), "auth_key": "x", "blob": b"\x00"})
    got = fast.get(0)
    assert [e["spi"] for e in got] == list(range(10))
    assert all("key" not in e and "auth_key" not in e and "blob" not in e for e in got)
    lagging = slow.get(0)
    assert lagging[0]["type"] == "events-lost" and lagging[0]["count"] == 6
    assert [e["spi"] for e in lagging[1:]] == [6, 7, 8, 9]
    dp.sink({"type": "vf-link", "vf": "vm1", "state": "up"})
    assert ctl.list_vfs()[0]["link"] == "up"
    dp.sink("not an event")  # ignored, not raised into the datapath
    fast.close()
    slow.close()


# --- socket basics ----------------------------------------------------------------------


def test_socket_mode_0600_and_cleanup(env):
    st = os.stat(env.path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    env.srv.stop()
    assert not os.path.exists(env.path)


def test_stale_socket_is_replaced_and_live_one_refused(env):
    other = AdminServer(env.ctl, env.path)
    with pytest.raises(OSError):
        other.start()  # a live daemon owns it
    assert Client(env.path).version()["protocol"] == 1
    d = short_dir()
    stale = os.path.join(d, "s.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(stale)
    s.close()  # bound, never listening: a dead daemon's leftover
    with AdminServer(env.ctl, stale):
        assert Client(stale).version()["version"]
    shutil.rmtree(d)


def _as_nobody(path, group=None, extra=()):
    code = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.settimeout(5)\n"
            "try:\n s.connect(sys.argv[1])\nexcept PermissionError:\n print('EACCES'); sys.exit()\n"
            "try:\n s.sendall(b'{\"id\":1,\"method\":\"version\"}\\n')\n"
            "except OSError:\n pass\n"  # a refused peer may already be disconnected
            "print(s.recv(4096).decode())")
    r = subprocess.run([SYS_PYTHON, "-c", code, path], capture_output=True, text=True,
                       timeout=20, user=65534, group=group if group is not None else 65534,
                       extra_groups=list(extra))
    return r.stdout.strip()


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The venv's interpreter may be unreadable to another uid; the child needs only `socket`.
SYS_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")


@needs_root
def test_peer_credentials(env):
    os.chmod(os.path.dirname(env.path), 0o755)
    assert _as_nobody(env.path) == "EACCES"          # the file mode stops it first
    os.chmod(env.path, 0o666)                         # then SO_PEERCRED must
    reply = json.loads(_as_nobody(env.path))
    assert reply["error"]["code"] == "permission-denied"


@needs_root
def test_admin_group_may_connect():
    users = grp.getgrnam("users").gr_gid
    d = short_dir()
    os.chmod(d, 0o755)
    path = os.path.join(d, "g.sock")
    with AdminServer(Controller(RecordingDatapath(), loads(CONFIG)), path, group="users"):
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == users
        assert "result" in json.loads(_as_nobody(path, group=users))        # primary gid
        assert "result" in json.loads(_as_nobody(path, extra=(users,)))     # supplementary
        assert _as_nobody(path) == "EACCES"
    shutil.rmtree(d)


# --- every verb ----------------------------------------------------------------------------


def test_every_verb(env):
    c = Client(env.path)
    v = c.version()
    assert v["protocol"] == 1 and "sa.add" in v["methods"] and "monitor" in v["methods"]
    assert c.vf_add(name="vm3", kind="tap", mac="02:00:00:00:00:03", vni=100,
                    netns="ns3", addresses=["10.0.0.3/24"]) == {"changes": ["add vf vm3"]}
    assert [x["name"] for x in c.vf_list()] == ["vm1", "vm2", "vm3"]
    assert c.sa_add(**sa_params(scope="vm3", key=KEY))["changes"] == ["add sa vm3/out/0x00001001"]
    c.sa_add(**sa_params(scope="vm3", dir="in", src="10.0.0.1", dst="10.0.0.3", spi=0x1002))
    c.sa_add(**sa_params(scope="uplink", src="192.0.2.1", dst="192.0.2.2", spi=0x2001,
                         mode="transport", encap_sport=4500, encap_dport=4500))
    got = c.sa_get("vm3", 0x1001)
    assert got["key"] == "<redacted>" and got["stats"]["packets"] == 5
    assert got == c.sa_get("vm3", "0x1001", dir="out", src="10.0.0.1")
    assert len(c.sa_list("vm3")) == 2 and len(c.sa_list()) == 3
    show = c.vf_show("vm3")
    assert show["vf"]["netns"] == "ns3" and len(show["sas"]) == 2
    assert show["stats"]["rx_packets"] >= 1
    c.policy_add(scope="vm3", dir="out", src="10.0.0.3/32", dst="10.0.0.1/32", proto="tcp",
                 dport=443, action="protect", reqid=1, priority=5)
    c.policy_add(scope="vm3", dir="in", src="0.0.0.0/0", dst="0.0.0.0/0", action="discard")
    assert [p["action"] for p in c.policy_list("vm3")] == ["discard", "protect"]
    c.policy_del(scope="vm3", dir="in", src="0.0.0.0/0", dst="0.0.0.0/0")
    assert len(c.policy_list()) == 1
    c.fdb_add(100, "02:00:00:00:00:0a", "192.0.2.3")
    assert len(c.fdb_list(100)) == 2 and c.fdb_list(200) == []
    c.fdb_del(100, "02:00:00:00:00:0a", "192.0.2.3")
    st = c.stats()
    assert st["drops"]["replay"] == 3 and len(st["sa"]) == 3 and st["vf"]["vm3"]
    assert "softnic_drops_total{reason=\"replay\"} 3" in c.metrics()
    c.sa_del("vm3", 0x1001, dir="out")
    assert c.sa_flush("vm3")["changes"] == ["del sa vm3/in/0x00001002"]
    assert len(c.sa_list()) == 1
    assert c.sa_flush()["changes"] == ["del sa uplink/out/0x00002001"]
    r = c.vf_del("vm3")
    assert r["changes"] == ["del policy vm3/out 10.0.0.3/32->10.0.0.1/32", "del vf vm3"]
    assert c.reload()["changes"] == []
    assert_no_key(*Raw.seen)


BAD_REQUESTS = [
    ("sa.add", sa_params(spi=200), "invalid-params", "spi"),
    ("sa.add", sa_params(key="0x" + KEY.hex()[:-8]), "invalid-params", "key"),
    ("sa.add", sa_params(key="0x" + KEY.hex() + "0"), "invalid-params", "key"),
    ("sa.add", sa_params(dst="fd00::1"), "invalid-params", "dst"),
    ("sa.add", sa_params(scope="vm9"), "not-found", "scope"),
    ("sa.add", sa_params(icv_bits=100), "invalid-params", "icv_bits"),
    ("sa.add", sa_params(replay_window=10 ** 6), "invalid-params", "replay_window"),
    ("sa.add", sa_params(scope="uplink", src="fd00::1", dst="fd00::2"), "invalid-params",
     "src"),
    ("sa.add", dict(sa_params(), extra=1), "invalid-params", "extra"),
    ("sa.add", [1, 2], "invalid-params", None),
    ("sa.del", {"scope": "vm1", "spi": 0x9999}, "not-found", "spi"),
    ("sa.del", {"scope": "vm1"}, "invalid-params", "spi"),
    ("sa.get", {"scope": "vm1", "spi": "0xzz"}, "invalid-params", "spi"),
    ("sa.list", {"scope": "nope"}, "not-found", "scope"),
    ("vf.add", {"name": "vm1", "kind": "tap", "mac": "02:00:00:00:00:07", "vni": 1},
     "exists", "name"),
    ("vf.add", {"name": "vm5", "kind": "tap", "mac": "02:00:00:00:00:01", "vni": 1},
     "invalid-params", "mac"),
    ("vf.add", {"name": "vm5", "kind": "tap", "mac": "zz", "vni": 1}, "invalid-params", "mac"),
    ("vf.del", {"name": "nope"}, "not-found", "name"),
    ("vf.show", {}, "invalid-params", "name"),
    ("policy.add", {"scope": "vm1", "dir": "out", "src": "10.0.0.0/8", "dst": "fd00::/8",
                    "action": "bypass"}, "invalid-params", "dst"),
    ("policy.add", {"scope": "vm1", "dir": "out", "src": "10.0.0.0/8", "dst": "10.0.0.0/8",
                    "action": "protect"}, "invalid-params", "reqid"),
    ("policy.del", {"scope": "vm1", "dir": "out", "src": "1.0.0.0/8", "dst": "1.0.0.0/8"},
     "not-found", "src"),
    ("fdb.add", {"vni": 999, "mac": "flood", "remote": "192.0.2.5"}, "invalid-params",
     "vni"),
    ("fdb.add", {"vni": 100, "mac": "flood", "remote": "192.0.2.2"}, "exists", "mac"),
    ("fdb.add", {"vni": 100, "mac": "flood", "remote": "fd00::5"}, "invalid-params",
     "remote"),
    ("fdb.del", {"vni": 100, "mac": "flood", "remote": "192.0.2.77"}, "not-found", "mac"),
    ("fdb.add", {"vni": 100, "mac": "02:00:00:00:00:0c", "remote": "192.0.2.5",
                 "replace": "yes"}, "invalid-params", "replace"),
    ("fdb.list", {"vni": "x"}, "invalid-params", "vni"),
    ("stats", {"format": "xml"}, "invalid-params", "format"),
    ("capture.stop", {"capture": 77}, "not-found", "capture"),
    ("monitor", {"types": "all"}, "invalid-params", "types"),
    ("capture.start", {"scope": "vm9"}, "not-found", "scope"),
    ("version", {"x": 1}, "invalid-params", "x"),
]


@pytest.mark.parametrize("method,params,code,field", BAD_REQUESTS,
                         ids=[f"{b[0]}-{b[3]}" for b in BAD_REQUESTS])
def test_validation_errors_name_field_and_change_nothing(env, caplog, method, params, code,
                                                         field):
    r = Raw(env.path)
    tables, config, calls = env.dp.tables(), env.ctl.config, len(env.dp.calls)
    reply = r.rpc(method, params, rid="req-7")
    assert reply["id"] == "req-7"
    assert reply["error"]["code"] == code
    assert reply["error"].get("field") == field
    assert env.dp.tables() == tables and env.ctl.config is config
    assert len(env.dp.calls) == calls
    assert r.rpc("version")["result"]["protocol"] == 1  # the connection lives on
    assert_no_key(json.dumps(reply), caplog.text)


# --- hostile framing and concurrency ----------------------------------------------------------


def test_garbage_half_lines_and_oversize(env):
    r = Raw(env.path)
    r.send(b"this is not json\n")
    assert r.line()["error"]["code"] == "parse-error"
    r.send(b"[1,2]\n")
    assert r.line()["error"]["code"] == "invalid-request"
    r.send(b'{"id": true, "method": "version"}\n')
    assert r.line()["error"]["field"] == "id"
    r.send(b'{"id": 3, "method": "no.such"}\n')
    assert r.line() == {"id": 3, "error": {"code": "method-not-found",
                                           "message": "unknown method", "field": "method"}}
    r.send(b'{"id": 4, "method": "version", "junk": 1}\n')
    assert r.line()["error"]["field"] == "junk"
    r.send(b"\xff\xfe\x00garbage\n\n\n")
    assert r.line()["error"]["code"] == "parse-error"
    r.send(b"[" * 60000 + b"\n")  # nesting deeper than any parser's recursion limit
    assert r.line()["error"]["code"] == "parse-error"
    r.send(b'{"id": 1, "method": "sa.get", "params": {"scope": "vm1", "spi": ' + b"9" * 5000
           + b"}}\n")
    assert r.line()["error"]["code"] in ("parse-error", "invalid-params")
    assert r.rpc("version")["result"]  # still usable after all that
    # A started line that never ends: an error after line_timeout, then closed.
    r.send(b'{"id": 5, "meth')
    t0 = time.monotonic()
    assert r.line()["error"]["code"] == "timeout"
    assert time.monotonic() - t0 < 3 and r.closed()
    # Oversize: refused once the limit is passed, without waiting for a newline.
    big = Raw(env.path)
    big.send(b'{"id": 1, "method": "sa.add", "params": {"x": "' + b"a" * (70 * 1024))
    assert big.line()["error"]["code"] == "too-large"
    assert big.closed()
    # Half a line, then hang up: nothing to answer, the server carries on.
    h = Raw(env.path)
    h.send(b'{"id": 1, "method": "vers')
    h.close()
    assert Client(env.path).version()


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                        max_size=3),
                    max_leaves=8)
METHODS = st.sampled_from(["version", "vf.add", "vf.del", "vf.list", "vf.show", "sa.add",
                           "sa.del", "sa.get", "sa.list", "sa.flush", "policy.add",
                           "policy.del", "policy.list", "fdb.add", "fdb.del", "fdb.list",
                           "stats", "reload", "capture.stop", "nope"])


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(req=st.one_of(
    st.fixed_dictionaries({"id": st.one_of(st.integers(), st.text(max_size=5)),
                           "method": METHODS}, optional={"params": JSON}),
    JSON))
def test_random_requests_always_get_a_reply(env, req):
    """Hostile JSON: every line gets exactly one well-formed reply, with the id echoed
    when there was a valid one, and the server keeps serving."""
    r = Raw(env.path)
    r.send(json.dumps(req).encode() + b"\n")
    reply = r.line()
    assert set(reply) in ({"id", "result"}, {"id", "error"})
    if "error" in reply:
        assert set(reply["error"]) <= {"code", "message", "field"}
        assert reply["error"]["code"] != "internal-error"
    if isinstance(req, dict) and isinstance(req.get("id"), int) and set(req) <= {
            "id", "method", "params"}:
        assert reply["id"] == req["id"]
    r.close()


def test_rekeys_are_make_before_break():
    """Ten rekeys: the new outbound SA is installed before the old one is removed, so at
    every datapath call an outbound SA with the policy's reqid exists."""
    dp = RecordingDatapath()
    ctl = Controller(dp, loads(CONFIG))
    ctl.add_policy(Policy.from_dict({"scope": "vm1", "dir": "out", "src": "10.0.0.1/32",
                                     "dst": "10.0.0.3/32", "action": "protect", "reqid": 1}))
    ctl.add_sa(SA.from_dict(sa_params(spi=0x1000)))
    seen = []
    orig_add, orig_del = dp.add_sa, dp.del_sa

    def check(fn):
        def wrapped(sa):
            fn(sa)
            seen.append(sum(1 for s in dp.sas.values() if s.dir == "out" and s.reqid == 1))
        return wrapped

    dp.add_sa, dp.del_sa = check(orig_add), check(orig_del)
    for i in range(10):
        ctl.add_sa(SA.from_dict(sa_params(spi=0x1001 + i)))
        ctl.del_sa("vm1", 0x1000 + i, dir="out")
    assert len(seen) == 20 and min(seen) == 1 and seen[::2] == [2] * 10
    assert [s.spi for s in ctl.config.sas] == [0x100a]


def test_twenty_clients_while_others_stall():
    d = short_dir()
    path = os.path.join(d, "c.sock")
    dp = RecordingDatapath()
    ctl = Controller(dp, loads(CONFIG))
    with AdminServer(ctl, path, line_timeout=30, idle_timeout=60, send_timeout=2):
        silent = Raw(path)                        # connects, says nothing
        slowloris = Raw(path)
        slowloris.send(b'{"id": 1, "method": "ver')  # starts a line, never ends it
        deaf = Raw(path)                          # asks a lot, never reads the answers
        deaf.send(b'{"id":1,"method":"stats"}\n' * 2000)
        errors, done = [], []

        def worker(i):
            try:
                with Client(path, timeout=10) as c:
                    for j in range(10):
                        spi = 0x10000 + i * 100 + j
                        c.sa_add(**sa_params(spi=spi))
                        assert c.sa_get("vm1", spi)["spi"] == f"0x{spi:08x}"
                        c.sa_del("vm1", spi)
                done.append(i)
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

        t0 = time.monotonic()
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        elapsed = time.monotonic() - t0
        assert errors == [] and len(done) == 20
        assert elapsed < 15, f"20 clients took {elapsed:.1f} s"
        assert ctl.config.sas == () and dp.sas == {}
        for s in (silent, slowloris, deaf):
            s.close()
    shutil.rmtree(d)


def test_connection_limit():
    d = short_dir()
    path = os.path.join(d, "l.sock")
    with AdminServer(Controller(RecordingDatapath(), loads(CONFIG)), path, max_clients=2):
        a, b = Raw(path), Raw(path)
        assert a.rpc("version")["result"] and b.rpc("version")["result"]
        c = Raw(path)
        assert c.line()["error"]["code"] == "busy"
        a.close()
        time.sleep(0.2)
        assert Raw(path).rpc("version")["result"]
        b.close()
    shutil.rmtree(d)


# --- monitor, capture, metrics ------------------------------------------------------------------


def test_monitor_streams_events(env):
    c = Client(env.path)
    events = []
    stream = c.monitor()
    got = threading.Event()

    def reader():
        for ev in stream:
            events.append(ev)
            if len(events) >= 3:
                got.set()
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while not env.ctl._bus._subs and time.monotonic() < deadline:
        time.sleep(0.02)
    c.sa_add(**sa_params())
    env.dp.sink({"type": "sa-soft-expire", "scope": "vm1", "dir": "out", "spi": "0x00001001",
                 "reason": "bytes", "key": KEY.hex()})
    env.dp.sink({"type": "vf-guest", "vf": "vm2", "state": "connected"})
    assert got.wait(5)
    assert [e["type"] for e in events] == ["sa-added", "sa-soft-expire", "vf-guest"]
    assert events[1]["reason"] == "bytes" and "key" not in events[1]
    assert events[0]["seq"] < events[1]["seq"] < events[2]["seq"]
    assert_no_key(json.dumps(events))


def test_monitor_filter_and_disconnect_frees_subscription(env):
    r = Raw(env.path)
    assert r.rpc("monitor", {"types": ["vf-link"]})["result"] == {"monitoring": True}
    env.dp.sink({"type": "vf-guest", "vf": "vm2", "state": "connected"})
    env.dp.sink({"type": "vf-link", "vf": "vm1", "state": "down"})
    assert r.line()["event"]["type"] == "vf-link"
    assert len(env.ctl._bus._subs) == 1
    r.close()
    deadline = time.monotonic() + 5
    while env.ctl._bus._subs and time.monotonic() < deadline:
        time.sleep(0.05)
    assert env.ctl._bus._subs == []


def test_capture_to_pcap_read_back_with_dpkt(env):
    frames = [bytes(dpkt.ethernet.Ethernet(
        src=b"\x02\0\0\0\0\x01", dst=b"\x02\0\0\0\0\x03", type=dpkt.ethernet.ETH_TYPE_IP,
        data=dpkt.ip.IP(src=b"\x0a\0\0\x01", dst=b"\x0a\0\0\x03", p=17,
                        data=dpkt.udp.UDP(sport=1000 + i, dport=53, data=b"q" * i))))
        for i in range(5)]
    pcap = os.path.join(os.path.dirname(env.path), "cap.pcap")
    c = Client(env.path)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("n", c.capture_pcap("vm1", pcap, 3)))
    t.start()
    deadline = time.monotonic() + 5
    while not env.dp.captures and time.monotonic() < deadline:
        time.sleep(0.02)
    (sink,) = env.dp.captures.values()
    for i, fr in enumerate(frames):
        sink(1700000000.0 + i, fr)
    t.join(5)
    assert result["n"] == 3 and env.dp.captures == {}  # stopped after --count
    with open(pcap, "rb") as f:
        rd = dpkt.pcap.Reader(f)
        assert rd.datalink() == dpkt.pcap.DLT_EN10MB
        got = [(ts, buf) for ts, buf in rd]
    assert [b for _, b in got] == frames[:3]
    assert [int(ts) for ts, _ in got] == [1700000000, 1700000001, 1700000002]
    assert dpkt.ethernet.Ethernet(got[2][1]).data.data.sport == 1002


def test_capture_stop_from_another_connection(env):
    r = Raw(env.path)
    start = r.rpc("capture.start", {"scope": "uplink"}, rid=9)
    handle = start["result"]["capture"]
    assert Client(env.path).capture_stop(handle) == {"stopped": handle}
    end = r.line()
    assert end == {"id": 9, "end": {"packets": 0, "dropped": 0}}


PROM_LINE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? -?\d+$')


def test_prometheus_text_and_http_listener(env):
    env.ctl.add_sa(SA.from_dict(sa_params()))
    text = Client(env.path).metrics()
    lines = text.strip().split("\n")
    typed = set()
    for line in lines:
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind == "counter"
            typed.add(name)
        else:
            assert PROM_LINE.match(line), line
            assert line.split("{")[0].split(" ")[0] in typed
    assert 'softnic_sa_packets_total{scope="vm1",dir="out",spi="0x00001001"} 5' in lines
    assert 'softnic_vf_rx_packets_total{vf="vm1"} 1' in lines
    assert MetricsServer.from_config(env.ctl, env.ctl.config.daemon) is None
    m = MetricsServer.from_config(env.ctl, Daemon(metrics_listen="127.0.0.1:0"))
    m.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=5) as resp:
            assert resp.status == 200 and resp.read().decode() == text
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{m.port}/config", timeout=5)
    finally:
        m.stop()


def test_keys_never_leave(env, caplog):
    """Every reply, event and log line of a session that adds, gets, lists, fails, streams
    and deletes SAs is free of the key (hex either case, base64, a fragment)."""
    r = Raw(env.path)
    mon = Raw(env.path)
    mon.rpc("monitor")
    out = [json.dumps(r.rpc("sa.add", sa_params()))]
    out.append(json.dumps(r.rpc("sa.add", sa_params())))  # exists
    out.append(json.dumps(r.rpc("sa.add", sa_params(spi="0x2000", key="0x" + KEY.hex()[:-2]))))
    out.append(json.dumps(r.rpc("sa.add", sa_params(spi="0x2000", key="0xq" + KEY.hex()))))
    out.append(json.dumps(r.rpc("sa.add", sa_params(spi="0x2001", alg="aes-cbc-hmac-sha256",
                                                   key="0x" + KEY.hex()[:32],
                                                   auth_key=KEY.hex() * 2))))
    env.dp.fail = lambda n, a: n == "add_sa"
    out.append(json.dumps(r.rpc("sa.add", sa_params(spi="0x2002"))))  # datapath error
    env.dp.fail = None
    for m, p in (("sa.get", {"scope": "vm1", "spi": 0x1001}), ("sa.list", {}),
                 ("vf.show", {"name": "vm1"}), ("stats", {}), ("stats", {"format": "prometheus"}),
                 ("vf.list", {}), ("sa.flush", {})):
        out.append(json.dumps(r.rpc(m, p)))
    time.sleep(0.6)
    mon.s.settimeout(1)
    try:
        while True:
            out.append(json.dumps(mon.line()))
    except (TimeoutError, EOFError):
        pass
    assert any("sa-added" in o for o in out) and any("datapath-failed" in o for o in out)
    assert_no_key(*out, caplog.text, *Raw.seen)
    assert_no_key(repr(env.ctl.config))


# --- the real daemon: what an admin's request may touch (issue 10, items 13 and 15) ------------
#
# `softnic run` in a namespace of its own (scenario.Daemon: its uplink binds there), driven
# through its admin socket; the files it is asked to use are real files, symlinks and
# sockets in temporary directories.

UPLINK_LO = '[uplink]\nlocal = "127.0.0.1"\n'


def vhost_vf(name, path, n, mode="server"):
    return (f'[[vf]]\nname = "{name}"\nkind = "vhost-user"\nsocket = "{path}"\n'
            f'vhost_mode = "{mode}"\nmac = "02:00:00:00:10:{n:02x}"\nvni = 700\n')


def vf_serves(path):
    """A frontend connects to the VF socket and negotiates features with it."""
    from vhost.testing import VhostUserFrontend

    with VhostUserFrontend(path) as fe:
        features, _ = fe.negotiate()
    return features != 0


class RealDaemon:
    """`softnic run` (scenario.Daemon) in a fresh namespace, its admin socket in `d`."""

    def __init__(self, d, body="", daemon_lines="", name="d", ready=()):
        from softnic.scenario import Daemon
        from softnic.topo import Netns

        self.d = d
        self.ns = Netns(prefix="snad")
        self.ns.ip("link", "set", "lo", "up")
        self.dm = Daemon(self.ns, daemon_lines + UPLINK_LO + body, pathlib.Path(d), name=name,
                         ready=ready)

    def __enter__(self):
        try:
            self.dm.start()
        except BaseException:
            self.close()
            raise
        return self.dm

    def close(self):
        self.dm.stop()
        self.ns.close()

    def __exit__(self, *exc):
        self.close()


def _netns_why():
    from softnic.topo import can_netns

    return can_netns()


needs_netns = pytest.mark.skipif(_netns_why() is not None, reason=str(_netns_why()))


def _socket_at(path, uid=None, listening=False):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    if uid is not None:
        os.chown(path, uid, -1)
    if listening:
        s.listen(4)
        return s
    s.close()
    return None


@needs_netns
def test_vf_socket_paths_outside_the_directory_or_not_ours_are_refused():
    """`vf add ... socket PATH` may only name a file directly in [daemon] vhost_socket_dir,
    and there only replaces a dead socket of its own: a file elsewhere (/etc/motd's
    stand-in), the admin socket, a regular file, symlinks, a directory, another user's
    socket and a live socket are all refused, left exactly as they were, and the daemon
    keeps serving."""
    d, elsewhere = short_dir(), short_dir()
    victim = os.path.join(elsewhere, "motd")
    with open(victim, "w") as f:
        f.write("precious\n")
    os.chmod(victim, 0o644)
    try:
        with RealDaemon(d) as dm:
            c = dm.client()

            def add(i, path, mode="server"):
                with pytest.raises(AdminError) as ei:
                    c.vf_add(name=f"x{i}", kind="vhost-user", socket=path, vhost_mode=mode,
                             mac=f"02:00:00:00:11:{i:02x}", vni=700)
                return ei.value

            outside = [victim, os.path.join(d, "..", os.path.basename(elsewhere), "motd"),
                       dm.sock, dm.sock + ".lock", os.path.join(d, ".hidden")]
            for i, path in enumerate(outside):
                for mode in ("server", "client"):
                    e = add(i, path, mode)
                    assert (e.code, e.field) == ("invalid-params", "socket"), (path, e)

            regular = os.path.join(d, "file.sock")
            with open(regular, "w") as f:
                f.write("data")
            link = os.path.join(d, "link.sock")
            os.symlink(victim, link)
            admin_link = os.path.join(d, "admin-link.sock")
            os.symlink(dm.sock, admin_link)
            dangling = os.path.join(d, "dangling.sock")
            os.symlink(os.path.join(elsewhere, "nothing"), dangling)
            subdir = os.path.join(d, "dir.sock")
            os.mkdir(subdir)
            foreign = os.path.join(d, "foreign.sock")
            _socket_at(foreign, uid=65534)
            live_path = os.path.join(d, "live.sock")
            live = _socket_at(live_path, listening=True)
            for i, path in enumerate([regular, link, admin_link, dangling, subdir, foreign,
                                      live_path], start=10):
                e = add(i, path)
                assert e.code == "datapath-failed", (path, e)
                assert "left alone" in e.message or "listening" in e.message, e.message

            assert open(victim).read() == "precious\n"
            assert stat.S_IMODE(os.stat(victim).st_mode) == 0o644
            assert open(regular).read() == "data"
            assert os.readlink(link) == victim and os.readlink(admin_link) == dm.sock
            assert os.path.islink(dangling) and not os.path.exists(dangling)
            assert os.path.isdir(subdir) and os.lstat(foreign).st_uid == 65534
            probe = socket.socket(socket.AF_UNIX)
            probe.connect(live_path)          # still the test's own listener
            live.accept()[0].close()
            probe.close()
            live.close()
            assert c.vf_list() == [] and c.version()["consistent"]
            assert stat.S_ISSOCK(os.lstat(dm.sock).st_mode)
        assert "Traceback" not in dm.tail()
    finally:
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(elsewhere, ignore_errors=True)


@needs_netns
def test_vf_socket_of_a_killed_daemon_is_reused():
    """SIGKILL leaves the VF socket (and the lock file) behind: the next daemon replaces
    that dead socket of its own and serves the VF on it."""
    d = short_dir()
    path = os.path.join(d, "g1.sock")
    try:
        with RealDaemon(d, vhost_vf("g1", path, 1), ready=[path]) as dm:
            assert vf_serves(path)
            dm.kill()
            assert stat.S_ISSOCK(os.lstat(path).st_mode)     # the leftover
            assert os.path.exists(dm.sock + ".lock")
            dm.start()
            assert vf_serves(path)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@needs_root
@needs_netns
def test_vf_socket_owner_group_and_mode_come_from_the_config():
    """[daemon] vhost_socket_user/group/mode are set before the socket is reachable: a
    frontend of another uid in that group (libvirt's qemu user) may connect, a uid
    outside it may not."""
    users = grp.getgrnam("users").gr_gid
    d = short_dir()
    os.chmod(d, 0o755)
    path = os.path.join(d, "g1.sock")
    lines = ('vhost_socket_user = "nobody"\nvhost_socket_group = "users"\n'
             "vhost_socket_mode = 0o660\n")
    try:
        with RealDaemon(d, vhost_vf("g1", path, 1), lines, ready=[path]):
            st = os.lstat(path)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, users, 0o660)
            code = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
                    "try:\n s.connect(sys.argv[1]); print('connected')\n"
                    "except PermissionError:\n print('EACCES')")
            for group, want in ((users, "connected"), (65533, "EACCES")):
                r = subprocess.run([SYS_PYTHON, "-c", code, path], capture_output=True,
                                   text=True, timeout=20, user=65533, group=group)
                assert r.stdout.strip() == want, r.stderr
    finally:
        shutil.rmtree(d, ignore_errors=True)


@needs_netns
def test_unsafe_vhost_socket_dir_is_refused_in_one_line(tmp_path):
    """A vhost_socket_dir others may write to (without the sticky bit) could have our
    sockets replaced under us: the daemon refuses it at start, in one line."""
    from softnic.topo import Netns

    d = short_dir()
    bad = os.path.join(d, "open")
    os.mkdir(bad)
    os.chmod(bad, 0o777)
    cfg = os.path.join(d, "c.toml")
    with open(cfg, "w") as f:
        f.write(f'[daemon]\nadmin_socket = "{d}/a.sock"\nvhost_socket_dir = "{bad}"\n'
                + UPLINK_LO + vhost_vf("g1", f"{bad}/g1.sock", 1))
    try:
        with Netns(prefix="snad") as ns:
            r = subprocess.run(ns.exec_argv([sys.executable, "-m", "softnic.daemon", "run",
                                             "-c", cfg]),
                               capture_output=True, text=True, timeout=60, cwd=REPO,
                               env=dict(os.environ, PYTHONPATH=REPO))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "without the sticky bit" in r.stderr and os.listdir(bad) == []
    finally:
        shutil.rmtree(d, ignore_errors=True)


@needs_netns
def test_client_mode_never_connects_through_a_symlink():
    """In client mode the daemon connects to what QEMU made: a symlink there (here to a
    listener outside the directory) is not followed; a real socket is."""
    d, elsewhere = short_dir(), short_dir()
    target = os.path.join(elsewhere, "target.sock")
    lst = _socket_at(target, listening=True)
    lst.setblocking(False)
    link = os.path.join(d, "g1.sock")
    os.symlink(target, link)
    try:
        with RealDaemon(d, vhost_vf("g1", link, 1, mode="client")) as dm:
            deadline = time.monotonic() + 30
            while "not connecting to" not in dm.tail():
                readable, _, _ = select.select([lst], [], [], 0.05)
                assert not readable, "the daemon connected through the symlink"
                assert time.monotonic() < deadline, dm.tail()
            readable, _, _ = select.select([lst], [], [], 0.3)   # a few more retries
            assert not readable, "the daemon connected through the symlink"
            # QEMU's socket appears for real: the daemon connects to it.
            os.unlink(link)
            qemu = _socket_at(link, listening=True)
            qemu.settimeout(30)
            conn, _ = qemu.accept()
            conn.close()
            qemu.close()
    finally:
        lst.close()
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(elsewhere, ignore_errors=True)


def _metrics_port(dm, timeout=30):
    """The port of the daemon's metrics listener: the one TCP listener of its namespace,
    as the kernel lists it."""
    def port():
        lines = dm.ns.run(["ss", "-ltnH"]).split()
        return next((int(w.rsplit(":", 1)[1]) for w in lines if w.startswith("127.0.0.1:")),
                    None)
    return _until(port, timeout, "the metrics listener")


def _get_metrics(dm, port, timeout=5):
    with dm.ns.entered():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                    timeout=timeout) as resp:
            return resp.status, resp.read().decode()


def _until(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = pred()
        except Exception:  # noqa: BLE001 - not yet
            r = None
        if r:
            return r
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _nofile(pid, soft):
    import resource

    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, old[1]))
    return old


def _raise_own_nofile(n):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _listener_pending(port):
    """What the kernel holds for the listener on `port` (read in the calling thread's
    namespace): connections in its accept queue plus handshakes not yet complete."""
    hexport = f":{port:04X}"
    pending = 0
    with open("/proc/thread-self/net/tcp") as f:
        next(f)
        for line in f:
            w = line.split()
            if not w[1].endswith(hexport):
                continue
            if w[3] == "0A":                       # LISTEN: rx_queue is the accept queue
                pending += int(w[4].split(":")[1], 16)
            elif w[3] == "03":                     # SYN_RECV
                pending += 1
    return pending


@needs_netns
def test_thousands_of_idle_metrics_connections_do_not_stop_admin_or_vhost():
    """3000 connections to /metrics that never send a byte, against a daemon with the
    usual 1024 descriptors (systemd's default soft limit), opened a few at a time as the
    listener takes them: it holds a bounded number at once, on one thread, so the admin
    socket and a vhost-user VF keep accepting, and /metrics answers again once the idle
    ones are timed out."""
    n, batch = 3000, 4
    if _raise_own_nofile(n + 200) < n + 200:
        pytest.skip("cannot raise RLIMIT_NOFILE for the test's own connections")
    d = short_dir()
    path = os.path.join(d, "g1.sock")
    conns = []
    try:
        with RealDaemon(d, vhost_vf("g1", path, 1), 'metrics_listen = "127.0.0.1:0"\n',
                        ready=[path]) as dm:
            port = _metrics_port(dm)
            assert _get_metrics(dm, port)[0] == 200
            _nofile(dm.pid, 1024)
            threads0, fds0 = len(os.listdir(f"/proc/{dm.pid}/task")), dm.counts()[0]
            taken = 0
            with dm.ns.entered():
                try:
                    while len(conns) < n:
                        for _ in range(min(batch, n - len(conns))):
                            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                            conns.append(s)
                            s.settimeout(10)
                            s.connect(("127.0.0.1", port))
                        # Wait until the listener took them (an event the kernel shows);
                        # one that cannot take any more ends the opening here.
                        deadline, waited = time.monotonic() + 10, False
                        while _listener_pending(port) and time.monotonic() < deadline:
                            waited = True
                            time.sleep(0.002)
                        if _listener_pending(port):
                            break
                        taken = len(conns)
                        batch = batch if waited else min(2 * batch, 64)
                except TimeoutError:
                    pass                               # the listener stopped taking any
            with Client(dm.sock, timeout=10) as c:
                assert c.version()["protocol"] == 1
            assert vf_serves(path)
            threads, fds = len(os.listdir(f"/proc/{dm.pid}/task")), dm.counts()[0]
            assert threads <= threads0 + 3, (threads0, threads)
            assert fds <= fds0 + 64, (fds0, fds)
            assert taken == n, f"the listener stopped taking connections after {taken}"
            status, text = _until(lambda: _get_metrics(dm, port), 60, "/metrics again")
            assert status == 200 and "softnic_vf_" in text
        assert "Traceback" not in dm.tail()
    finally:
        for s in conns:
            s.close()
        shutil.rmtree(d, ignore_errors=True)


@needs_netns
def test_accept_errors_do_not_end_the_listeners():
    """With the daemon out of descriptors (its RLIMIT_NOFILE lowered under it, as prlimit
    does), accept() fails with EMFILE on the admin socket, a VF's vhost-user socket and
    the metrics listener: each says so and keeps listening, and each serves again once
    descriptors are back."""
    d = short_dir()
    path = os.path.join(d, "g1.sock")
    try:
        with RealDaemon(d, vhost_vf("g1", path, 1), 'metrics_listen = "127.0.0.1:0"\n',
                        ready=[path]) as dm:
            port = _metrics_port(dm)
            fds = {int(x) for x in os.listdir(f"/proc/{dm.pid}/fd")}
            lowest_free = min(set(range(max(fds) + 2)) - fds)
            old = _nofile(dm.pid, lowest_free)
            waiting = []
            try:
                for p in (dm.sock, path):
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.connect(p)                     # into the backlog: nobody accepts
                    waiting.append(s)
                with dm.ns.entered():
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    s.connect(("127.0.0.1", port))
                    waiting.append(s)
                for what in ("admin: accept failed", "g1.sock: accept failed",
                             "metrics: accept failed"):
                    _until(lambda what=what: what in dm.tail(), 30, f"{what}: {dm.tail()}")
            finally:
                for s in waiting:
                    s.close()
                import resource

                resource.prlimit(dm.pid, resource.RLIMIT_NOFILE, old)
            with Client(dm.sock, timeout=10) as c:
                assert [v["name"] for v in c.vf_list()] == ["g1"]
            assert _until(lambda: vf_serves(path), 30, "the VF serves again")
            assert _until(lambda: _get_metrics(dm, port)[0] == 200, 30, "/metrics again")
        assert "Traceback" not in dm.tail() and "Too many open files" in dm.tail()
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --- the real daemon: keys stay in (issue 10, item 16) ------------------------------------------


def memory_count(pid, needles):
    """How often each byte string occurs in the writable memory of process `pid` (heap,
    anonymous maps, stacks: where Python and C keep data), read through /proc/PID/mem."""
    counts = dict.fromkeys(needles, 0)
    keep = max(len(x) for x in needles) - 1
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            w = line.split()
            if not w[1].startswith("rw") or (len(w) > 5 and w[5] in ("[vvar]", "[vsyscall]")):
                continue
            lo, hi = (int(x, 16) for x in w[0].split("-"))
            tail = b""
            for at in range(lo, hi, 1 << 24):
                try:
                    mem.seek(at)
                    chunk = tail + mem.read(min(1 << 24, hi - at))
                except OSError:
                    break
                for x in needles:
                    counts[x] += chunk.count(x)
                tail = chunk[-keep:]
                for x in needles:       # what the tail holds is counted again next time
                    counts[x] -= tail.count(x)
    return counts


@needs_netns
def test_a_deleted_sa_leaves_no_key_bytes_in_the_daemon():
    """SAs added with `softnicctl sa add ... @FILE` and then deleted: while they exist the
    daemon holds their key bytes (the scan finds them); once deleted, not one copy of
    any of them is left anywhere in its memory. Nothing printed holds a key."""
    d = short_dir()
    path = os.path.join(d, "g1.sock")
    keys = [os.urandom(20) for _ in range(6)]
    try:
        with RealDaemon(d, vhost_vf("g1", path, 1), ready=[path]) as dm:
            out = []
            for i, key in enumerate(keys):
                kf = os.path.join(d, f"k{i}")
                with open(kf, "w") as f:
                    f.write(key.hex() + "\n")
                r = subprocess.run(
                    [sys.executable, "-m", "softnic.cli", "-s", dm.sock, "sa", "add", "vf",
                     "g1", "dir", "out" if i % 2 else "in", "src", "10.0.0.1", "dst",
                     "10.0.0.2", "proto", "esp", "spi", str(0x1000 + i), "mode", "tunnel",
                     "aead", "rfc4106(gcm(aes))", "@" + kf, "128"],
                    capture_output=True, text=True, timeout=30, cwd=REPO)
                assert r.returncode == 0, r.stderr
                out += [r.stdout, r.stderr]
                os.unlink(kf)
            held = memory_count(dm.pid, keys)
            assert all(held[k] >= 1 for k in keys), "the scan does not see live keys"
            for i in range(len(keys)):
                r = subprocess.run([sys.executable, "-m", "softnic.cli", "-s", dm.sock, "sa",
                                    "del", "vf", "g1", "spi", str(0x1000 + i)],
                                   capture_output=True, text=True, timeout=30, cwd=REPO)
                assert r.returncode == 0, r.stderr
                out += [r.stdout, r.stderr]
            with Client(dm.sock) as c:
                assert c.sa_list() == []
            left = memory_count(dm.pid, keys)
            if any(left.values()):
                pytest.fail(f"{sum(1 for v in left.values() if v)} of {len(keys)} deleted"
                            " keys are still in the daemon's memory")
        text = dm.tail() + "".join(out)
        if any(k.hex() in text.lower() for k in keys):
            pytest.fail("key material in the output")
    finally:
        shutil.rmtree(d, ignore_errors=True)
