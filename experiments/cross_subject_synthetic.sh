#!/usr/bin/env bash
# Cross-subject vs single-subject at a small budget on the synthetic world (docs/decoders.md):
# for each method, (1) train on subj01-03, (2) adapt to subj04 from 1 of its 12 training sessions
# with the method's own preset and (3) with `adapter_only` (a new adapter, shared parts frozen;
# linear adapters start from the closed-form ridge solution, `adaptation.init=ridge`), (4) train on
# subj04 alone with the same session, (5) train on subj04 alone with all its data.
# Usage: bash experiments/cross_subject_synthetic.sh <out dir> [method ...]   (mindbridge ridge mindeye2 sttm brainit)
# Brain-IT's only route is its own transfer (brainit_transfer: new voxel embeddings from nearest voxels).
# Runs whose retrieval.json exists are kept (re-run a step by deleting its folder).
set -euo pipefail
out=${1:?output directory}; shift
methods=${*:-mindbridge ridge mindeye2 sttm}
mkdir -p "$out"
run() {  # run <dir> <command> <args...>
  local dir=$1; shift
  [[ -f "$dir/retrieval.json" ]] && return 0
  "$@" hydra.run.dir="$dir"
}
for m in $methods; do
  # reset-tuning mixes the source subjects into every batch, so its epochs are long; the
  # target-only routes get ~300 steps of 128 (2 batches per epoch from one session)
  case $m in
    mindbridge) model=(experiment=mindbridge_synthetic); preset=reset_tuning; epochs=12; init=() ;;
    ridge)      model=();                                 preset=finetune_all; epochs=150; init=(adaptation.init=ridge) ;;
    mindeye2)   model=(experiment=mindeye2_synthetic);   preset=finetune_all; epochs=150; init=(adaptation.init=ridge) ;;
    sttm)       model=(experiment=sttm_synthetic);       preset=adapter_only; epochs=150; init=() ;;
    brainit)    model=(experiment=brainit_synthetic);    preset=brainit_transfer; epochs=50; init=() ;;
    *) echo "unknown method $m" >&2; exit 2 ;;
  esac
  common=("${model[@]}" reconstruction.enabled=false)
  src="$out/$m/source/checkpoints/last.ckpt"
  run "$out/$m/source" bdf-train "${common[@]}" 'data.subjects=[subj01,subj02,subj03]'
  run "$out/$m/adapted" bdf-adapt ckpt="$src" subject=subj04 budget.sessions=1 adaptation=$preset \
    trainer.max_epochs="$epochs"
  [[ $m == brainit ]] || run "$out/$m/adapted_adapter_only" bdf-adapt ckpt="$src" subject=subj04 budget.sessions=1 \
    adaptation=adapter_only "${init[@]}" trainer.max_epochs=150
  run "$out/$m/alone_budget" bdf-train "${common[@]}" 'data.subjects=[subj04]' \
    'data.train_budget={subj04:{sessions:1}}' trainer.max_epochs="${BUDGET_EPOCHS:-150}"
  run "$out/$m/alone_full" bdf-train "${common[@]}" 'data.subjects=[subj04]'
done
