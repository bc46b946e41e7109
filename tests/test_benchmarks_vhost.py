"""Smoke run of benchmarks/vhost.py with tiny windows: it builds its namespaces, drives
softnic's vhost-user VFs and the sink ceiling, and its last line is one JSON object whose
figures agree with what the peer kernel counted (the kernel, not the benchmark, is the
oracle for what reached the underlay)."""

import json
import os
import subprocess
import sys

import pytest

from softnic.topo import can_netns

why = can_netns()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(why is not None, reason=why or "")]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("64", "1500", "tso64k")


@pytest.fixture(scope="module")
def run():
    p = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "vhost.py"),
                        "--quick"], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_last_line_is_one_json_object_with_every_figure(run):
    res = json.loads(run.stdout.strip().splitlines()[-1])
    for case in ("ceiling", "vf2vf", "underlay"):
        for kind in KINDS:
            f = res[case][kind]
            for k in ("fps", "gbps", "fps_best", "fps_mean", "fps_per_core",
                      "gbps_per_core", "fe_fps_per_core"):
                assert f[k] > 0, (case, kind, k)
            assert f["fps_best"] >= f["fps"]
    assert isinstance(res["peer_rx_threaded"], bool)


IN_FLIGHT = 256 + 64        # the ring, and one burst in the TX worker


def test_figures_match_what_arrived(run):
    res = json.loads(run.stdout.strip().splitlines()[-1])
    for kind in ("64", "1500"):
        # Local switching delivers every frame to VF b or counts a drop (VF b's ring full
        # when this process was not scheduled); a ring's worth may be in flight at the
        # window edges.
        v = res["vf2vf"][kind]
        done = v["frames_received"] + v["softnic_drops"]
        assert v["frames_sent"] - 3 * 256 <= done <= v["frames_sent"] + 3 * 256, v
        # softnic's uplink sends one ESP-in-VXLAN datagram per 64/1500-byte frame, or
        # counts a drop. In flight at the window edges: a ring's worth of frames, and the
        # burst the TX worker holds (64).
        u = res["underlay"][kind]
        assert abs(u["underlay_pkts"] + u["softnic_drops"] - u["frames"]) <= IN_FLIGHT, u
    # A 64 KB TSO frame (65495 bytes of TCP payload, gso_size 1448) is 46 segments.
    u = res["underlay"]["tso64k"]
    assert abs(u["underlay_pkts"] + u["softnic_drops"] - 46 * u["frames"]) <= 46 * IN_FLIGHT, u
    # The peer kernel (the oracle) got no datagram softnic did not send, and misses only
    # what veth dropped, whole UDP GSO packets of at most 128 datagrams (UDP_MAX_SEGMENTS).
    t = res["underlay_totals"]
    assert t["peer_datagrams"] <= t["ul_io_tx_pkts"], t
    assert t["peer_datagrams"] >= t["ul_io_tx_pkts"] - 128 * t["veth_tx_dropped"], t
    assert t["peer_datagrams"] > 0
    # Gbit/s of a 64-byte frame is its frame rate times 512 bits.
    f = res["underlay"]["64"]
    assert f["gbps"] == pytest.approx(f["fps"] * 512 / 1e9, abs=1e-3)


def test_no_key_in_output(run):
    text = run.stdout + run.stderr
    src = open(os.path.join(REPO, "benchmarks", "vhost.py")).read()
    key = src.split('KEY = "', 1)[1].split('"', 1)[0]
    assert key not in text and key[:16] not in text
