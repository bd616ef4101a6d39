#!/usr/bin/env bash
# The default model end to end, one training process at a time (run from the repository root):
#   nice -n 19 nohup tools/default_model/train_all.sh > /tmp/default_model.log 2>&1 &
# Each stage skips itself when its output exists; the transformer stage resumes from its latest
# checkpoint, so rerunning this script after an interruption continues where it stopped.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-out/default_model}
mkdir -p "$OUT"
[ -f "$OUT/shapes.parquet" ] || $PY -m tools.default_model.shapes_data --out "$OUT/shapes.parquet" --count 4096 --seed 0
[ -f "$OUT/shapes-8192.parquet" ] || $PY -m tools.default_model.shapes_data --out "$OUT/shapes-8192.parquet" --count 8192 --seed 0
# VAE: 600 steps at lr 2e-3, then a second stage of 600 from those weights at lr 5e-4 (cosine both),
# then the decoder alone for 800 steps at lr 3e-4 with edges weighted 5x (sharper corners; the
# encoder, so the latents and the factors, stay stage 2's)
# A folder of the two-stage VAE recipe holds stage 2 in vae/ (no decoder_only in its training.json)
if [ -f "$OUT/vae/training.json" ] && [ ! -e "$OUT/vae-stage2" ] && ! grep -q '"decoder_only": true' "$OUT/vae/training.json"; then
  mv "$OUT/vae" "$OUT/vae-stage2"
fi
[ -f "$OUT/vae-stage1/training.json" ] && grep -q '"reconstruction_adherence"' "$OUT/vae-stage1/training.json" \
  || $PY -m tools.default_model.train_vae --data "$OUT/shapes.parquet" --out "$OUT/vae-stage1" --steps 600
[ -f "$OUT/vae-stage2/training.json" ] && grep -q '"reconstruction_adherence"' "$OUT/vae-stage2/training.json" \
  || $PY -m tools.default_model.train_vae --data "$OUT/shapes.parquet" --out "$OUT/vae-stage2" --steps 600 \
       --lr 5e-4 --init "$OUT/vae-stage1"
[ -f "$OUT/vae/training.json" ] && grep -q '"reconstruction_adherence"' "$OUT/vae/training.json" \
  || $PY -m tools.default_model.train_vae --data "$OUT/shapes.parquet" --out "$OUT/vae" --steps 800 \
       --lr 3e-4 --init "$OUT/vae-stage2" --decoder_only --edge_weight 4
# Transformer: 5000 steps (cosine from lr 1e-3 after 200 warm-up steps), then the same run
# extended to 8000 and to 14000 (each call's schedule restarts at its point of the longer cosine,
# lr ~3.2e-4 at 5000/8000 and ~4e-4 at 8000/14000, and decays to 0). Rerunning resumes from the
# latest checkpoint.
for steps in 5000 8000 14000; do
  $PY -m tools.default_model.train_model --vae "$OUT/vae" --data "$OUT/shapes-8192.parquet" --out "$OUT" \
    --steps $steps --batch_size 16
done
$PY -m tools.default_model.evaluate --model "$OUT/model" --out "$OUT/eval"
