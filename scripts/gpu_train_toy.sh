#!/usr/bin/env bash
# Train both toy models (issue 15) on a lent H100/H200 within 10 minutes; the pipeline folders come back as
# $OUT/toy_sd.tar and $OUT/toy_flux.tar (the device tool returns at most 8 files), with the logs.
# PREPARED, NOT YET RUN: no GPU was lent to the session that wrote it (docs/toyworld.md).
#
# The device image has torch but not diffusers: carry the wheels (see the device tool's README), e.g. here
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1
# and start the device command with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site;
#   bash scripts/gpu_train_toy.sh
# The same recipe as the CPU run (docs/toyworld.md), bigger batches and more steps; --max-minutes bounds each
# model's wall time (the weights are saved when it runs out).
set -euo pipefail
OUT="${OUT:-out/gpu_train}"
mkdir -p "$OUT" /tmp/attnlab_pkg
ln -sfn "$PWD" /tmp/attnlab_pkg/attnlab   # the repository root is the package
export PYTHONPATH="/tmp/attnlab_pkg:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
T="python3 -m attnlab.toyworld.train --device cuda --workers 12 --threads 4 --ckpt-every 1000"
$T --arch sd --out "$OUT/sd" --state-dir /tmp/state_sd --vae-steps 6000 --vae-batch 64 --steps 40000 --batch 256 \
   --lr 1e-3 --curriculum-steps 2000 --max-minutes 6 --log-file "$OUT/sd.log"
$T --arch flux --out "$OUT/flux" --state-dir /tmp/state_flux --vae-from "$OUT/sd" --steps 30000 --batch 256 \
   --lr 1e-3 --curriculum-steps 2000 --max-minutes 3 --log-file "$OUT/flux.log"
for m in sd flux; do tar -C "$OUT" -cf "$OUT/toy_$m.tar" "$m" && rm -rf "${OUT:?}/$m"; done
ls -la "$OUT"
