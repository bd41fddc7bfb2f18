#!/usr/bin/env bash
# ResNet-56 on CIFAR-10 (JPEG) at the issue's GPU budget, on a borrowed GPU machine: a 10-epoch teacher, then 8 epochs
# a row for RMT-KD with factorised convolutions and, at its parameters, truncated SVD (at its ranks, then at one shared
# fraction of every block convolution) and layer dropping; then the same factorisation past 70% fewer
# (`rmtkd_conv_q75`) against truncated SVD at one shared fraction of its size.
#
# Run in the repository root after pack_for_device.py staged `.gpu/cifar10_jpeg`, `.gpu/resnet_cifar10` and the wheels
# (one call carries them). The results (markdown, the JSON store, the log) go to $OUT (default outputs/device-resnet56);
# models and the JSON store to $RUN (default outputs/device-resnet56-run, git-ignored, so it stays on a warm machine:
# a call that ran out of time resumes there, the teacher and finished rows kept, a row cut short from its last
# checkpoint). Extra arguments go to every bench_recovery.py invocation, e.g. `--max_steps 20 --eval_samples 256` for
# a smoke run.
#
#   bash examples/benchmarks/device_resnet56_cifar10.sh
set -euo pipefail
OUT=${OUT:-outputs/device-resnet56}
STAGE=${STAGE:-.gpu}
RUN=${RUN:-outputs/device-resnet56-run}
mkdir -p "$OUT"
source "$(dirname "$0")/device_env.sh"
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
common=(--task cifar10 --checkpoint "$STAGE/resnet_cifar10/resnet56-4bfd9763.th" --data_dir "$STAGE/cifar10_jpeg"
  --teacher_epochs 10 --teacher_learning_rate 1e-3 --learning_rate 1e-3 --num_train_epochs 8
  --per_device_train_batch_size 128 --per_device_eval_batch_size 512 --calibration_samples 2000
  --dataloader_num_workers 8 --logging_steps 100 --disable_tqdm true
  --output_dir "$RUN" --results_file "$OUT/recovery_resnet56_cifar10_gpu.md")
python3 examples/benchmarks/bench_recovery.py "${common[@]}" --recipes rmtkd_conv --seeds 0 "$@" 2>&1 | tee -a "$OUT/log.txt"
for baseline in svd layer_drop svd_size; do
  python3 examples/benchmarks/bench_recovery.py "${common[@]}" --recipes $baseline --match rmtkd_conv@0 --seeds 0 "$@" \
    2>&1 | tee -a "$OUT/log.txt"
done
python3 examples/benchmarks/bench_recovery.py "${common[@]}" --recipes rmtkd_conv_q75 --seeds 0 "$@" 2>&1 | tee -a "$OUT/log.txt"
python3 examples/benchmarks/bench_recovery.py "${common[@]}" --recipes svd_size --match rmtkd_conv_q75@0 --seeds 0 "$@" \
  2>&1 | tee -a "$OUT/log.txt"
cp "$RUN/results.json" "$OUT/results.json"
