"""The controller: single owner of softnic's running state, and its event bus.

Every change - one `sa add` or a whole config reload - is the same operation: build the new
desired `model.Config`, validate it whole (`Config.validate`), diff it against the running
one, and apply the difference to the data plane through the `Datapath` protocol. If any
step fails, the steps already done are undone in reverse, so a change is all or nothing
(the control-plane analogue of RFC 4301 §4.4's "the SPD and SAD change together"). Only
what changed is touched: a reload that leaves a VF's definition alone never calls
del_vf/add_vf for it (Snabb's app-graph diff is the model).

Events (SA soft/hard lifetime expiry, sequence numbers near exhaustion, VF link and guest
connect/disconnect) are posted by the datapath from any thread; `post_event` never blocks.
Each monitor subscriber has a bounded queue: a slow subscriber loses its oldest events (and
is told how many), it never slows the datapath or other subscribers.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from .model import (
    SA,
    UPLINK,
    VF,
    Config,
    FdbEntry,
    Policy,
    Uplink,
    ValidationError,
)

log = logging.getLogger("softnic.control")

__all__ = ["Datapath", "Controller", "ControlError", "Subscription", "EVENT_TYPES",
           "prometheus_text", "scrub"]

# Events a datapath posts (field "type"), plus those the controller itself posts.
EVENT_TYPES = (
    "sa-soft-expire",      # scope, dir, spi, reason bytes|packets
    "sa-hard-expire",      # scope, dir, spi, reason  (the SA is no longer used)
    "sa-seq-near-exhaustion",  # scope, dir, spi, seq
    "vf-link",             # vf, state up|down
    "vf-guest",            # vf, state connected|disconnected
    "vf-broken",           # vf, reason (a misbehaving guest broke its own VF)
    "sa-added", "sa-deleted", "policy-added", "policy-deleted",
    "vf-added", "vf-deleted", "fdb-added", "fdb-deleted", "uplink-changed", "reloaded",
    "reload-failed",
    "events-lost",         # count: this subscriber was too slow
)


class Datapath(Protocol):
    """What the data plane implements for the controller. Every method either does the
    whole thing or raises (any Exception) having changed nothing. Objects are the
    validated, immutable model objects; `SA.key.reveal()` gives the key bytes, which the
    datapath hands to the crypto engine once and never stores in Python-visible form.
    Calls come from one thread at a time (the controller serialises them)."""

    def set_event_sink(self, sink: Callable[[dict[str, Any]], None]) -> None:
        """Give the datapath the callable to post events (dicts with "type"); thread-safe,
        non-blocking."""

    def set_uplink(self, uplink: Uplink | None) -> None:
        """Configure (or, with None, remove) the underlay side."""

    def add_vf(self, vf: VF) -> None:
        """Create the VF port (open the TAP / listen on the vhost-user socket)."""

    def del_vf(self, name: str) -> None:
        """Close the VF port and release everything it holds."""

    def add_sa(self, sa: SA) -> None:
        """Install an SA in the table of `sa.scope` keyed by (scope, dir, spi)."""

    def del_sa(self, sa: SA) -> None:
        """Remove the SA with `sa.ident` from its table."""

    def set_policies(self, scope: str, policies: tuple[Policy, ...]) -> None:
        """Replace the whole SPD of `scope` (both directions) with `policies`, in one step
        that packets see whole: never a table with some of the old and some of the new,
        never one with neither (an `offload` VF would send in clear). A protect policy
        whose SA is not installed yet drops what it matches (`no_sa`)."""

    def add_fdb(self, entry: FdbEntry) -> None:
        """Add a (VNI, MAC) -> VTEP entry, or a flood-list member when mac == "flood"."""

    def del_fdb(self, entry: FdbEntry) -> None:
        """Remove the entry with `entry.ident`."""

    def stats(self) -> dict[str, Any]:
        """Counters, read without entering the packet loop:
        {"vf": {NAME: {counter: int}}, "uplink": {counter: int}, "drops": {reason: int},
         "queues": {NAME: [{counter: int}, ...]}} (queues optional)."""

    def sa_stats(self, sa: SA) -> dict[str, int]:
        """Counters of one SA: packets, bytes, seq, and its drop counters."""

    def capture_start(self, scope: str, sink: Callable[[float, bytes], None],
                      snaplen: int) -> int:
        """Start copying frames seen on a VF (scope = name) or the uplink to
        sink(timestamp, frame[:snaplen]); returns a handle. sink never blocks."""

    def capture_stop(self, handle: int) -> None:
        """Stop a capture; no sink call happens after this returns."""


class ControlError(Exception):
    """A request failed and nothing changed. code: invalid-params | not-found | exists |
    datapath-failed | unavailable."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.code = code
        self.message = message
        self.field = field

    @classmethod
    def invalid(cls, e: ValidationError, prefix: str = "") -> ControlError:
        e = e.prefixed(prefix) if prefix else e
        return cls("invalid-params", e.message, e.field or None)


