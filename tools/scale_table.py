"""The scale table of durable progress: rows/s, memory and output files at 1k/10k/50k rows, a run
killed at ~60% and rerun, and a 2-worker multi-process run.

A tiny random Llama (tests/tiny_chat_model.py) is the target, so the pipeline, not the model, is
measured: prompts of ~10-300 tokens, ``mode = "ar"``, 8 new tokens, 0.5% bad rows. Each run is a
``dflash-batch run`` in its own process, as a user would start it; memory is that process's
peak resident set, its worker processes' included (sampled every 0.5 s).

    python -P tools/scale_table.py WORKDIR [--sizes 1000,10000,50000] [--kill 50000] [--multi 10000]

Prints a Markdown table. Checks, and exits 1 when one fails: every run's rows in = completions +
dead letters with each id once, and a killed run's rerun decodes at most 45% of the rows.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "summarize", "papers", "results",
         "method", "benchmarks", "code", "released", "scientific", "text", "sentences"]
BUCKETS = [64, 128, 256, 384]  # + 8 new tokens within the tiny model's 512 positions


def make_input(folder: Path, n: int, shards: int = 10) -> Path:
    """``n`` prompt rows in ``shards`` files; every 200th row is bad (an empty prompt)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(n)
    rows = [{"id": f"r{i:07d}", "prompt": "" if i % 200 == 7 else " ".join(rng.choices(WORDS, k=rng.randint(3, 80)))}
            for i in range(n)]
    for s in range(shards):
        pq.write_table(pa.Table.from_pylist(rows[s::shards]), folder / f"p-{s:02d}.parquet")
    return folder


def job_file(folder: Path, model: Path, inputs: Path, out: Path, workers: int = 1) -> Path:
    mode = "multi_processing" if workers > 1 else "in_memory"
    path = folder / f"{out.name}.toml"
    path.write_text(f"""
name = "scale"
input = "{inputs}"
output = "{out}"
[model]
target = "{model}"
[decode]
mode = "ar"
batch_size = 8
max_new_tokens = 8
prompt_buckets = {BUCKETS}
[prompt]
template = "none"
[runner]
direct_num_workers = {workers}
direct_running_mode = "{mode}"
""")
    return path


def completion_ids(out: Path) -> list[str]:
    import pyarrow.parquet as pq

    ids = []
    for p in sorted(out.glob("completions-*.parquet")):
        try:
            ids += pq.read_table(p, columns=["id"]).column("id").to_pylist()
        except Exception:  # noqa: BLE001 - a part renamed away while listed
            pass
    return ids


def run(job: Path, out: Path, stop_at: int | None = None, sig: int = signal.SIGKILL) -> dict:
    """Runs the job in a new process (sending ``sig`` once ``stop_at`` completions are saved)."""
    cmd = [sys.executable, "-P", "-c", "from dflash_batch.jobs.cli import main; main()", "run", str(job),
           "--no-progress"]
    import psutil

    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=job.parent)
    peak, last_look = 0, 0.0
    tree = psutil.Process(proc.pid)
    while proc.poll() is None:
        time.sleep(0.5)
        try:  # the job's process and its worker processes, together
            peak = max(peak, sum(p.memory_info().rss for p in [tree, *tree.children(recursive=True)]))
        except psutil.Error:
            pass
        if stop_at is not None and time.time() - last_look > 2.0:
            last_look = time.time()
            if len(completion_ids(out)) >= stop_at:
                proc.send_signal(sig)
                stop_at = None
    stderr = proc.stderr.read()
    return {"rc": proc.returncode, "wall": time.time() - t0, "peak_mib": peak / 2**20, "stderr": stderr}


def files(out: Path) -> str:
    parts = list(out.glob("completions-*.parquet")) + list(out.glob("dead_letters-*.parquet"))
    return f"{len(parts)} files, {sum(p.stat().st_size for p in parts) / 2**20:.1f} MiB"


def check(out: Path, n: int) -> tuple[bool, dict]:
    stats = json.loads((out / "job_stats.json").read_text())
    ids = completion_ids(out)
    ok = (len(ids) == len(set(ids)) == stats["completions_out"]
          and stats["rows_in"] == n == stats["completions_out"] + stats["dead_letters"])
    return ok, stats


def workers_share(out: Path) -> str:
    import pyarrow.parquet as pq

    c = collections.Counter(w for p in out.glob("completions-*.parquet")
                            for w in pq.read_table(p, columns=["worker"]).column("worker").to_pylist())
    total = sum(c.values())
    return " / ".join(f"{v / total:.0%}" for v in sorted(c.values(), reverse=True))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--sizes", default="1000,10000,50000")
    ap.add_argument("--kill", type=int, default=50000, help="rows of the job killed at ~60%% (0: none)")
    ap.add_argument("--signals", default="KILL,INT")
    ap.add_argument("--multi", type=int, default=10000, help="rows of the 2-worker job (0: none)")
    args = ap.parse_args()
    from tiny_chat_model import make_tiny_chat_checkpoint

    work = args.workdir.resolve()
    model = work / "model"
    if not (model / "config.json").exists():
        make_tiny_chat_checkpoint(model)
    failed = False
    print("| run | rows | wall s | rows/s | peak MiB | output | checks |")
    print("|---|---|---|---|---|---|---|")
    for n in [int(s) for s in args.sizes.split(",") if s]:
        out = work / f"out-{n}"
        r = run(job_file(work, model, make_input(work / f"in-{n}", n), out), out)
        ok, stats = check(out, n)
        failed |= not ok or r["rc"] != 0
        print(f"| clean | {n} | {r['wall']:.0f} | {n / r['wall']:.0f} | {r['peak_mib']:.0f} | {files(out)} "
              f"| {'ok' if ok else 'FAIL'}: {stats['completions_out']} completions + {stats['dead_letters']} dead |",
              flush=True)
    for name in [s for s in args.signals.split(",") if s] if args.kill else []:
        n, sig = args.kill, getattr(signal, f"SIG{name}")
        out = work / f"out-kill-{name}-{n}"
        job = job_file(work, model, make_input(work / f"in-{n}", n), out)
        first = run(job, out, stop_at=int(0.6 * n), sig=sig)
        kept = len(set(completion_ids(out)))
        said = [line for line in first["stderr"].splitlines() if "kept" in line]
        second = run(job, out)
        ok, stats = check(out, n)
        rerun = stats["completions_this_run"]
        ok &= rerun <= 0.45 * n
        failed |= not ok
        print(f"| SIG{name} at {kept / n:.0%}, then rerun | {n} | {first['wall']:.0f} + {second['wall']:.0f} | "
              f"- | - | {files(out)} | {'ok' if ok else 'FAIL'}: kept {kept}, rerun decoded {rerun} "
              f"({rerun / n:.0%}); {stats['completions_out']} + {stats['dead_letters']} dead; "
              f"{said[0].strip() if said else ''} |", flush=True)
    if args.multi:
        n = args.multi
        out = work / f"out-multi-{n}"
        r = run(job_file(work, model, make_input(work / f"in-{n}", n), out, workers=2), out)
        ok, stats = check(out, n)
        failed |= not ok or r["rc"] != 0
        print(f"| 2 processes | {n} | {r['wall']:.0f} | {n / r['wall']:.0f} | {r['peak_mib']:.0f} | "
              f"{files(out)} | {'ok' if ok else 'FAIL'}: worker shares {workers_share(out)} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
