"""Side-by-side throughput on the same prompts, in one run on one machine.

For each batch size it builds and warms up every decoder configuration first: plain AR
(the lossless reference and the speedup denominator), and every speculative mode at every
block length asked for plus the automatic block choice. Then it runs them ``repeats``
rounds, every configuration in every round, all at once: their decoders take turns of one
prompt's prefill or one decode call each (about a second; the steps of ``Decoder.start``),
each timed on its own clock, so a shared machine's slow spells fall on
every configuration alike rather than on whichever ran during them. The first
``learning_rounds`` rounds are run but not counted: there the automatic block choice learns
its acceptance, as it does over a job's first rows and then never again (over a job of a
million rows that costs nothing; over the bench's few rows per batch size it would weigh a
third of the result). Their tokens/s are reported apart (``learning_runs``). Hugging Face
``generate``, when asked for, runs after those rounds in a child process: PyTorch's threads
slow the XLA cells that follow them on a small machine. A cell's tokens/s is the
median of its runs. Its speedup is the median of its per-round ratios to AR's run in the
same round, except at batch 1: there a cell's row and AR's same row of the same round did
the same work moments apart, and the speedup is the median of those per-row ratios
(``paired_ratios``): a round there lasts a few seconds per configuration, about as long as a
slow spell of a shared machine, and a median over every row of every round is not thrown by
the spells that hit one configuration's turns and not the other's. Outputs are compared with
AR's token for token.

With several dtypes (``--dtypes float32,bfloat16``) each dtype's configurations join the same
rounds, so the dtypes are compared like the modes. A row's speedup stays over the AR of its own
dtype and batch size; ``speedup_vs_float32_ar`` is over float32's AR, computed the same way.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import statistics
import time
from typing import Any, Callable, Iterator, Sequence

import jax

import numpy as np

from dflash_batch.decoder import DRAFTER_MODES, ROWS_PER_SLOT, DecodeConfig, Decoder, Request, Result, TargetModel
from dflash_batch.schemas import tau_from_histogram


class DecoderCell:
    """One decoder configuration on the bench's prompts: warmed up once, then run on demand."""

    def __init__(self, target: TargetModel, requests: Sequence[Request], batch_size: int, max_new_tokens: int,
                 mode: str = "ar", drafter=None, block_size: int | str = "auto",
                 prompt_buckets: Sequence[int] | None = None, label: str | None = None, dtype: str | None = None):
        kw = {"prompt_buckets": tuple(prompt_buckets)} if prompt_buckets else {}
        self.mode, self.block_size, self.requests = label or mode, block_size, requests
        self.dtype = dtype or str(target.params["embed"].dtype)  # what the target was loaded in
        config = DecodeConfig(mode=mode, batch_size=batch_size, max_new_tokens=max_new_tokens, block_size=block_size,
                              **kw)
        self.decoder = Decoder(target, config, drafter if mode in DRAFTER_MODES else None)
        self.compile_seconds = self.decoder.warmup(max(self.decoder.bucket(len(r.token_ids)) for r in requests))
        self.runs: list[float] = []
        self.learning_runs: list[float] = []
        self.results: list = []
        self.turns: list[list[tuple[str, int, float]]] = []  # per counted run: (row id, tokens, seconds) per turn

    def start(self) -> None:
        """Begins one run over the bench's prompts; ``advance`` drives it."""
        self._gen = self._turns()
        self._seconds, self._row_seconds, self.results = 0.0, 0.0, []
        self.turns.append([])

    def _turns(self) -> Iterator[list[Result]]:
        """The run's steps, one turn each: one prompt's prefill, or one decode call and the
        rows it finished. A turn ends when its work has run (prefill is dispatched
        asynchronously), so that it does not run on into another configuration's turn."""
        batch = self.decoder.start(self.requests)
        while True:
            while batch.refill(limit=1):
                jax.block_until_ready(batch.engine.state)
                yield []
            if not batch.busy:
                return
            batch.decode()
            yield batch.harvest()

    def advance(self) -> bool:
        """Runs one turn, timed on this cell's clock: one prompt's prefill or one decode call
        (about a second), and hands out the rows it finished. False once the run is over, its
        tokens/s then appended to ``runs``. A finished row books every second since the row
        before (at batch 1: its own prefill and decode calls, as ``paired_ratios`` needs)."""
        t0 = time.perf_counter()
        finished = next(self._gen, None)
        seconds = time.perf_counter() - t0
        self._seconds += seconds
        self._row_seconds += seconds
        if finished is None:
            self.runs.append(sum(r.completion_tokens for r in self.results) / self._seconds)
            return False
        for row in finished:
            self.results.append(row)
            self.turns[-1].append((row.id, row.completion_tokens, self._row_seconds))
            self._row_seconds = 0.0
        return True

    @property
    def tokens(self) -> dict[str, list[int]]:
        return {r.id: r.token_ids for r in self.results}

    def tau(self) -> float:
        hist = sum((r.accepted_per_step for r in self.results), np.zeros(max(self.decoder.blocks), np.int64))
        return float(tau_from_histogram(hist, empty=1.0))

    def reports(self) -> dict:
        """The automatic block choice and the hybrid chooser's view, where they apply."""
        report, out = self.decoder.block_report(), {}
        if self.block_size == "auto" and self.mode != "ar":
            out["auto"] = report
        if self.mode == "hybrid":
            out["hybrid"] = {k: v["hybrid"] for k, v in report.items() if "hybrid" in v}
        return out