_HEX_RUN = re.compile(r"(?i)(?:0x)?[0-9a-f]{16,}")
_BYTES_LIT = re.compile(r"b(['\"]).*?\1")


def scrub(text: str, limit: int = 300) -> str:
    """Make a foreign error message safe to show: no long hex runs, no bytes literals
    (either could be key material), bounded length."""
    return _BYTES_LIT.sub("<bytes>", _HEX_RUN.sub("<redacted>", text))[:limit]


# --- events ---------------------------------------------------------------------------


class Subscription:
    """One monitor subscriber: a bounded queue of events."""

    def __init__(self, bus: _EventBus, maxlen: int, types: frozenset[str] | None) -> None:
        self._bus = bus
        self._q: collections.deque[dict[str, Any]] = collections.deque()
        self._maxlen = maxlen
        self._types = types
        self._lost = 0
        self._cond = threading.Condition()
        self.closed = False

    def _push(self, ev: dict[str, Any]) -> None:
        if self._types is not None and ev["type"] not in self._types:
            return
        with self._cond:
            if len(self._q) >= self._maxlen:
                self._q.popleft()
                self._lost += 1
            self._q.append(ev)
            self._cond.notify()

    def get(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Wait up to `timeout` s for events; returns those queued (maybe none)."""
        with self._cond:
            if not self._q and not self.closed:
                self._cond.wait(timeout)
            out = list(self._q)
            self._q.clear()
            if self._lost:
                out.insert(0, {"type": "events-lost", "count": self._lost,
                               "time": time.time()})
                self._lost = 0
            return out

    def close(self) -> None:
        self._bus._remove(self)
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _EventBus:
    def __init__(self) -> None:
        self._subs: list[Subscription] = []
        self._lock = threading.Lock()
        self._seq = 0

    def subscribe(self, maxlen: int, types: Iterable[str] | None) -> Subscription:
        s = Subscription(self, maxlen, frozenset(types) if types is not None else None)
        with self._lock:
            self._subs.append(s)
        return s

    def _remove(self, s: Subscription) -> None:
        with self._lock:
            if s in self._subs:
                self._subs.remove(s)

    def post(self, ev: dict[str, Any]) -> None:
        with self._lock:
            self._seq += 1
            ev["seq"] = self._seq
            subs = list(self._subs)
        for s in subs:
            s._push(ev)


def _clean_event(raw: Any) -> dict[str, Any] | None:
    """Keep only JSON scalars under plain names, never anything key-like."""
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        return None
    ev: dict[str, Any] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or "key" in k.lower() or not re.fullmatch(r"[a-z_]{1,32}", k):
            continue
        if isinstance(v, bool | int | float) or v is None:
            ev[k] = v
        elif isinstance(v, str):
            ev[k] = scrub(v, 200)
    ev.setdefault("time", time.time())
    return ev


# --- the change engine ----------------------------------------------------------------


@dataclass
class _Op:
    name: str
    do: Callable[[], None]
    undo: Callable[[], None]
    event: dict[str, Any]
    # One step may stand for several changes (a scope's policy table): their names and
    # events, reported as if each were a step of its own. Empty: just name and event.
    parts: tuple[tuple[str, dict[str, Any]], ...] = ()

    def changes(self) -> list[tuple[str, dict[str, Any]]]:
        return list(self.parts) if self.parts else [(self.name, self.event)]


def _index(items: Iterable[Any]) -> dict[Any, Any]:
    return {x.ident: x for x in items}


class Controller:
    """Owns the running Config and applies every change atomically to a Datapath."""

    def __init__(self, datapath: Datapath, config: Config | None = None,
                 loader: Callable[[], Config] | None = None) -> None:
        self._dp = datapath
        self._loader = loader
        self._lock = threading.RLock()
        self._config = Config()
        self._bus = _EventBus()
        self._vf_state: dict[str, dict[str, Any]] = {}
        self._captures: dict[int, str] = {}
        self._file_config = config if config is not None else Config()
        self.broken = False  # a rollback itself failed: state may differ from the config
        datapath.set_event_sink(self.post_event)
        if config is not None:
            self.apply(config)

    @property
    def config(self) -> Config:
        return self._config

    # events

    def post_event(self, raw: dict[str, Any]) -> None:
        """The datapath's event sink: thread-safe and non-blocking."""
        ev = _clean_event(raw)
        if ev is None:
            return
        if ev["type"] in ("vf-link", "vf-guest", "vf-broken") and isinstance(ev.get("vf"), str):
            st = self._vf_state.setdefault(ev["vf"], {})
            st[{"vf-link": "link", "vf-guest": "guest", "vf-broken": "broken"}[ev["type"]]] = \
                ev.get("state", ev.get("reason", True))
        self._bus.post(ev)

    def subscribe(self, maxlen: int = 1024, types: Iterable[str] | None = None) -> Subscription:
        return self._bus.subscribe(maxlen, types)

    # the one way state changes

    def apply(self, new: Config) -> dict[str, Any]:
        """Validate `new` whole, then make the datapath match it, touching only what
        differs. All or nothing. Returns {"changes": [..]}. Raises ControlError."""
        try:
            new.validate()
        except ValidationError as e:
            raise ControlError.invalid(e) from None
        with self._lock:
            old = self._config
            ops = self._plan(old, new)
            done: list[_Op] = []
            for op in ops:
                try:
                    op.do()
                except Exception as e:  # noqa: BLE001 - any datapath failure rolls back
                    failed = op.name
                    msg = scrub(f"{type(e).__name__}: {e}")
                    if self._rollback(done):
                        log.warning("change rolled back: %s failed (%s)", failed, msg)
                        outcome = "nothing was changed"
                    else:
                        outcome = "the rollback failed too: the data plane may differ from" \
                                  " the configuration (see the daemon log)"
                    raise ControlError("datapath-failed",
                                       f"{failed} failed ({msg}); {outcome}") from None
                done.append(op)
            self._config = new
            for name in {v.name for v in old.vfs} - {v.name for v in new.vfs}:
                self._vf_state.pop(name, None)
        changes = [c for op in done for c in op.changes()]
        for _name, ev in changes:
            self._bus.post(dict(ev, time=time.time()))
        return {"changes": [name for name, _ev in changes]}

    def _rollback(self, done: list[_Op]) -> bool:
        """Undo `done` in reverse; False (and `broken` set) if any undo failed."""
        ok = True
        for op in reversed(done):
            try:
                op.undo()
            except Exception as e:  # noqa: BLE001
                ok = False
                self.broken = True
                log.error("rollback of %s failed (%s); datapath may differ from config",
                          op.name, scrub(str(e)))
        return ok

    def _plan(self, old: Config, new: Config) -> list[_Op]:
        dp = self._dp
        ovf, nvf = {v.name: v for v in old.vfs}, {v.name: v for v in new.vfs}
        gone_vf = {n for n in ovf if nvf.get(n) != ovf[n]}       # deleted or changed
        new_vf = {n for n in nvf if ovf.get(n) != nvf[n]}        # added or changed
        uplink_changed = old.uplink != new.uplink
        # Objects living in a VF (or the uplink) that is re-created must be re-installed.
        recreated = gone_vf | ({UPLINK} if uplink_changed else set())

        def diff(o: Iterable[Any], n: Iterable[Any], scoped: bool) -> tuple[list[Any], list[Any]]:
            oi, ni = _index(o), _index(n)
            dels = [x for k, x in oi.items()
                    if ni.get(k) != x or (scoped and x.scope in recreated)]
            adds = [x for k, x in ni.items()
                    if oi.get(k) != x or (scoped and x.scope in recreated)]
            return dels, adds

        sa_del, sa_add = diff(old.sas, new.sas, True)
        pol_del, pol_add = diff(old.policies, new.policies, True)
        fdb_del, fdb_add = diff(old.fdb, new.fdb, False)
        if uplink_changed:  # FDB remotes live in the uplink
            fdb_del, fdb_add = list(old.fdb), list(new.fdb)

        def sa_ev(t: str, sa: SA) -> dict[str, Any]:
            return {"type": t, "scope": sa.scope, "dir": sa.dir, "spi": f"0x{sa.spi:08x}"}

        def pol_ev(t: str, p: Policy) -> dict[str, Any]:
            return {"type": t, "scope": p.scope, "dir": p.dir, "src": str(p.src),
                    "dst": str(p.dst)}

        def fdb_ev(t: str, e: FdbEntry) -> dict[str, Any]:
            return {"type": t, "vni": e.vni, "mac": e.mac, "remote": str(e.remote)}

        def pol_name(verb: str, p: Policy) -> str:
            return f"{verb} policy {p.scope}/{p.dir} {p.src}->{p.dst}"

        def policies_of(c: Config, scope: str) -> tuple[Policy, ...]:
            return tuple(p for p in c.policies if p.scope == scope)

        def set_policies(scope: str, table: tuple[Policy, ...], was: tuple[Policy, ...],
                         dels: list[Policy], adds: list[Policy]) -> _Op:
            # A scope's SPD changes in one datapath call (RFC 4301 4.4.1: the SPD is an
            # ordered whole): deleting the old protect policy and adding the new one as
            # two steps would leave a moment with neither, in which an offload VF sends
            # the traffic they cover in clear.
            parts = tuple([(pol_name("del", p), pol_ev("policy-deleted", p)) for p in dels]
                          + [(pol_name("add", p), pol_ev("policy-added", p)) for p in adds])
            return _Op(f"set policies {scope}", _bind2(dp.set_policies, scope, table),
                       _bind2(dp.set_policies, scope, was), {"type": "policy-set"}, parts)

        # SAs that must go before the adds: those of a scope that is re-made, and those
        # replaced under the same identity. Every other SA goes after the policy tables
        # have moved off it.
        new_sa_ids = {x.ident for x in new.sas}
        sa_del_first = [x for x in sa_del if x.scope in recreated or x.ident in new_sa_ids]
        sa_del_last = [x for x in sa_del if x not in sa_del_first]
        scopes = sorted({p.scope for p in pol_del} | {p.scope for p in pol_add})

        ops: list[_Op] = []
        for scope in scopes:            # a scope that goes (or is re-made) drops its SPD
            if scope in recreated:
                gone = [p for p in pol_del if p.scope == scope]
                if gone:
                    ops.append(set_policies(scope, (), policies_of(old, scope), gone, []))
        for sa in sa_del_first:
            ops.append(_Op(f"del sa {sa.scope}/{sa.dir}/0x{sa.spi:08x}", _bind(dp.del_sa, sa),
                           _bind(dp.add_sa, sa), sa_ev("sa-deleted", sa)))
        for e in fdb_del:
            ops.append(_Op(f"del fdb {e.vni}/{e.mac}/{e.remote}", _bind(dp.del_fdb, e),
                           _bind(dp.add_fdb, e), fdb_ev("fdb-deleted", e)))
        for n in sorted(gone_vf):
            ops.append(_Op(f"del vf {n}", _bind(dp.del_vf, n), _bind(dp.add_vf, ovf[n]),
                           {"type": "vf-deleted", "vf": n}))
        if uplink_changed:
            ops.append(_Op("set uplink", _bind(dp.set_uplink, new.uplink),
                           _bind(dp.set_uplink, old.uplink), {"type": "uplink-changed"}))
        for n in sorted(new_vf):
            ops.append(_Op(f"add vf {n}", _bind(dp.add_vf, nvf[n]), _bind(dp.del_vf, n),
                           {"type": "vf-added", "vf": n}))
        for e in fdb_add:
            ops.append(_Op(f"add fdb {e.vni}/{e.mac}/{e.remote}", _bind(dp.add_fdb, e),
                           _bind(dp.del_fdb, e), fdb_ev("fdb-added", e)))
        for sa in sa_add:
            ops.append(_Op(f"add sa {sa.scope}/{sa.dir}/0x{sa.spi:08x}", _bind(dp.add_sa, sa),
                           _bind(dp.del_sa, sa), sa_ev("sa-added", sa)))
        for scope in scopes:
            adds = [p for p in pol_add if p.scope == scope]
            if scope not in recreated:
                ops.append(set_policies(scope, policies_of(new, scope),
                                        policies_of(old, scope),
                                        [p for p in pol_del if p.scope == scope], adds))
            elif adds:                  # re-made (its old SPD went with it above)
                ops.append(set_policies(scope, policies_of(new, scope), (), [], adds))
        for sa in sa_del_last:
            ops.append(_Op(f"del sa {sa.scope}/{sa.dir}/0x{sa.spi:08x}", _bind(dp.del_sa, sa),
                           _bind(dp.add_sa, sa), sa_ev("sa-deleted", sa)))
        return ops

    def _change(self, fn: Callable[[Config], Config]) -> dict[str, Any]:
        """One object added or removed: the whole new config is still validated, but an
        error names the request's field ("mac"), not its place in the config ("vf[2].mac")."""
        with self._lock:
            try:
                return self.apply(fn(self._config))
            except ControlError as e:
                if e.field:
                    e.field = re.sub(r"^\w+\[\d+\]\.", "", e.field)
                raise

    # VFs

    def add_vf(self, vf: VF) -> dict[str, Any]:
        def f(c: Config) -> Config:
            if c.vf(vf.name):
                raise ControlError("exists", f"VF '{vf.name}' exists", "name")
            return c.replace(vfs=c.vfs + (vf,))
        return self._change(f)

    def del_vf(self, name: str) -> dict[str, Any]:
        """Delete a VF with its SAs and policies, and FDB entries no other VF's VNI needs."""
        def f(c: Config) -> Config:
            vf = c.vf(name)
            if vf is None:
                raise ControlError("not-found", f"no VF named '{name}'", "name")
            vfs = tuple(v for v in c.vfs if v.name != name)
            vnis = {v.vni for v in vfs}
            return c.replace(vfs=vfs, sas=tuple(s for s in c.sas if s.scope != name),
                             policies=tuple(p for p in c.policies if p.scope != name),
                             fdb=tuple(e for e in c.fdb if e.vni in vnis))
        return self._change(f)

    def list_vfs(self) -> list[dict[str, Any]]:
        c = self._config
        return [dict(v.to_dict(), sas=sum(1 for s in c.sas if s.scope == v.name),
                     **self._vf_state.get(v.name, {})) for v in c.vfs]

    def show_vf(self, name: str) -> dict[str, Any]:
        c = self._config
        vf = c.vf(name)
        if vf is None:
            raise ControlError("not-found", f"no VF named '{name}'", "name")
        st = self.stats()
        return {"vf": vf.to_dict(), "state": dict(self._vf_state.get(name, {})),
                "stats": st["vf"].get(name, {}), "queues": st.get("queues", {}).get(name, []),
                "sas": [s.to_dict() for s in c.sas if s.scope == name],
                "policies": [p.to_dict() for p in c.policies if p.scope == name]}

    # SAs

    def _check_scope(self, c: Config, scope: str) -> None:
        if scope == UPLINK:
            if c.uplink is None:
                raise ControlError("not-found", "no uplink is configured", "scope")
        elif c.vf(scope) is None:
            raise ControlError("not-found", f"no VF named '{scope}'", "scope")

    def add_sa(self, sa: SA) -> dict[str, Any]:
        """Add an SA. Make-before-break rekey: add the new SA, then delete the old one."""
        def f(c: Config) -> Config:
            self._check_scope(c, sa.scope)
            if any(s.ident == sa.ident for s in c.sas):
                raise ControlError("exists", f"an SA {sa.dir} with SPI 0x{sa.spi:08x} exists"
                                   f" in '{sa.scope}'", "spi")
            if sa.scope == UPLINK and c.uplink and sa.src.version != c.uplink.local.version:
                raise ControlError("invalid-params",
                                   "address family differs from the uplink", "src")
            return c.replace(sas=c.sas + (sa,))
        return self._change(f)

    def find_sas(self, scope: str, spi: int | None = None, dir: str | None = None,
                 src: str | None = None, dst: str | None = None) -> list[SA]:
        return [s for s in self._config.sas if s.scope == scope
                and (spi is None or s.spi == spi) and (dir is None or s.dir == dir)
                and (src is None or str(s.src) == src) and (dst is None or str(s.dst) == dst)]

    def _one_sa(self, scope: str, spi: int, **kw: Any) -> SA:
        self._check_scope(self._config, scope)
        found = self.find_sas(scope, spi, **kw)
        if not found:
            raise ControlError("not-found", f"no SA with SPI 0x{spi:08x} in '{scope}'", "spi")
        if len(found) > 1:
            raise ControlError("invalid-params", "SPI is used in both directions; give dir",
                               "dir")
        return found[0]

    def get_sa(self, scope: str, spi: int, **kw: Any) -> dict[str, Any]:
        sa = self._one_sa(scope, spi, **kw)
        return dict(sa.to_dict(), stats=self._sa_stats(sa))

    def del_sa(self, scope: str, spi: int, **kw: Any) -> dict[str, Any]:
        def f(c: Config) -> Config:
            sa = self._one_sa(scope, spi, **kw)
            return c.replace(sas=tuple(s for s in c.sas if s.ident != sa.ident))
        return self._change(f)

    def list_sas(self, scope: str | None = None) -> list[dict[str, Any]]:
        if scope is not None:
            self._check_scope(self._config, scope)
        return [s.to_dict() for s in self._config.sas if scope is None or s.scope == scope]

    def flush_sas(self, scope: str | None = None) -> dict[str, Any]:
        def f(c: Config) -> Config:
            if scope is not None:
                self._check_scope(c, scope)
            return c.replace(sas=tuple(s for s in c.sas if scope is not None
                                       and s.scope != scope))
        return self._change(f)

    # policies

    def add_policy(self, p: Policy) -> dict[str, Any]:
        def f(c: Config) -> Config:
            self._check_scope(c, p.scope)
            if any(q.ident == p.ident for q in c.policies):
                raise ControlError("exists", "a policy with this selector exists", "src")
            return c.replace(policies=c.policies + (p,))
        return self._change(f)

    def del_policy(self, sel: Policy) -> dict[str, Any]:
        """Delete the policy whose selector equals `sel`'s (action etc. are ignored)."""
        def f(c: Config) -> Config:
            self._check_scope(c, sel.scope)
            if not any(q.ident == sel.ident for q in c.policies):
                raise ControlError("not-found", "no policy with this selector", "src")
            return c.replace(policies=tuple(q for q in c.policies if q.ident != sel.ident))
        return self._change(f)

    def list_policies(self, scope: str | None = None) -> list[dict[str, Any]]:
        if scope is not None:
            self._check_scope(self._config, scope)
        pols = sorted((p for p in self._config.policies if scope is None or p.scope == scope),
                      key=lambda p: (p.scope, p.dir, p.priority))
        return [p.to_dict() for p in pols]

    # FDB

    def add_fdb(self, e: FdbEntry, replace: bool = False) -> dict[str, Any]:
        """Add an entry; with replace, a MAC that lives elsewhere moves in one change
        (as `bridge fdb replace`)."""
        def f(c: Config) -> Config:
            old = [x for x in c.fdb if x.ident == e.ident]
            if old and not replace:
                raise ControlError("exists", "this FDB entry exists", "mac")
            return c.replace(fdb=tuple(x for x in c.fdb if x.ident != e.ident) + (e,))
        return self._change(f)

    def del_fdb(self, e: FdbEntry) -> dict[str, Any]:
        def f(c: Config) -> Config:
            if e not in c.fdb:  # the remote must match too
                raise ControlError("not-found", "no such FDB entry", "mac")
            return c.replace(fdb=tuple(x for x in c.fdb if x != e))
        return self._change(f)

    def list_fdb(self, vni: int | None = None) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self._config.fdb if vni is None or e.vni == vni]

    # reload

    def reload(self) -> dict[str, Any]:
        """Re-read the config file (the loader given at start) and apply what changed in
        the FILE since it was last applied. Objects added live through the admin socket
        (e.g. SAs an IKE daemon installed) are kept, unless the file removes the VF they
        live in. Daemon settings (socket path etc.) need a restart and are kept."""
        if self._loader is None:
            raise ControlError("unavailable", "no configuration file to reload")
        try:
            new_file = self._loader()
        except ValidationError as e:
            raise ControlError.invalid(e) from None
        except ValueError as e:  # config.ConfigError
            raise ControlError("invalid-params", scrub(str(e)),
                               getattr(e, "field", None) or None) from None
        with self._lock:
            old_file = self._file_config
            run = self._config

            def merge(cur: tuple[Any, ...], old: tuple[Any, ...], new: tuple[Any, ...],
                      key: Callable[[Any], Any]) -> tuple[Any, ...]:
                out = {key(x): x for x in cur}
                for x in old:
                    out.pop(key(x), None)
                for x in new:
                    out[key(x)] = x
                return tuple(out.values())

            vfs = merge(run.vfs, old_file.vfs, new_file.vfs, lambda v: v.name)
            names = {v.name for v in vfs} | {UPLINK}
            vnis = {v.vni for v in vfs}
            target = Config(
                daemon=run.daemon, uplink=new_file.uplink, vfs=vfs,
                sas=tuple(x for x in merge(run.sas, old_file.sas, new_file.sas,
                                           lambda x: x.ident) if x.scope in names),
                policies=tuple(x for x in merge(run.policies, old_file.policies,
                                                new_file.policies, lambda x: x.ident)
                               if x.scope in names),
                fdb=tuple(x for x in merge(run.fdb, old_file.fdb, new_file.fdb,
                                           lambda x: x.ident) if x.vni in vnis))
            result = self.apply(target)
            self._file_config = new_file
        self._bus.post({"type": "reloaded", "changes": len(result["changes"]),
                        "time": time.time()})
        return result

    def request_reload(self) -> threading.Thread:
        """Reload in a new thread; safe to call from a signal handler (SIGHUP), which must
        not take the controller lock itself (it may interrupt the thread holding it).
        The outcome is logged and posted as a "reloaded" or "reload-failed" event."""
        def run() -> None:
            try:
                r = self.reload()
                log.info("reload: %d changes", len(r["changes"]))
            except ControlError as e:
                log.error("reload failed: %s %s", e.code, scrub(str(e)))
                self._bus.post({"type": "reload-failed", "code": e.code,
                                "field": e.field, "time": time.time()})
        t = threading.Thread(target=run, name="reload", daemon=True)
        t.start()
        return t

    # stats and capture

    def _sa_stats(self, sa: SA) -> dict[str, int]:
        try:
            raw = self._dp.sa_stats(sa)
        except Exception as e:  # noqa: BLE001
            log.warning("sa_stats failed: %s", scrub(str(e)))
            return {}
        return {str(k): int(v) for k, v in raw.items() if isinstance(v, int)}

    def stats(self) -> dict[str, Any]:
        """{"vf": {NAME: {..}}, "uplink": {..}, "drops": {reason: n}, "queues": {..},
        "sa": [{scope, dir, spi, counters...}]}"""
        try:
            raw = self._dp.stats()
        except Exception as e:  # noqa: BLE001
            raise ControlError("datapath-failed", scrub(f"stats failed: {e}")) from None
        out: dict[str, Any] = {"vf": raw.get("vf", {}), "uplink": raw.get("uplink", {}),
                               "drops": raw.get("drops", {}), "queues": raw.get("queues", {})}
        out["sa"] = [dict(scope=s.scope, dir=s.dir, spi=f"0x{s.spi:08x}", **self._sa_stats(s))
                     for s in self._config.sas]
        return out

    def capture_start(self, scope: str, sink: Callable[[float, bytes], None],
                      snaplen: int = 65535) -> int:
        self._check_scope(self._config, scope)
        try:
            h = self._dp.capture_start(scope, sink, snaplen)
        except Exception as e:  # noqa: BLE001
            raise ControlError("datapath-failed", scrub(f"capture failed: {e}")) from None
        self._captures[h] = scope
        return h

    def capture_stop(self, handle: int) -> None:
        if self._captures.pop(handle, None) is None:
            raise ControlError("not-found", "no such capture", "capture")
        self._dp.capture_stop(handle)

    def capture_active(self, handle: int) -> bool:
        return handle in self._captures

    def metrics_text(self) -> str:
        return prometheus_text(self.stats())


