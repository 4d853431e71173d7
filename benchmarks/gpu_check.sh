#!/usr/bin/env bash
# The GPU checks, in one go on a machine with one CUDA GPU (docs/decisions.md, "The GPU path"):
#   1. tests/e2e/test_gpu.py: 2-epoch runs on the GPU through Ray Train (NCCL) in fp32, bf16, fp16,
#      channels_last and torch.compile; load_model, predict, evaluate and export on cuda;
#   2. benchmarks/gpu.py: U-Net/ResNet-34 at 1248x384, fp32 against bf16 + channels_last: the model
#      alone at batch 8 and 32, with and without torch.compile (peak memory of each), then fed by
#      Ray Data (decode only; augmentation on the GPU) with kitti_search's 4 CPUs per GPU worker and
#      with all but one of the machine's (data-wait share of each epoch);
#   3. a 2-trial kitti_search on synthetic 1248x384 scenes, two trials sharing the GPU (0.5 each),
#      then its best checkpoint evaluated on cuda.
# Without a GPU it runs the same steps small, on the CPU (tests skip, benchmark at 128x64, the
# search with use_gpu false): the rehearsal. Results go to $OUT (default /tmp/gpu_check).
# Packages the machine lacks (it has torch but not Ray) can come as .devsite/site.tar.xz, unpacked
# onto PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}
if [ -d .devsite ] && ! $PYTHON -c "import ray" 2>/dev/null; then
    mkdir -p /tmp/site && for archive in .devsite/*.tar.xz; do tar -xJf "$archive" -C /tmp/site; done
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
$PYTHON -c "import torch, torchvision, ray, segmentation_models_pytorch as smp, pydantic, raytrain
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__, 'ray', ray.__version__,
      'smp', smp.__version__, 'pydantic', pydantic.__version__, 'raytrain', raytrain.__version__)
print('gpu:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" | tee "$OUT/versions.txt" || exit 1
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/versions.txt"
if $PYTHON -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    size=1248x384 bench=(--images 160 --epochs 3 --repeats 1 --data-cpus "4,$(($(nproc) - 1))" --alone-batches 8,32 --compile) use_gpu=true device=cuda cpus_per_worker=4
else
    size=128x64 bench=(--device cpu --size 128x64 --images 24 --epochs 2 --repeats 1 --data-cpus 2 --alone-batches 2,4) use_gpu=false device=cpu cpus_per_worker=1
fi
status=0
step() {  # step NAME SECONDS COMMAND...: one check, its own time limit, its log in $OUT
    local name=$1 seconds=$2; shift 2
    echo "== $name ($(date +%T))"
    local started=$SECONDS
    timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1
    local code=$?
    echo "== $name: exit $code in $((SECONDS - started)) s"
    tail -n 25 "$OUT/$name.log"
    [ $code -eq 0 ] || status=1
}

step tests 240 $PYTHON -m pytest -q -p no:cacheprovider -m gpu -rs --maxfail=2 --durations=10 tests/e2e/test_gpu.py
step benchmark 240 $PYTHON benchmarks/gpu.py "${bench[@]}"
sed -n '/^{/,$p' "$OUT/benchmark.log" > "$OUT/gpu.json"

work=$(mktemp -d)
cli() { $PYTHON -m raytrain.cli "$@"; }
search() {
    cli data synth --out "$work/kitti" --count 48 --size "$size" &&
    cli data shard "$work/kitti" --format kitti --out "$work/shards" &&
    cli tune kitti_search --set "data.path=$work/shards" --set "train.storage_path=$work/results" \
        --set search.num_samples=2 --set train.epochs=2 --set train.num_workers=1 \
        --set train.gpus_per_worker=0.5 --set search.scheduler.name=fifo --set search.max_concurrent_trials=2 \
        --set train.batch_size=4 --set train.use_gpu=$use_gpu --set train.cpus_per_worker=$cpus_per_worker \
        --set data.size=$size &&
    best=$(cli best "$work/results/kitti_search" | tail -n 1) &&
    echo "best: $best" && cli evaluate "$best" "$work/shards" --device "$device"
}
export -f cli search
export PYTHON work size use_gpu device cpus_per_worker
step search 140 bash -c search
exit $status