def _hf_generate_runs(model_dir: str, eos: list[int], pad: int, requests: Sequence[Request], batch_size: int,
                     max_new_tokens: int, repeats: int) -> tuple[list[float], dict[str, list[int]]]:
    """transformers' greedy ``generate`` over ``requests`` in left-padded batches, ``repeats``
    times: (tokens/s per run, completion tokens per request). On the GPU when there is one."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    runs, tokens = [], {}
    for _ in range(repeats):
        t0, n_tokens = time.perf_counter(), 0
        for i in range(0, len(requests), batch_size):
            chunk = requests[i : i + batch_size]
            width = max(len(r.token_ids) for r in chunk)
            ids = torch.tensor([[pad] * (width - len(r.token_ids)) + list(r.token_ids) for r in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(r.token_ids)) + [1] * len(r.token_ids) for r in chunk],
                                device=device)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=False, eos_token_id=eos, pad_token_id=pad)
            for r, row in zip(chunk, out[:, width:].tolist()):
                cut = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
                tokens[r.id] = row[:cut]
                n_tokens += cut
        runs.append(n_tokens / (time.perf_counter() - t0))
    return runs, tokens


class HFCell:
    """The same greedy job through transformers' PyTorch ``generate`` (fp32, left-padded batches).

    It runs in a child process: PyTorch's worker threads, once started, keep slowing the XLA
    cells that run after them in the same process on a small machine, also at later batch sizes.
    """

    mode, block_size, compile_seconds, learning_runs, dtype = "hf-generate", 1, 0.0, [], "float32"
    turns: list = []  # its runs are not taken in turns beside AR's: never paired (``paired_ratios``)

    def __init__(self, target: TargetModel, requests: Sequence[Request], batch_size: int, max_new_tokens: int):
        pad = target.tokenizer.pad_token_id
        self.args = (str(target.path), list(target.eos_token_ids),
                     pad if pad is not None else target.eos_token_ids[0], list(requests), batch_size, max_new_tokens)
        self.runs: list[float] = []
        self.tokens: dict[str, list[int]] = {}

    def run(self, repeats: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            self.runs, self.tokens = pool.submit(_hf_generate_runs, *self.args, repeats).result()

    def tau(self) -> float:
        return 1.0

    def reports(self) -> dict:
        return {}


def bench_dtypes(text: str, model: str) -> list[str]:
    """The resolved dtypes of ``--dtypes`` (comma-separated names of ``decoder.DTYPES``), in order,
    each once ("auto" is resolved for this machine and ``model``'s checkpoint); ValueError names
    a bad one."""
    from dflash_batch.decoder import DTYPES, resolve_dtype
    from dflash_batch.pipeline import model_config_exists

    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in DTYPES]
    if bad or not names:
        raise ValueError(f"expected comma-separated dtypes among {'/'.join(DTYPES)}, got {text!r}")
    checkpoint = model_config_exists(model)
    return list(dict.fromkeys(resolve_dtype(n, checkpoint) for n in names))


def load_bench_models(model: str, drafter_folder, dtypes: Sequence[str], mesh=None) -> list[BenchModel]:
    """The target (and drafter, from ``drafter_folder`` unless None) loaded in each dtype."""
    from dflash_batch.decoder import jnp_dtype, load_drafter, load_target

    out = []
    for name in dtypes:
        dtype = jnp_dtype(name)
        drafter = load_drafter(drafter_folder, dtype=dtype, mesh=mesh) if drafter_folder is not None else None
        out.append(BenchModel(name, load_target(model, dtype=dtype, mesh=mesh), drafter))
    return out


def paired_ratios(cell_turns: Sequence[Sequence[tuple[str, int, float]]],
                  ar_turns: Sequence[Sequence[tuple[str, int, float]]]) -> list[float] | None:
    """Per-turn tokens/s ratios of a cell to AR, round by round, or None unless every run of
    both finished the same rows in the same order (at batch 1, where turn k of each is then
    the same row's prefill and decode)."""
    if len(cell_turns) != len(ar_turns) or any([t[0] for t in c] != [t[0] for t in a]
                                                for c, a in zip(cell_turns, ar_turns)):
        return None
    return [(tc / sc) / (ta / sa) for c, a in zip(cell_turns, ar_turns)
            for (_, tc, sc), (_, ta, sa) in zip(c, a) if sc > 0 and sa > 0 and ta > 0]


def identical_fraction(a: dict[str, list[int]], b: dict[str, list[int]]) -> float:
    keys = sorted(set(a) & set(b))
    return sum(a[k] == b[k] for k in keys) / max(len(keys), 1)


def run_rounds(cells: Sequence, repeats: int, say: Callable[[str], None] = lambda _m: None) -> None:
    """Runs every cell once per round, all of them at once: their decoders take turns (one
    prompt's prefill or one decode call each, about a second), the first turn rotating from
    round to round, and each is timed on its own clock. A slow spell of a shared machine
    (seconds to minutes) then falls on every configuration alike, not on whichever ran
    through it. Turns are short because rows finish in waves: a turn of one finished row
    would be a whole wave of prefills and decode steps."""
    for rnd in range(repeats):
        k = rnd % len(cells)
        running = [*cells[k:], *cells[:k]]
        for cell in running:
            cell.start()
        while running:
            running = [cell for cell in running if cell.advance()]
        say(f"  round {rnd + 1}/{repeats}: " + ", ".join(
            f"{_dtype_tag(c)}{c.mode} L={c.block_size} {c.runs[-1]:.1f}" for c in cells))


def _dtype_tag(cell) -> str:
    return f"{cell.dtype} " if getattr(cell, "dtype", None) else ""


@dataclasses.dataclass(frozen=True)
class BenchModel:
    """The target (and drafter) loaded in one dtype: one side of ``bench --dtypes``."""

    dtype: str  # the resolved dtype name, what rows carry
    target: TargetModel
    drafter: Any = None


def _cells(m: BenchModel, reqs: Sequence[Request], b: int, max_new_tokens: int, modes: Sequence[str],
           block_sizes: Sequence[int], prompt_buckets, ar_control: bool, say: Callable[[str], None],
           auto: bool = True) -> list:
    """One dtype's configurations at batch size ``b``, AR first, each built and warmed up
    (``auto``: each mode's automatic block choice too)."""
    kw = dict(prompt_buckets=prompt_buckets, dtype=m.dtype)
    cells: list = [DecoderCell(m.target, reqs, b, max_new_tokens, block_size=1, **kw)]
    if ar_control:
        cells.append(DecoderCell(m.target, reqs, b, max_new_tokens, block_size=1, label="ar-control", **kw))
    for mode in modes:
        if mode in DRAFTER_MODES and m.drafter is None:
            continue
        for blk in [*block_sizes, *(["auto"] if auto else [])]:
            if mode in DRAFTER_MODES and blk != "auto" and blk > m.drafter.config.block_size:
                continue
            cells.append(DecoderCell(m.target, reqs, b, max_new_tokens, mode=mode, drafter=m.drafter,
                                     block_size=blk, **kw))
            say(f"batch {b}: compiled {m.dtype} {mode} L={blk} in {cells[-1].compile_seconds:.1f} s")
    return cells


def _ratio(cell, ar, b: int) -> tuple[float, list[float], list[float] | None]:
    """A cell's tokens/s over ``ar``'s: (the median, the same-round ratios, the paired row
    ratios at batch 1 or None); the median is of the paired rows where there are any."""
    ratios = [x / a for x, a in zip(cell.runs, ar.runs)]
    paired = paired_ratios(cell.turns, ar.turns) if b == 1 else None
    return statistics.median(paired or ratios), ratios, paired


def common_prefix_mean(a: dict[str, list[int]], b: dict[str, list[int]]) -> float:
    """The mean length, in tokens, of the common prefix of each row's two completions."""
    keys = sorted(set(a) & set(b))
    lengths = [next((i for i, (x, y) in enumerate(zip(a[k], b[k])) if x != y), min(len(a[k]), len(b[k])))
               for k in keys]
    return statistics.mean(lengths) if lengths else 0.0


def bench(models: Sequence[BenchModel], requests: Sequence[Request], batch_sizes: Sequence[int],
          max_new_tokens: int, *, repeats: int = 3, block_sizes: Sequence[int] = (8, 16),
          modes: Sequence[str] = ("dflash", "ngram", "hybrid"), with_hf: bool = False,
          prompt_buckets: Sequence[int] | None = None, num_prompts: int | None = None, learning_rounds: int = 1,
          ar_control: bool = False, progress: Callable[[str], None] | None = None, auto: bool = True) -> list[dict]:
    """One row per (batch size, dtype, mode, block size), each with its dtype's AR numbers beside it.

    ``models``: the target (and drafter) in each dtype to compare, e.g. float32 and bfloat16.
    Every dtype's configurations run in the same rounds, in turns, like the modes, so a slow
    spell of the machine falls on both dtypes alike. A row's ``speedup`` is over the AR of its
    own dtype; ``speedup_vs_float32_ar`` (when float32 is benched) is over float32's AR, in
    the same way, and ``identical_fraction_vs_float32_ar`` and ``common_prefix_vs_float32_ar``
    say how far its tokens follow float32 AR's.

    With ``ar_control``, a second AR decoder per dtype runs in the same rounds as mode
    "ar-control": its ratios to AR are the bench's own noise, the yardstick for a speedup near 1.

    Each batch size decodes the first ``num_prompts`` requests, by default ``ROWS_PER_SLOT``
    per slot: what one decoder call of a job gets by default (its ``rows_per_batch``), so the
    batch runs full and drains once at the end, as in a job, rather than being all tail.
    """
    say = progress or (lambda _m: None)
    rows = []
    for b in batch_sizes:
        reqs = requests[: num_prompts or ROWS_PER_SLOT * b]
        say(f"batch {b}: compiling")
        by_dtype = {m.dtype: _cells(m, reqs, b, max_new_tokens, modes, block_sizes, prompt_buckets, ar_control, say,
                                    auto) for m in models}
        cells = [c for group in by_dtype.values() for c in group]
        if learning_rounds:
            run_rounds(cells, learning_rounds, lambda m: say(f"batch {b}: (learning, not counted){m}"))
            for cell in cells:
                cell.learning_runs, cell.runs, cell.turns = cell.runs, [], []
        run_rounds(cells, repeats, lambda m: say(f"batch {b}:{m}"))
        ars = {dtype: group[0] for dtype, group in by_dtype.items()}
        f32 = ars.get("float32")
        ordered = list(cells)
        if with_hf:
            hf = HFCell(models[0].target, reqs, b, max_new_tokens)
            hf.run(repeats)
            say(f"batch {b}: hf-generate " + ", ".join(f"{x:.1f}" for x in hf.runs))
            ordered.insert(1, hf)  # after the first AR, as in a one-dtype bench
        for cell in ordered:
            # Over the AR of the cell's dtype; transformers (float32) over the first AR if float32 is not benched.
            ar = ars.get(cell.dtype) or ars[models[0].dtype]
            speedup, ratios, paired = _ratio(cell, ar, b)
            row = {"batch_size": b, "num_prompts": len(reqs), "dtype": cell.dtype,
                   "ar_tokens_per_s": statistics.median(ar.runs), "ar_runs": ar.runs,
                   "mode": cell.mode, "block_size": cell.block_size,
                   "tokens_per_s": statistics.median(cell.runs), "runs": cell.runs,
                   "learning_runs": cell.learning_runs, "tau_mean": cell.tau(),
                   "speedup": speedup, "speedup_runs": ratios,
                   "speedup_from": "paired rows" if paired else "rounds", "speedup_rows": paired,
                   "speedup_vs_float32_ar": _ratio(cell, f32, b)[0] if f32 is not None else None,
                   "identical_fraction": identical_fraction(cell.tokens, ar.tokens),
                   "identical_fraction_vs_float32_ar":
                       identical_fraction(cell.tokens, f32.tokens) if f32 is not None else None,
                   "common_prefix_vs_float32_ar": common_prefix_mean(cell.tokens, f32.tokens) if f32 is not None
                   else None,
                   "compile_seconds": cell.compile_seconds, **cell.reports()}
            if cell.mode == "dflash":
                row["dflash_tokens_per_s"] = row["tokens_per_s"]
            rows.append(row)
            say(f"batch {b}: {cell.dtype} {cell.mode} L={cell.block_size} {row['tokens_per_s']:.1f} tok/s "
                f"tau {row['tau_mean']:.2f} {row['speedup']:.2f}x AR")
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """The rows as a text table; with more than one dtype, also each row's speedup over float32 AR."""
    vs32 = len({r["dtype"] for r in rows}) > 1 and any(r["speedup_vs_float32_ar"] is not None for r in rows)
    head = (f"{'batch':>5}  {'rows':>5}  {'dtype':<8}  {'mode':<11}  {'block':>5}  {'tok/s':>7}  {'tau':>5}  "
            f"{'vs AR':>6}  " + (f"{'vs f32 AR':>9}  " if vs32 else "") + f"{'identical':>9}  {'compile s':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        v = r["speedup_vs_float32_ar"]
        lines.append(f"{r['batch_size']:>5}  {r['num_prompts']:>5}  {r['dtype']:<8}  {r['mode']:<11}  "
                     f"{r['block_size']!s:>5}  {r['tokens_per_s']:>7.1f}  "
                     f"{r['tau_mean']:>5.2f}  {r['speedup']:>5.2f}x  "
                     + ((f"{v:>8.2f}x  " if v is not None else f"{'-':>9}  ") if vs32 else "")
                     + f"{r['identical_fraction']:>9.0%}  {r['compile_seconds']:>9.1f}")
    return "\n".join(lines)
