#!/bin/bash
# dVAE recipe sweep: eight `dalle vae train` runs side by side (meant for one GPU; on CPU, run fewer).
# Usage: bench/dvae_sweep.sh [STEPS] [OUT]  — then compare OUT/*/eval.csv, and run `dalle eval` on a finished run for
# the shapes checker's round trip (compositional.ceiling in metrics.json). Results go in bench/RESULTS.md, "dVAE".
set -u
steps=${1:-3000}
root=${2:-runs/dvae-sweep}
mkdir -p "$root"
dalle=${DALLE:-dalle}
common=(--data-source shapes --data-size 3000 --steps "$steps" --batch-size 32 --eval-every 250 --log-every 50
        --checkpoint-every 100000 --no-progress --no-tensorboard --threads 1)
declare -A runs=(
  [A_default]=""
  [B_nhid64]="--n-hid 64"
  [C_decoder_lr_1]="--decoder-lr-scale 1"
  [D_restarts]="--restart-every 25"
  [E_nhid64_restarts]="--n-hid 64 --restart-every 25"
  [F_lr1e-3]="--lr 1e-3"
  [G_batch128]="--batch-size 128"
  [H_tau_0.3]="--tau-fraction 0.3"
)
for name in "${!runs[@]}"; do
  # shellcheck disable=SC2086  # the options of a run are meant to split
  $dalle vae train "${common[@]}" ${runs[$name]} --out "$root/$name" > "$root/$name.log" 2>&1 &
done
wait
for f in "$root"/*/eval.csv; do echo "$f: $(tail -1 "$f")"; done
