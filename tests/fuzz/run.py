"""Run one fuzz harness for a time budget and report what it ran.

    python tests/fuzz/run.py HARNESS [--seconds 60] [--engine auto|atheris|random]
                             [--seed N] [--corpus DIR] [--crash-dir DIR] [--json FILE]

HARNESS is one of esp, tso, vxlan, vring. Engines:
- atheris: libFuzzer through atheris, coverage-guided on the Python side (harness and
  the vhost/softnic Python layers) plus one edge per outcome kind (drop reason, ring
  error), so inputs that reach a new verdict are kept and mutated further. The compiled
  code itself carries no coverage instrumentation with gcc (see docs/fuzzing.md).
- random: a mutation loop of our own (bit flips, byte sets, inserts, deletes, splices,
  truncation) over the seeds and every input that produced a new outcome label.
- auto: atheris when importable, else random.

The last line printed is a JSON object: harness, engine, cases, seconds, outcomes
(distinct labels), findings. On a finding the input is saved in --crash-dir
(hex also printed) and the exit status is 1. A sanitizer report aborts the process
before that line: scripts/fuzz.sh reads the status and the report.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import random
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for p in (os.path.dirname(HERE), ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)

HARNESSES = ("esp", "tso", "vxlan", "vring")

from fuzz.common import mutate  # noqa: E402


class Runner:
    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name = name
        self.mod = importlib.import_module(f"fuzz.{name}")
        self.args = args
        self.cases = 0
        self.outcomes: dict[str, int] = {}
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.seconds

    def case(self, data: bytes) -> str:
        self.cases += 1
        try:
            label = self.mod.one(data)
        except Exception:
            self.finding(data, traceback.format_exc())
            raise SystemExit(1) from None
        self.outcomes[label] = self.outcomes.get(label, 0) + 1
        return label

    def finding(self, data: bytes, tb: str) -> None:
        os.makedirs(self.args.crash_dir, exist_ok=True)
        path = os.path.join(self.args.crash_dir,
                            f"{self.name}-{hashlib.sha1(data).hexdigest()[:16]}")
        with open(path, "wb") as f:
            f.write(data)
        print(f"FINDING in {self.name}: input saved to {path}\n  hex: {data.hex()}\n{tb}",
              file=sys.stderr, flush=True)
        self.report(findings=1)

    def report(self, findings: int = 0, engine: str | None = None) -> None:
        out = {"harness": self.name, "engine": engine or self.args.engine, "cases": self.cases,
               "seconds": round(time.monotonic() - self.t0, 1),
               "outcomes": len(self.outcomes), "findings": findings}
        if self.args.json:
            with open(self.args.json, "w") as f:
                json.dump(dict(out, labels=self.outcomes), f, indent=1, sort_keys=True)
        print(json.dumps(out), flush=True)

    def corpus(self) -> list[bytes]:
        seeds = list(self.mod.SEEDS)
        if self.args.corpus and os.path.isdir(self.args.corpus):
            for fn in sorted(os.listdir(self.args.corpus)):
                with open(os.path.join(self.args.corpus, fn), "rb") as f:
                    seeds.append(f.read())
        return seeds

    def run_random(self) -> None:
        rng = random.Random(self.args.seed)
        pool = self.corpus()
        seen: set[str] = set()
        for s in pool:
            seen.add(self.case(s))
        while time.monotonic() < self.deadline:
            if rng.randrange(8) == 0:
                data = bytes(rng.randrange(256) for _ in range(rng.randrange(300)))
            else:
                data = mutate(rng, rng.choice(pool), pool)
            label = self.case(data)
            if label not in seen:           # a new verdict: keep the input that found it
                seen.add(label)
                pool.append(data)
        self.report(engine="random")

    def run_atheris(self) -> None:
        import atheris

        feedback = _feedback_fn(atheris)
        with atheris.instrument_imports(include=["fuzz", "vhost", "softnic"]):
            importlib.reload(self.mod)

        def test_one(data: bytes) -> None:
            if time.monotonic() >= self.deadline:
                self.report(engine="atheris")
                os._exit(0)                  # libFuzzer would exit without our report
            feedback(self.case(data))

        argv = [sys.argv[0], f"-seed={self.args.seed}", "-max_len=4096",
                f"-max_total_time={int(self.args.seconds) + 5}", "-print_final_stats=0",
                "-timeout=20", "-rss_limit_mb=4096", f"-artifact_prefix={self.args.crash_dir.rstrip('/')}/"]
        os.makedirs(self.args.crash_dir, exist_ok=True)
        corpus_dir = self.args.corpus
        if corpus_dir:
            os.makedirs(corpus_dir, exist_ok=True)
            for s in self.mod.SEEDS:
                p = os.path.join(corpus_dir, "seed-" + hashlib.sha1(s).hexdigest()[:12])
                if not os.path.exists(p):
                    with open(p, "wb") as f:
                        f.write(s)
            argv.append(corpus_dir)
        atheris.Setup(argv, test_one)
        atheris.Fuzz()


def _feedback_fn(atheris):  # type: ignore[no-untyped-def]
    """One branch per outcome word, so libFuzzer counts a new verdict as new coverage."""
    from softnic._batch import DROP_REASONS
    from vhost._virtq import VQ_ERRORS

    words = sorted(set(DROP_REASONS) | set(VQ_ERRORS) | {"none"})
    lines = ["def feedback(label):", "    n = 0",
             "    for w in label.replace(':', ',').split(','):"]
    for i, w in enumerate(words):
        lines.append(f"        {'if' if i == 0 else 'elif'} w == {w!r}:")
        lines.append(f"            n += {i + 1}")
    lines.append("    return n")
    ns: dict[str, object] = {}
    exec(compile("\n".join(lines), "<feedback>", "exec"), ns)  # noqa: S102
    return atheris.instrument_func(ns["feedback"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("harness", choices=HARNESSES)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--engine", choices=("auto", "atheris", "random"), default="auto")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--corpus")
    ap.add_argument("--crash-dir", default="fuzz-crashes")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.engine == "auto":
        try:
            import atheris  # noqa: F401
            args.engine = "atheris"
        except ImportError:
            args.engine = "random"
    r = Runner(args.harness, args)
    if args.engine == "atheris":
        r.run_atheris()
    else:
        r.run_random()
    return 0


if __name__ == "__main__":
    sys.exit(main())
