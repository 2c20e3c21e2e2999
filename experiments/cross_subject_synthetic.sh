#!/usr/bin/env bash
# Cross-subject vs single-subject at a small budget on the synthetic world (docs/experiments.md):
# for each method, (1) train on subj01-03, (2) adapt to subj04 from 1 of its 12 training sessions,
# (3) train on subj04 alone with the same session, (4) train on subj04 alone with all its data.
# Usage: bash experiments/cross_subject_synthetic.sh <out dir> [method ...]   (mindbridge ridge mindeye2)
set -euo pipefail
out=${1:?output directory}; shift
methods=${*:-mindbridge ridge}
mkdir -p "$out"
for m in $methods; do
  case $m in
    # reset-tuning mixes the source subjects into every batch, so its epochs are long; the
    # target-only routes get ~300 steps of 128 (2 batches per epoch from one session)
    mindbridge) model=(experiment=mindbridge_synthetic); preset=reset_tuning; adapt_epochs=12 ;;
    ridge)      model=();                                 preset=finetune_all; adapt_epochs=150 ;;
    mindeye2)   model=(experiment=mindeye2_synthetic);   preset=finetune_all; adapt_epochs=150 ;;
    *) echo "unknown method $m" >&2; exit 2 ;;
  esac
  common=("${model[@]}" reconstruction.enabled=false)
  bdf-train "${common[@]}" 'data.subjects=[subj01,subj02,subj03]' hydra.run.dir="$out/$m/source"
  bdf-adapt ckpt="$out/$m/source/checkpoints/last.ckpt" subject=subj04 sessions=1 adaptation=$preset \
    trainer.max_epochs="$adapt_epochs" hydra.run.dir="$out/$m/adapted"
  bdf-train "${common[@]}" 'data.subjects=[subj04]' 'data.train_sessions={subj04:1}' \
    trainer.max_epochs="${BUDGET_EPOCHS:-150}" hydra.run.dir="$out/$m/alone_budget"
  bdf-train "${common[@]}" 'data.subjects=[subj04]' hydra.run.dir="$out/$m/alone_full"
done
