#!/usr/bin/env bash
# Compares drafter training recipes on the same data and the same step budget, and prints one table:
# held-out decoder tau and ACLSum-test tau (dflash at block 16 and 8, n-gram and hybrid beside them),
# predicted tokens and training time per recipe, with the shipped drafter on the same test prompts.
#
#     bash tools/compare_drafter_recipes.sh                       # from the repository root, after `make install`
#     LIMIT=2000 STEPS=3000 bash tools/compare_drafter_recipes.sh # larger, on a faster machine
#     RECIPES="base full" bash tools/compare_drafter_recipes.sh   # a subset (base is always needed first)
#
# Each recipe is the current one (tools/train_default_drafter.sh) with one change (tools/recipe_table.py
# names them): base, full (KL to the target's full distribution over the draft vocabulary for the soft
# half), kl (that KL only), b8 (trained at block 8), l1 (one draft layer). The data are the first LIMIT
# prompts of the larger in-domain set (`--set full`: sections, windows, five instructions; never a test
# paper); base generates the responses and the feature cache once, the others link to them. Every run is
# resumable: rerun the script and it continues where it stopped, skipping finished recipes.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
WORK=${WORK:-.train-work/recipes}
LIMIT=${LIMIT:-400}
STEPS=${STEPS:-400}
RECIPES=${RECIPES:-base full kl b8 l1}
TEST_LIMIT=${TEST_LIMIT:-16}
TEST_MAX_NEW=${TEST_MAX_NEW:-64}

flags() {
  case $1 in
    base) ;;
    full) echo --teacher full ;;
    kl) echo --teacher full --distill 1 ;;
    b8) echo --block-size 8 ;;
    l1) echo --layers 1 ;;
    *) echo "unknown recipe $1" >&2; return 2 ;;
  esac
}

mkdir -p "$WORK"
[ -f "$WORK/prompts.parquet" ] || "$PY" tools/train_prompts.py --out "$WORK/prompts.parquet" \
  --set full --splits train,val --limit "$LIMIT"
[ -f "$WORK/test-prompts.parquet" ] || "$PY" -P -m dflash_batch.jobs.cli make-example-input --split test \
  "$WORK/test-prompts.parquet"

for r in $RECIPES; do
  extra=$(flags "$r")
  d="$WORK/$r"
  if [ -f "$d/test-eval.json" ] && [ -f "$d/drafter/README.md" ]; then
    echo "recipe $r: done"; continue
  fi
  mkdir -p "$d"
  if [ "$r" != base ]; then  # the same data: base's responses, frozen prompt set and feature cache
    [ -f "$WORK/base/features/meta.json" ] || { echo "run recipe base first" >&2; exit 2; }
    for f in responses.jsonl prompt-set.json features; do ln -sfn "../base/$f" "$d/$f"; done
  fi
  echo "recipe $r: $extra"
  # shellcheck disable=SC2086
  "$PY" -P -m dflash_batch.jobs.cli train-drafter \
    --target smollm2-135m-instruct --prompts "$WORK/prompts.parquet" --max-prompt-tokens 380 \
    --out "$d/drafter" --work-dir "$d" --offline \
    --max-new-tokens 128 --gen-batch 16 \
    --eval-prompts 16 --eval-max-new-tokens 64 --eval-every 0 \
    --steps "$STEPS" --batch 4 --anchors 16 --block-size 16 --layers 2 \
    --target-layers 1,8,14,20,27 --draft-vocab 8192 \
    --init target --standardize --distill 0.5 --top-k 32 \
    --lr 2e-3 --warmup 0.04 --seed 0 --checkpoint-every 100 --resume \
    --test-prompts "$WORK/test-prompts.parquet" --test-limit "$TEST_LIMIT" --test-max-new-tokens "$TEST_MAX_NEW" \
    $extra
  "$PY" tools/model_card.py "$d/drafter" \
    --data-note "Recipe comparison '$r': the first $LIMIT prompts of the in-domain ACLSum train+val set."
done

"$PY" tools/recipe_table.py "$WORK" $RECIPES --shipped decoder/drafters/smollm2-135m-instruct
