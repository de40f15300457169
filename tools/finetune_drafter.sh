#!/usr/bin/env bash
# Fine-tunes an existing drafter (default: the shipped SmolLM2 one) on the larger in-domain ACLSum
# prompt set, the way a user adapts a published drafter to their documents:
#
#     bash tools/finetune_drafter.sh                          # from the repository root, after `make install`
#     LIMIT=3000 STEPS=1500 bash tools/finetune_drafter.sh    # more data and steps, on a faster machine
#     bash tools/finetune_drafter.sh --resume                 # continue after an interruption
#
# Data: the first LIMIT prompts of `--set full` (sections, windows, five instructions; never a test
# paper) with the target's greedy responses, at most GEN_BUDGET seconds of generation (the prompts
# answered by then are the training set, frozen for reruns). Training: `train-drafter --init-from`,
# so step 0 is the starting drafter itself and the held-out curve shows what fine-tuning adds;
# evaluation on the first 32 ACLSum test abstracts, 128 new tokens, as the shipped drafter's card.
# PROMPT_SET=FILE trains on a recorded prompt set instead of the one a generation budget yields (the
# shipped drafter's: decoder/drafters/smollm2-135m-instruct/training-prompt-set.json), so a rerun on
# any machine sees the same data. Extra arguments go to `dflash-batch train-drafter`. Everything slow
# is cached in $WORK.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
INIT=${INIT:-default}
WORK=${WORK:-.train-work/finetune}
OUT=${OUT:-$WORK/drafter}
LIMIT=${LIMIT:-1500}
STEPS=${STEPS:-600}
GEN_BUDGET=${GEN_BUDGET:-2700}
PROMPT_SET=${PROMPT_SET:-}

mkdir -p "$WORK"
[ -f "$WORK/prompts.parquet" ] || "$PY" tools/train_prompts.py --out "$WORK/prompts.parquet" \
  --set full --splits train,val --limit "$LIMIT"
[ -z "$PROMPT_SET" ] || [ -f "$WORK/prompt-set.json" ] || cp "$PROMPT_SET" "$WORK/prompt-set.json"
[ -f "$WORK/test-prompts.parquet" ] || "$PY" -P -m dflash_batch.jobs.cli make-example-input --split test \
  "$WORK/test-prompts.parquet"

"$PY" -P -m dflash_batch.jobs.cli train-drafter \
  --target smollm2-135m-instruct --prompts "$WORK/prompts.parquet" --max-prompt-tokens 380 \
  --init-from "$INIT" --out "$OUT" --work-dir "$WORK" --offline \
  --max-new-tokens 128 --gen-batch 16 --gen-budget "$GEN_BUDGET" \
  --eval-prompts 16 --eval-max-new-tokens 64 --eval-every 200 \
  --steps "$STEPS" --batch 4 --anchors 16 --distill 0.5 --top-k 32 \
  --lr 1e-3 --warmup 0.04 --seed 0 --checkpoint-every 100 \
  --test-prompts "$WORK/test-prompts.parquet" --test-limit 32 --test-max-new-tokens 128 \
  "$@"
"$PY" tools/model_card.py "$OUT" \
  --data-note "Continued from the drafter '$INIT' on prompts of the in-domain ACLSum train+val set (of its first \
$LIMIT: those answered within the generation budget, or those of PROMPT_SET when given; abstracts under the job's instruction, then sections and windows under five summarization instructions); \
ACLSum (Takeshita et al., 2024) is distributed on PyPI as \`aclsum\` (MIT); the texts are ACL Anthology papers \
(CC BY 4.0). The ACLSum test split is not used for training."
