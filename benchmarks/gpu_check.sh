#!/usr/bin/env bash
# The whole GPU check of a bare CUDA machine with no network, in one command from a checkout:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        # OUT_DIR defaults to benchmarks/results
#
# 1. installs the package offline, editable, without dependencies: the machine must already hold torch, triton,
#    transformers, peft, safetensors and pytest (pyproject.toml's ranges). That install needs setuptools >= 77 (it
#    reads pyproject.toml's licence fields); with an older one the checkout is used from PYTHONPATH instead,
#    which is all the check needs;
# 2. runs benchmarks/gpu_check.py within a 300 s budget -> OUT_DIR/gpu_check.json and .jsonl;
# 3. runs the kernel tests compiled on CUDA tensors (tests/kernels) -> OUT_DIR/gpu_kernel_tests.txt.
# Both steps are bounded by `timeout` (340 s + 180 s), so the command ends within 9 minutes with the install.
# The exit status is non-zero when either step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if python3 -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)"; then
  python3 -m pip install --quiet --no-deps --no-build-isolation --no-index -e . || exit 1
else
  echo "setuptools < 77: using the checkout from PYTHONPATH instead of installing it"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
  || exit 1

timeout 340 python3 benchmarks/gpu_check.py --budget-s 300 --out "$out/gpu_check.json"
check=$?
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tee "$out/gpu_kernel_tests.txt"
tests=$?
echo "gpu_check.py exit $check, kernel tests exit $tests"
[ "$check" -eq 0 ] && [ "$tests" -eq 0 ]
