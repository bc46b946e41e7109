"""The shipped example configurations start a real daemon (so they cannot rot): each runs
in a namespace that owns its uplink address, with its namespaces, sockets and paths made
unique for the test, and the daemon lists what the file declares."""

import glob
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

from softnic.topo import Netns, can_netns

why = can_netns()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(why is not None, reason=why or "")]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(REPO, "examples", "*.toml")))


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_config_runs(path, tmp_path):
    from softnic.scenario import Daemon

    text = open(path).read()
    cfg = tomllib.loads(text)
    host = Netns(prefix="snex")
    vms = {}
    try:
        # Private copies of everything global the file names: namespaces and socket paths.
        for name in sorted({vf["netns"] for vf in cfg.get("vf", []) if "netns" in vf}):
            vms[name] = Netns(prefix="snexvm")
            text = text.replace(f'"{name}"', f'"{vms[name].name}"')
        for i, vf in enumerate(cfg.get("vf", [])):
            if "socket" in vf:
                text = text.replace(f'"{vf["socket"]}"', f'"{tmp_path}/vf{i}.sock"')
        text = re.sub(r"(?m)^\[daemon\][^\[]*", "", text)
        local = cfg["uplink"]["local"]
        host.ip("link", "add", "ul0", "type", "veth", "peer", "name", "ul1")
        host.addr_add("ul0", f"{local}/24")
        host.link_up("ul0")
        host.link_up("ul1")
        host.link_up("lo")
        d = Daemon(host, text, tmp_path)
        d.start()
        try:
            with d.client() as c:
                vfs = {v["name"] for v in c.vf_list()}
                sas = {(s["scope"], s["dir"], int(s["spi"], 16)) for s in c.sa_list()}
                policies = c.policy_list()
            assert vfs == {vf["name"] for vf in cfg.get("vf", [])}
            assert sas == {(s["scope"], s["dir"], s["spi"]) for s in cfg.get("sa", [])}
            assert len(policies) == len(cfg.get("policy", []))
        finally:
            d.stop()
        assert d.proc is not None and d.proc.returncode == 0, d.tail()
        assert "Traceback" not in d.tail()
    finally:
        for ns in vms.values():
            ns.close()
        host.close()


def test_check_command_validates_every_example(tmp_path):
    """Each example, installed as a config holding keys must be (`install -m 600`),
    passes `softnic check`; a copy others may read is refused with the command to fix it
    (git keeps no mode but the executable bit, so the checkout's own files are 0644)."""
    for path in EXAMPLES:
        private = tmp_path / os.path.basename(path)
        shutil.copyfile(path, private)
        os.chmod(private, 0o600)
        r = subprocess.run([sys.executable, "-m", "softnic.daemon", "check", "-c", str(private)],
                           capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 0 and ": ok (" in r.stdout, r.stderr
        os.chmod(private, 0o644)
        r = subprocess.run([sys.executable, "-m", "softnic.daemon", "check", "-c", str(private)],
                           capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 2 and f"chmod 600 {private}" in r.stderr, r.stderr
