"""The long fuzz campaign (make fuzz): every op of ops.CASES for ``--examples`` cases, each op's
cases in a child process (a crash or a hang kills only the child: the parent records it with
the child's seed and the case it was running, then restarts with the next seed), results
summed into a table on stdout and in bench/results/fuzz.json.

    python tests/fuzz/campaign.py --examples 10000 --time-limit 2400 [--jobs 2] [--ops a,b]
        [--resume]

``--time-limit`` (seconds, whole campaign) is shared out over the ops still to run, so a
bounded run reports honest counts; ``--resume`` adds to the counts already in the output file
(new seeds, so new cases) until each op reaches ``--examples``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

COLUMNS = ("cases", "pass", "wrong", "accepted_invalid", "unclear_error", "crash", "mutated")
#: Kinds a child counts (harness_error: the case builder itself failed, a bug of this suite).
CHILD_KINDS = ("pass", "wrong", "accepted_invalid", "unclear_error", "mutated", "harness_error")
SAMPLES = 5
HANG_S = 300
#: Cases per hypothesis run inside a child (each run from its own seed).
CHUNK = 50


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def child(name: str, examples: int, seed: int, deadline: float, progress: Path) -> None:
    """Runs ``examples`` cases of one op from ``seed`` (hypothesis, generation only: no
    shrinking, every case judged and counted) until ``deadline``, writing counts to
    ``progress`` every second and the case about to run to ``progress``.current."""
    import hypothesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    from fuzz.harness import evaluate
    from fuzz.ops import CASES

    counts = dict.fromkeys(CHILD_KINDS, 0)
    samples: dict[str, list] = {}
    current = progress.with_suffix(".current")
    last = [0.0]
    run_seed = [seed]

    def dump(done: bool) -> None:
        _write_json(progress, {"counts": counts, "samples": samples, "done": done})

    def body(data) -> None:
        try:
            case = data.draw(CASES[name])
        except Exception as err:  # noqa: BLE001 - a bug of the suite, counted apart
            kind, detail, desc = "harness_error", f"{type(err).__name__}: {err}"[:400], {}
        else:
            current.write_text(json.dumps(case.desc, default=str))
            kind, detail = evaluate(case)
            desc = case.desc
        counts[kind] += 1
        if kind != "pass" and len(samples.setdefault(kind, [])) < SAMPLES:
            samples[kind].append({"seed": run_seed[0], "detail": detail, "case": desc})
        if time.time() - last[0] > 1.0:
            last[0] = time.time()
            dump(False)

    # Chunks of CHUNK cases, each from its own seed, until ``examples`` or the deadline (a
    # hypothesis run cannot stop early without breaking its replay of the data it drew).
    done, chunk = 0, 0
    while done < examples and time.time() < deadline:
        n = min(CHUNK, examples - done)
        before = sum(counts.values())
        configured = settings(
            max_examples=n,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        run_seed[0] = seed * 1_000_003 + chunk

        @configured
        @hypothesis.seed(run_seed[0])
        @given(st.data())
        def run(data) -> None:
            body(data)

        run()
        if sum(counts.values()) == before:
            break  # nothing new to draw
        done += sum(counts.values()) - before
        chunk += 1
    dump(True)


def _run_op(name: str, entry: dict, target: int, budget: float, base_seed: int) -> None:
    """Runs children for one op until ``target`` cases or ``budget`` seconds, into ``entry``."""
    start = time.time()
    deadline = start + budget
    with tempfile.TemporaryDirectory() as tmp:
        progress = Path(tmp) / "progress.json"
        while entry["cases"] < target and time.time() < deadline - 1:
            seed = base_seed + len(entry["seeds"])
            entry["seeds"].append(seed)
            progress.unlink(missing_ok=True)
            cmd = [sys.executable, __file__, "--child", name, "--examples",
                   str(target - entry["cases"]), "--seed", str(seed), "--deadline", str(deadline),
                   "--progress", str(progress)]  # fmt: skip
            proc = subprocess.Popen(cmd, cwd=ROOT)
            hung = False
            while proc.poll() is None:
                time.sleep(0.5)
                stamp = progress.stat().st_mtime if progress.exists() else start
                if time.time() - max(stamp, start) > HANG_S and time.time() > deadline:
                    hung = True
                    proc.kill()
                    proc.wait()
            state = json.loads(progress.read_text()) if progress.exists() else {}
            for kind, n in state.get("counts", {}).items():
                entry[kind] = entry.get(kind, 0) + n
                entry["cases"] += n if kind != "harness_error" else 0
            for kind, items in state.get("samples", {}).items():
                keep = entry["samples"].setdefault(kind, [])
                keep.extend(items[: SAMPLES - len(keep)])
            if proc.returncode != 0 or not state.get("done"):
                entry["crash"] += 1
                entry["cases"] += 1
                cur = progress.with_suffix(".current")
                case = cur.read_text() if cur.exists() else "(before the first case)"
                keep = entry["samples"].setdefault("crash", [])
                if len(keep) < SAMPLES:
                    why = "hang" if hung else f"exit status {proc.returncode}"
                    keep.append({"seed": seed, "detail": why, "case": case})
            elif state.get("done") and entry["cases"] < target and time.time() < deadline - 1:
                continue  # hypothesis ran out of distinct cases for this seed: next seed
    entry["seconds"] = round(entry.get("seconds", 0) + time.time() - start, 1)


def table(ops: dict) -> str:
    head = f"{'op':30}" + "".join(f"{c:>17}" for c in COLUMNS)
    lines = [head, "-" * len(head)]
    for name, e in ops.items():
        lines.append(f"{name:30}" + "".join(f"{e.get(c, 0):>17}" for c in COLUMNS))
    total = {c: sum(e.get(c, 0) for e in ops.values()) for c in COLUMNS}
    lines.append(f"{'total':30}" + "".join(f"{total[c]:>17}" for c in COLUMNS))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000, help="cases per op")
    parser.add_argument("--time-limit", type=float, default=3600.0, help="seconds, all ops")
    parser.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fuzz.json")
    parser.add_argument("--resume", action="store_true", help="add to the counts in --out")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--jobs", type=int, default=1, help="ops run in parallel")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--progress", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.examples, args.seed, args.deadline, args.progress)
        return

    from fuzz.ops import CASES

    names = [n for n in args.ops.split(",") if n] or list(CASES)
    unknown = set(names) - set(CASES)
    if unknown:
        parser.error(f"unknown ops {sorted(unknown)}; known: {sorted(CASES)}")
    results = json.loads(args.out.read_text()) if args.resume and args.out.exists() else {}
    ops = results.setdefault("ops", {})
    import torch

    import ferrograd as fg

    results.update(
        machine=platform.machine(),
        cpu=platform.processor() or fg.cpu_info().get("brand", ""),
        simd=fg.simd_level(),
        threads=fg.get_num_threads(),
        torch=torch.__version__,
        ferrograd=fg.__version__,
        examples_per_op=args.examples,
    )
    end = time.time() + args.time_limit
    todo = [n for n in names if ops.get(n, {}).get("cases", 0) < args.examples]
    for name in todo:
        ops.setdefault(name, {c: 0 for c in COLUMNS} | {"seeds": [], "samples": {}})
    queue = list(todo)
    lock = threading.Lock()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                left = len(queue)
                name = queue.pop(0)
                # The time left, shared out over the ops not yet started, per parallel job.
                budget = (end - time.time()) * min(args.jobs, left) / left
                entry = ops[name]
            print(
                f"== {name}: {entry['cases']} -> {args.examples} cases, {budget:.0f} s", flush=True
            )
            _run_op(name, entry, args.examples, budget, args.seed + 1000 * list(CASES).index(name))
            with lock:
                results["seconds"] = round(sum(e.get("seconds", 0) for e in ops.values()), 1)
                _write_json(args.out, results)

    threads = [threading.Thread(target=worker) for _ in range(args.jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(table(ops))
    short = [n for n in names if ops.get(n, {}).get("cases", 0) < args.examples]
    if short:
        print(f"below {args.examples} cases (time limit): {', '.join(short)}")
    bad = {n: e["samples"] for n, e in ops.items() if e.get("samples")}
    for name, samples in bad.items():
        for kind, items in samples.items():
            for s in items[:2]:
                print(f"{name} {kind} (seed {s['seed']}): {s['detail'][:300]}")


if __name__ == "__main__":
    main()
