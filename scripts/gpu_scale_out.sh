#!/usr/bin/env bash
# attnlab under diffusers' context parallelism on 2+ GPUs (NCCL), tiny models: every effect against one process.
# Usage: scripts/gpu_scale_out.sh [NPROC]   (default: all visible GPUs, at least 2)
# Runs tests/cp_scenarios.py's comparison for FLUX and Wan, Ulysses and ring, on CUDA with NCCL via torchrun,
# then the HeadHunter search shared by the processes. Prints one line per scenario: max abs error per rank.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${1:-$(python -c "import torch; print(torch.cuda.device_count())")}
if [ "$NPROC" -lt 2 ]; then echo "needs 2+ GPUs (found $NPROC)"; exit 1; fi
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1
cat > /tmp/attnlab_cp_gpu.py <<'PYEOF'
import os, sys, time
sys.path.insert(0, "tests")
import torch, torch.distributed as dist
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("cpu:gloo,cuda:nccl")
import cp_scenarios as S
import cp_worker as W
W.tiny_pipe_cpu = W.tiny_pipe
def tiny_pipe(family):
    with torch.device("cpu"):
        pipe = W.tiny_pipe_cpu(family)
    return pipe.to("cuda")
S.tiny_pipe = tiny_pipe
names_only = os.environ.get("SCENARIOS")
for family in ("flux", "wan"):
    for mode in ("ulysses", "ring"):
        t = time.time()
        names = names_only.split(",") if names_only else S.names_for(family) + list(S.PIPELINES)
        try:
            errors = S.compare(rank, world, family, mode, names)
        except Exception as exc:  # report and go on (e.g. ring needs a backend that returns the LSE)
            errors = {("FAILED", type(exc).__name__): float("nan")}
            print(f"rank {rank} {family} {mode}: {exc!r}"[:400], flush=True)
        rows = [None] * world
        dist.all_gather_object(rows, errors)
        if rank == 0:
            for key in rows[0]:
                print(f"{family:4s} {mode:7s} {key[0]:22s} {key[1]:6s}", " ".join(f"{r[key]:.2e}" for r in rows), flush=True)
            print(f"{family} {mode}: {time.time() - t:.1f} s", flush=True)
dist.barrier()
dist.destroy_process_group()
PYEOF
# ring with the NATIVE backend needs the LSE shim of tests/cp_worker.py (cp_scenarios.compare applies it)
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" /tmp/attnlab_cp_gpu.py
