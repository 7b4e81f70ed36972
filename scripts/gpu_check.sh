#!/usr/bin/env bash
# On a CUDA machine: the GPU tests, the engine's tests on that machine, and the benchmark.
# Results go to $OUT (or ./out) as logs and JSON.
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_nmf.py tests/test_refine.py \
  tests/test_network.py tests/test_pipeline.py tests/test_gpu_decode.py 2>&1 | tee "$out/tests.log"
python3 -m phpn.evaluate.speed --device cuda --json > "$out/bench_gpu.json"
python3 -m phpn.evaluate.speed --device cuda 2>&1 | tee "$out/bench_gpu.txt"
# A live discovery of the fashion-mnist demo on the GPU (certified on its 1,000 images).
python3 -m phpn discover --demo fashion-mnist --device cuda --out /tmp/fashion-gpu-run --quiet 2>&1 | tee "$out/fashion_gpu.txt"
# Refinement's time against its iterations and subspace rank, and its top kernels.
PYTHONPATH=. python3 scripts/profile_refine.py --device cuda 2>&1 | tee "$out/profile_refine.txt"
# Folder -> certified run, timed by stage: CUB-sized (200 classes x 30 JPEGs at 256 px), ResNet-50
# with random weights; the feature stage against a pure forward pass in the same run. Once with
# the JPEGs decoded on the GPU (nvJPEG), once by Pillow in the decoding workers; both printed.
for decode in gpu cpu; do
  python3 -m phpn.evaluate.speed --end-to-end --device cuda --decode "$decode" --json > "$out/bench_end_to_end_gpu_decode_$decode.json"
  echo "--- decode $decode" | tee -a "$out/bench_end_to_end_gpu.txt"
  python3 -c 'import json, sys; from phpn.evaluate.speed import print_end_to_end; print_end_to_end(json.load(open(sys.argv[1])))' \
    "$out/bench_end_to_end_gpu_decode_$decode.json" 2>&1 | tee -a "$out/bench_end_to_end_gpu.txt"
done
