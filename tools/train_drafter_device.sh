#!/usr/bin/env bash
# Trains the default model's drafter on one accelerator host in one call, within a wall-clock budget
# it enforces itself: generate responses with the project's batched decoder, train online (the target
# runs inside each step; nothing per token goes to disk), evaluate held-out tau on ACLSum test
# (block 16, 128 new tokens, with n-gram and hybrid beside it), write the bf16 drafter and its card.
#
#     bash tools/train_drafter_device.sh --prepare       # here, on the CPU: build the prompt files that travel
#     RESULTS=$OUT bash tools/train_drafter_device.sh    # there: the whole run (rerun it to resume)
#
# With the device tool (64 MiB per call, ~27 MiB of it the checkout; the GGUF is 98 MB), `--pack` here
# fills the ignored folders .train-work/carry-1..3: a 34 MiB GGUF part each, and in the last one also the
# prompt files and the gguf wheel. Calls 1 and 2 carry carry-1 and carry-2 and run `true` (files stay on a
# warm machine); call 3, right after, carries carry-3 and runs
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site .train-work/carry-3/*.whl &&
#     export PYTHONPATH=/tmp/site && mkdir -p .train-work/parts .train-work/device &&
#     cp .train-work/carry-*/*.part-* .train-work/parts/ && cp .train-work/carry-3/*.parquet .train-work/device/ &&
#     PYTHONUNBUFFERED=1 MODEL_PARTS=.train-work/parts RESULTS=$OUT bash tools/train_drafter_device.sh
#   with timeout_s 600. Join the returned weights with `cat model.safetensors.part-* > model.safetensors`.
# The bench can follow in the same call, on the model this run imported (`tools/device_bench.py`, e.g.
# `--drafter $WORK/drafter --batch-sizes 16,64,1 --no-auto --budget 40`): the machine goes back 30 s after a call.
#
# Other arguments go to train-drafter (e.g. --stop-at N). Settings are environment variables (below).
#
# Stages, each resumable (a rerun skips what is done, so a killed call loses at most one checkpoint interval):
#   0. model: the registry's cache, or the GGUF joined from $MODEL_PARTS (split it with `split -b 45M`: the
#      98 MB file travels in two calls) and imported;
#   1. prompts: $WORK/prompts.parquet (the full ACLSum train+val set: every section, overlapping windows,
#      five instructions; the test papers never) and $WORK/test-prompts.parquet (ACLSum test abstracts),
#      built by --prepare where the aclsum package is installed, and carried in $WORK;
#   2. responses: appended to $WORK/responses.jsonl as they finish, until the generation budget;
#      the prompts answered by then are recorded ($WORK/prompt-set.json) and are the training set;
#   3. training: checkpointed every $CKPT steps and at the training deadline;
#   4. test tau: each mode's result kept in $WORK/test-eval.json;
#   5. export: the drafter (bf16, checked under 50 MB) and README.md in $DRAFTER; copies under $RESULTS,
#      the weights in 15 MB parts (the device tool returns files of at most 16 MiB): join with `cat`.
#
# Sizing for one H100/H200 and a 600 s call (BUDGET 540 s leaves room for Python and JAX to start):
#   * generation until 230 s from the start (model import and compiles included). A prompt is ~250 tokens
#     (prompt set: 28,285 prompts, mean 248 tokens) plus 128 new: ~95 GFLOP, nothing for an H200; at batch 256 a
#     decode step is latency-bound (~3 ms: 30 layers of small kernels), so ~1-2 s per 256 prompts, i.e.
#     ~20k prompts (~2M response tokens) in the budget, against 1,823 prompts / 183k tokens for the current drafter.
#     On this project's 2-core CPU the same decoder makes ~47 tokens/s (938 prompts took 34 min).
#   * training until EVAL_RESERVE before the end (~180 s). Per step, BATCH=32 sequences of S=512: the target's
#     forward over 16k tokens at ~0.25 GFLOP/token plus its head on the 7.7k label rows is ~4.5 TFLOP; the
#     2-layer drafter forward+backward ~0.8 TFLOP: ~5.3 TFLOP per step for ~7.7k predicted tokens. At 20% of
#     the H200's ~400 TFLOP/s for TF32 matrix work (the fp32 default; bf16 is ~790), ~65 ms per step:
#     STEPS=1500 takes ~100 s, and half that utilisation still fits. The CPU does the same step in ~80 s
#     (target features at ~67 GFLOP/s: 938 sequences / 314k tokens in 20 min), so this run is ~1000 CPU hours.
#     (XLA's cost analysis counts a scanned layer stack once, so these FLOPs are worked out by hand.)
#   * evaluation reserve 120 s: the test tau in four modes (dflash B16 and B8, ngram, hybrid; 32 ACLSum test
#     abstracts, 128 new tokens), each a fresh decoder compile, and the export.
# The deadlines are enforced by train-drafter itself (--time-budget); a step or a decoder batch in flight finishes.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3}
TARGET=${TARGET:-smollm2-135m-instruct}
WORK=${WORK:-.train-work/device}
DRAFTER=${DRAFTER:-$WORK/drafter}
RESULTS=${RESULTS:-}
BUDGET=${BUDGET:-540}          # seconds for this whole call
GEN_BUDGET=${GEN_BUDGET:-230}  # seconds from the start for generating responses
EVAL_RESERVE=${EVAL_RESERVE:-120}  # seconds kept after training for the test evaluation and the export
LIMIT=${LIMIT:-0}              # prompts to use (0: all; generation stops at its budget anyway)
GEN_BATCH=${GEN_BATCH:-256}
MAX_NEW=${MAX_NEW:-128}
MAX_PROMPT=${MAX_PROMPT:-380}  # tokens: with 128 new, every online batch is 512 long (one compile); 0.4% of the prompts skipped
STEPS=${STEPS:-1500}
BATCH=${BATCH:-32}
ANCHORS=${ANCHORS:-16}
LAYERS=${LAYERS:-2}
TARGET_LAYERS=${TARGET_LAYERS:-1,8,14,20,27}
DRAFT_VOCAB=${DRAFT_VOCAB:-8192}
LR=${LR:-2e-3}
CKPT=${CKPT:-200}
EVAL_EVERY=${EVAL_EVERY:-500}
EVAL_PROMPTS=${EVAL_PROMPTS:-32}
TEST_LIMIT=${TEST_LIMIT:-32}
TEST_MAX_NEW=${TEST_MAX_NEW:-128}
ONLINE=${ONLINE:---online}
MAX_MB=50
T0=$(date +%s)

if ! "$PY" -c "import dflash_batch" 2>/dev/null; then  # a bare host: the checkout is the package
  mkdir -p /tmp/dflash-shim && ln -sfn "$PWD" /tmp/dflash-shim/dflash_batch
  export PYTHONPATH=/tmp/dflash-shim${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p "$WORK"
if [[ ! -f "$WORK/prompts.parquet" ]]; then
  "$PY" tools/train_prompts.py --out "$WORK/prompts.parquet" --set full --limit "$LIMIT"
fi
if [[ ! -f "$WORK/test-prompts.parquet" ]]; then
  "$PY" tools/train_prompts.py --out "$WORK/test-prompts.parquet" --set eval
fi
if [[ "${1:-}" == "--prepare" ]]; then
  echo "prompt files ready in $WORK"
  exit 0
fi
if [[ "${1:-}" == "--pack" ]]; then
  rm -rf .train-work/carry-* && mkdir -p .train-work/packing
  gguf=$("$PY" -c "from dflash_batch.decoder._registry import embedded_gguf_path as p; print(p('$TARGET'))")
  split -b 34M -d "$gguf" .train-work/packing/model.gguf.part-
  n=0
  for part in .train-work/packing/model.gguf.part-*; do
    n=$((n + 1)) && mkdir -p ".train-work/carry-$n" && mv "$part" ".train-work/carry-$n/"
  done
  rmdir .train-work/packing
  cp "$WORK/prompts.parquet" "$WORK/test-prompts.parquet" ".train-work/carry-$n/"
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d ".train-work/carry-$n" "gguf==$("$PY" -c \
    "import importlib.metadata as m; print(m.version('gguf'))")"
  du -sh .train-work/carry-*
  exit 0
fi

if [[ -n "${MODEL_PARTS:-}" ]]; then
  "$PY" - "$TARGET" "$MODEL_PARTS" <<'EOF'
import sys
from pathlib import Path

from dflash_batch.decoder._gguf import import_gguf
from dflash_batch.decoder._registry import cache_dir

name, parts = sys.argv[1], sorted(Path(sys.argv[2]).glob("*.part-*"))
out = cache_dir() / "models" / name
if not (out / "config.json").is_file():
    joined = Path("/tmp") / f"{name}.gguf"
    with joined.open("wb") as f:
        for p in parts:
            f.write(p.read_bytes())
    import_gguf(joined, out)
print(f"model {name}: {out}")
EOF
fi

left=$((BUDGET - ($(date +%s) - T0)))
gen_left=$((GEN_BUDGET - ($(date +%s) - T0)))
((gen_left > 0)) || gen_left=0
echo "train-drafter: ${left}s left of ${BUDGET}s (generation ${gen_left}s, evaluation reserve ${EVAL_RESERVE}s)"
rc=0
"$PY" -P -m dflash_batch.jobs._train_cli \
  --target "$TARGET" --prompts "$WORK/prompts.parquet" --out "$DRAFTER" --work-dir "$WORK" \
  --max-new-tokens "$MAX_NEW" --max-prompt-tokens "$MAX_PROMPT" --gen-batch "$GEN_BATCH" \
  --eval-prompts "$EVAL_PROMPTS" --eval-max-new-tokens 64 \
  --steps "$STEPS" --batch "$BATCH" --anchors "$ANCHORS" --block-size 16 --layers "$LAYERS" \
  --target-layers "$TARGET_LAYERS" --draft-vocab "$DRAFT_VOCAB" \
  --init target --standardize --distill 0.5 --top-k 32 --lr "$LR" --warmup 0.04 --seed 0 \
  --checkpoint-every "$CKPT" --eval-every "$EVAL_EVERY" "$ONLINE" --resume \
  --time-budget "$left" --gen-budget "$gen_left" --eval-reserve "$EVAL_RESERVE" \
  --test-prompts "$WORK/test-prompts.parquet" --test-limit "$TEST_LIMIT" --test-max-new-tokens "$TEST_MAX_NEW" \
"$@" || rc=$?
# 75: stopped by a signal after checkpointing (rerun to resume); anything else but 0 is an error.
[[ $rc -eq 0 || $rc -eq 75 ]] || exit "$rc"
"$PY" tools/model_card.py "$DRAFTER" \
  --data-note "Summarization prompts over the 150 ACLSum train+val papers (aclsum on PyPI, MIT; texts from the \
ACL Anthology, CC BY 4.0): every section the package ships, in overlapping windows of <=180 words, under five \
summarization instructions; windows sharing a 12-word passage with a test paper are dropped. The ACLSum test \
split is not used for training."

mb=$(du -m "$DRAFTER/model.safetensors" | cut -f1)
if ((mb >= MAX_MB)); then
  echo "drafter is ${mb} MB, over the ${MAX_MB} MB limit" >&2
  exit 1
fi
if [[ -n "$RESULTS" ]]; then
  mkdir -p "$RESULTS"
  cp "$DRAFTER/README.md" "$DRAFTER/config.json" "$WORK/summary.json" "$RESULTS/"
  cp "$WORK/metrics.jsonl" "$RESULTS/" 2>/dev/null || true
  split -b 15M -d "$DRAFTER/model.safetensors" "$RESULTS/model.safetensors.part-"
fi
echo "done in $(($(date +%s) - T0))s: $DRAFTER (${mb} MB)"
exit "$rc"
