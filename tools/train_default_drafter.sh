#!/usr/bin/env bash
# Reproduces the shipped drafter decoder/drafters/smollm2-135m-instruct/ in one command, in two stages:
# 1. the recipe below on the 935 section prompts (-> $STAGE1), 2. tools/finetune_drafter.sh continues
# it on the shipped drafter's recorded 885 prompts of the larger in-domain set (-> $OUT).
#
#     bash tools/train_default_drafter.sh            # from the repository root, after `make install`
#     bash tools/train_default_drafter.sh --resume   # continue after an interruption (same settings)
#
# Extra arguments go to `dflash-batch train-drafter` (e.g. --stop-at 500 to end a session early;
# --resume continues from the last checkpoint, bit-for-bit the same trajectory).
#
# Recipe (see decoder/train/ for the why of each choice):
#   * prompts: all 935 summarization prompts over the 150 ACLSum *train+val* papers (abstracts, then
#     conclusions, then introductions, in chunks of <=180 words; aclsum PyPI package). The ACLSum *test* split is the evaluation set and
#     is only read for the final tau in the model card. (The shipped drafter saw 938: three chunks that share a stock
#     phrase with a test paper are dropped since.) The larger set and the accelerator recipe: tools/train_drafter_device.sh.
#   * data: SmolLM2-135M-Instruct's own greedy responses (128 new tokens), from our AR decoder.
#   * drafter: 2 layers of the target's shape, started from target layers 28 and 29; context features
#     from target layers 1,8,14,20,27; block 16; 8192-token draft vocabulary; learned mask embedding.
#   * loss: 0.5 x hard labels + 0.5 x the target's top-32 distribution, weights exp(-(k-1)/7).
#   * AdamW lr 2e-3 (the paper's 6e-4 learns too slowly for a few-hour CPU budget: held-out decoder
#     tau 1.034 vs 1.049 after 300 steps), 4% warmup, cosine, clip 1.0; 4 sequences x 16 blocks per step.
#   * 1500 steps, evaluated every 300; the best held-out drafter is shipped. A first run on 400 of these
#     prompts memorised them: by step 1950 its training-batch tau was 8.5 while held-out decoder tau had
#     reached only 1.25 (step 1000). More prompts, fewer passes over each.
#
# Everything slow (responses, features, checkpoints) is cached in $WORK, so reruns skip it.
# A run stopped by SIGTERM checkpoints, exports the drafter so far and exits with 75; with RETRIES=N
# the script then resumes it (also after SIGKILL), up to N times (long background runs on a shared machine):
#
#     RETRIES=20 nohup bash tools/train_default_drafter.sh >> .train-logs/train.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
WORK=${WORK:-.train-work/smollm2}
OUT=${OUT:-decoder/drafters/smollm2-135m-instruct}
STAGE1=${STAGE1:-$WORK/stage1-drafter}
STEPS=${STEPS:-1500}

mkdir -p "$WORK"
"$PY" tools/train_prompts.py --out "$WORK/prompts.parquet" --set sections --splits train,val --limit 0
# The evaluation set: the 100 whole ACLSum test abstracts, as the default job and `bench` read them.
"$PY" -P -m dflash_batch.jobs.cli make-example-input --split test "$WORK/test-prompts.parquet"

RETRIES=${RETRIES:-0}
args=("$@")
for ((attempt = 0; ; attempt++)); do
  rc=0
  "$PY" -P -m dflash_batch.jobs.cli train-drafter \
    --target smollm2-135m-instruct \
    --prompts "$WORK/prompts.parquet" \
    --out "$STAGE1" \
    --work-dir "$WORK" \
    --max-new-tokens 128 --gen-batch 8 \
    --eval-prompts 16 --eval-max-new-tokens 64 \
    --steps "$STEPS" --batch 4 --anchors 16 --block-size 16 --layers 2 \
    --target-layers 1,8,14,20,27 --draft-vocab 8192 \
    --init target --standardize --distill 0.5 --top-k 32 \
    --lr 2e-3 --warmup 0.04 --seed 0 \
    --checkpoint-every 50 --eval-every 300 \
    --test-prompts "$WORK/test-prompts.parquet" --test-limit 32 --test-max-new-tokens 128 \
    "${args[@]}" || rc=$?
  # 75: stopped by SIGTERM after checkpointing; >= 128: killed by a signal (resumes from the last
  # periodic checkpoint, at most --checkpoint-every steps back). Anything else is an error.
  [[ $rc -eq 0 ]] && break
  if [[ ($rc -ne 75 && $rc -lt 128) || $attempt -ge $RETRIES ]]; then
    exit "$rc"
  fi
  echo "train-drafter stopped (exit $rc); resuming (attempt $((attempt + 1)) of $RETRIES)" >&2
  [[ " ${args[*]} " == *" --resume "* ]] || args+=(--resume)
  sleep "${RETRY_SLEEP:-10}"
done
"$PY" tools/model_card.py "$STAGE1" \
  --data-note "935 summarization prompts (\"Summarize the following text in a few sentences.\") over the 150 ACLSum \
train+val papers, in chunks of <=180 words: abstracts, conclusions and introductions. ACLSum \
(Takeshita et al., 2024) is distributed on PyPI as \`aclsum\` (MIT); the texts are ACL Anthology papers \
(CC BY 4.0). The ACLSum test split is not used for training." \
  --shape-note "Two layers, because with one the mask rows' queries carry no information about the anchor \
(queries are computed before attention), so the drafter cannot look up where the anchor's text occurs in the \
prompt; copying is what lets prompt lookup reach tau 4.1 on summarization, and a second layer makes it learnable. \
Measured on this data after 300 steps (263k predicted tokens, lr 2e-3): held-out decoder tau 1.078 with two \
layers vs 1.049 with one, at 1.9 vs 1.2 s per step on this CPU. At decode time a draft layer costs ~1/30 of \
the target's verify pass."

# 2. Fine-tune on the larger in-domain set (its own work dir; --resume continues it too). A stage 1
# ended early with --stop-at is not finished: stage 2 waits for the rerun that finishes it.
[[ " ${args[*]} " == *" --stop-at "* ]] && exit 0
stage2=()
[[ " ${args[*]} " == *" --resume "* ]] && stage2+=(--resume)
INIT="$STAGE1" OUT="$OUT" WORK="$WORK/finetune" PROMPT_SET="$OUT/training-prompt-set.json" \
  bash tools/finetune_drafter.sh "${stage2[@]}"