def _bind(fn: Callable[..., None], arg: Any) -> Callable[[], None]:
    return lambda: fn(arg)


def _bind2(fn: Callable[..., None], a: Any, b: Any) -> Callable[[], None]:
    return lambda: fn(a, b)


def _esc(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _metric(name: str) -> str:
    name = re.sub(r"[^a-zA-Z0-9_]", "_", name)
    return name if name.endswith("_total") else name + "_total"


def prometheus_text(st: dict[str, Any]) -> str:
    """Stats in the Prometheus text exposition format (version 0.0.4), counters only."""
    series: dict[str, list[str]] = collections.defaultdict(list)
    for vf, counters in sorted(st.get("vf", {}).items()):
        for k, v in sorted(counters.items()):
            series[_metric("softnic_vf_" + k)].append(f'{{vf="{_esc(vf)}"}} {int(v)}')
    for vf, queues in sorted(st.get("queues", {}).items()):
        for qi, counters in enumerate(queues):
            for k, v in sorted(counters.items()):
                if k == "lane":             # which worker, not a count
                    continue
                series[_metric("softnic_queue_" + k)].append(
                    f'{{vf="{_esc(vf)}",queue="{qi}"}} {int(v)}')
    for k, v in sorted(st.get("uplink", {}).items()):
        series[_metric("softnic_uplink_" + k)].append(f" {int(v)}")
    for reason, v in sorted(st.get("drops", {}).items()):
        series["softnic_drops_total"].append(f'{{reason="{_esc(reason)}"}} {int(v)}')
    for sa in st.get("sa", []):
        labels = f'scope="{_esc(sa["scope"])}",dir="{sa["dir"]}",spi="{sa["spi"]}"'
        for k, v in sorted(sa.items()):
            if k in ("scope", "dir", "spi") or not isinstance(v, int):
                continue
            series[_metric("softnic_sa_" + k)].append(f"{{{labels}}} {v}")
    lines = []
    for name in sorted(series):
        lines.append(f"# TYPE {name} counter")
        lines += [name + s for s in series[name]]
    return "\n".join(lines) + "\n"
