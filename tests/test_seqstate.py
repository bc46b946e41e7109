"""Outbound sequence numbers kept over restarts (softnic.seqstate, [daemon] seq_state)."""

import json
import os

import pytest

from softnic import model
from softnic.dataplane import Dataplane
from softnic.seqstate import STEP, SeqState

KEY = "0x" + bytes(range(20)).hex()


def test_start_writes_the_mark_before_use(tmp_path):
    path = str(tmp_path / "seq.json")
    st = SeqState(path)
    assert st.start("vm1/00001001", esn=False) == 0
    on_disk = json.load(open(path))
    assert on_disk == {"version": 1, "sa": {"vm1/00001001": STEP}}
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    # A restart starts at the mark, and puts the next one on disk at once.
    again = SeqState(path)
    assert again.start("vm1/00001001", esn=False) == STEP
    assert json.load(open(path))["sa"]["vm1/00001001"] == 2 * STEP


def test_advance_moves_the_mark_only_near_it_and_flush_saves(tmp_path):
    path = str(tmp_path / "seq.json")
    st = SeqState(path)
    st.start("k", esn=True)
    st.advance("k", STEP // 2 - 1)          # still STEP / 2 or more below the mark
    st.flush()
    assert json.load(open(path))["sa"]["k"] == STEP
    st.advance("k", STEP // 2 + 5)
    assert json.load(open(path))["sa"]["k"] == STEP     # not saved before flush
    st.flush()
    assert json.load(open(path))["sa"]["k"] == STEP // 2 + 5 + STEP
    st.forget("k")
    st.flush()
    assert json.load(open(path))["sa"] == {}


def test_the_end_of_the_space_is_kept(tmp_path):
    """Near 2^32 without ESN the mark stops at the end: the SA then says it is exhausted
    rather than wrap."""
    path = str(tmp_path / "seq.json")
    json.dump({"version": 1, "sa": {"k": 0xFFFFFFF0}}, open(path, "w"))
    st = SeqState(path)
    assert st.start("k", esn=False) == 0xFFFFFFF0
    assert st.marks()["k"] == 0xFFFFFFFF


@pytest.mark.parametrize("content", ["not json", '{"version": 7, "sa": {}}', "[]"])
def test_a_bad_file_starts_from_zero_with_a_warning(tmp_path, caplog, content):
    path = tmp_path / "seq.json"
    path.write_text(content)
    st = SeqState(str(path))
    assert st.start("k", esn=False) == 0
    assert "start at 1" in caplog.text
    assert json.load(open(path))["sa"] == {"k": STEP}      # and the file is good again


def _sa(spi, direction="out"):
    return model.SA(scope="vm1", dir=direction, src="10.0.0.1", dst="10.0.0.2", spi=spi,
                    alg="aes-gcm", key=model.Secret(bytes.fromhex(KEY[2:])))


def _vf(tmp_path):
    """A vhost-user VF (its socket listens; no guest needed, nor privileges)."""
    return model.VF(name="vm1", kind="vhost-user", mac="02:00:00:00:00:01", vni=100,
                    socket=str(tmp_path / "vm1.sock"))


def _dataplane(path):
    dp = Dataplane(tx_workers=1, seq_state=path)
    dp.set_uplink(model.Uplink(local="127.0.0.1"))
    return dp


def test_dataplane_resumes_an_outbound_sa_above_its_mark(tmp_path):
    """What the daemon does on a restart: the same static SA starts above every number
    the previous run could have sent; inbound SAs keep no marks."""
    path = str(tmp_path / "seq.json")
    vf = _vf(tmp_path)
    first = _dataplane(path)
    try:
        first.add_vf(vf)
        first.add_sa(_sa(0x1001))
        first.add_sa(_sa(0x2001, "in"))
        assert first.sa_stats(_sa(0x1001))["seq"] == 0
        assert SeqState(path).marks() == {"vm1/00001001": STEP}
    finally:
        first.close()
    second = _dataplane(path)
    try:
        second.add_vf(vf)
        second.add_sa(_sa(0x1001))
        assert second.sa_stats(_sa(0x1001))["seq"] == STEP
        assert SeqState(path).marks() == {"vm1/00001001": 2 * STEP}
        second.del_sa(_sa(0x1001))
        assert SeqState(path).marks() == {}
    finally:
        second.close()


def test_an_unwritable_state_file_rejects_the_sa(tmp_path):
    (tmp_path / "a-file").write_text("")
    dp = _dataplane(str(tmp_path / "a-file" / "seq.json"))      # its directory cannot be
    try:
        dp.add_vf(_vf(tmp_path))
        with pytest.raises(ValueError, match="seq_state"):
            dp.add_sa(_sa(0x1001))
        with pytest.raises(KeyError):
            dp.sa_stats(_sa(0x1001))
    finally:
        dp.close()
