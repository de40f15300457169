#!/usr/bin/env bash
# Reproduces the shipped drafter decoder/drafters/smollm2-135m-instruct/ in one command:
#
#     bash jobs/train_default_drafter.sh            # from the repository root, after `make install`
#     bash jobs/train_default_drafter.sh --resume   # continue after an interruption (same settings)
#
# Extra arguments go to `dflash-batch train-drafter` (e.g. --stop-at 500 to end a session early;
# --resume continues from the last checkpoint, bit-for-bit the same trajectory).
#
# Recipe (see decoder/train/ for the why of each choice):
#   * prompts: 400 summarization prompts over ACLSum *train+val* papers (abstracts, then conclusions,
#     then introductions, in chunks of <=180 words; aclsum PyPI package). The ACLSum *test* split is the evaluation set and
#     is only read for the final tau in the model card.
#   * data: SmolLM2-135M-Instruct's own greedy responses (128 new tokens), from our AR decoder.
#   * drafter: 1 layer of the target's shape, started from target layer 28; context features from
#     target layers 1,8,14,20,27; block 16; 8192-token draft vocabulary; learned mask embedding.
#   * loss: 0.5 x hard labels + 0.5 x the target's top-32 distribution, weights exp(-(k-1)/7).
#   * AdamW lr 6e-4, 4% warmup, cosine, clip 1.0; 4 sequences x 16 blocks per step.
#
# Everything slow (responses, features, checkpoints) is cached in $WORK, so reruns skip it.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
WORK=${WORK:-.train-work/smollm2}
OUT=${OUT:-decoder/drafters/smollm2-135m-instruct}
STEPS=${STEPS:-4000}

mkdir -p "$WORK"
"$PY" -m dflash_batch.jobs._train_prompts --out "$WORK/prompts.parquet" --splits train,val --limit 400
# The evaluation set: the 100 whole ACLSum test abstracts, as the default job and `bench` read them.
"$PY" -m dflash_batch.jobs.cli make-example-input --split test "$WORK/test-prompts.parquet"

exec "$PY" -m dflash_batch.jobs.cli train-drafter \
  --target smollm2-135m-instruct \
  --prompts "$WORK/prompts.parquet" \
  --out "$OUT" \
  --work-dir "$WORK" \
  --max-new-tokens 128 --gen-batch 8 \
  --eval-prompts 16 --eval-max-new-tokens 64 \
  --steps "$STEPS" --batch 4 --anchors 16 --block-size 16 --layers 1 \
  --target-layers 1,8,14,20,27 --draft-vocab 8192 \
  --init target --standardize --distill 0.5 --top-k 32 \
  --lr 6e-4 --warmup 0.04 --seed 0 \
  --checkpoint-every 50 --eval-every 500 \
  --test-prompts "$WORK/test-prompts.parquet" --test-max-new-tokens 128 \
  --data-note "400 summarization prompts (\"Summarize the following text in a few sentences.\") over ACLSum \
train+val papers, in chunks of <=180 words: 168 from abstracts, 197 from conclusions, 35 from introductions. ACLSum \
(Takeshita et al., 2024) is distributed on PyPI as \`aclsum\` (MIT); the texts are ACL Anthology papers \
(CC BY 4.0). The ACLSum test split is not used for training." \
  "$@"
