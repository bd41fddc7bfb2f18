#!/usr/bin/env bash
# MPNet-base (BERT-base-sized) on full SST-2 with the 80% recipe, on a borrowed GPU machine, in one call.
#
# Run in the repository root after pack_for_device.py staged `.gpu/` and its calls carried every file there
# (model shards, tokenizer, sst2/, wheels/). Rows: the teacher (fine-tuned here), then `hidden_emb_front_b12` (every
# reduction first, hidden width + factorised token table at output-error budget 0.12, distilled from the teacher with
# the hidden-state and attention terms). bench_recovery.py times each row on the GPU at batch 1 and 32 beside the CPU.
# The results (markdown, the JSON store and the log) go to $OUT (default outputs/device-mpnet); models and the JSON
# store to $RUN (default outputs/device-mpnet-run, git-ignored, so it stays on a warm machine: a call that ran out of
# time resumes there, the teacher and finished rows kept, a row cut short from its last checkpoint). Extra arguments go
# to bench_recovery.py and override the defaults below, e.g. `--max_steps 20 --eval_samples 64` for a smoke run.
#
#   bash examples/benchmarks/device_mpnet_sst2.sh
set -euo pipefail
OUT=${OUT:-outputs/device-mpnet}
STAGE=${STAGE:-.gpu}
MODEL=${MODEL:-$STAGE/all-mpnet-base-v2}
RUN=${RUN:-outputs/device-mpnet-run}
mkdir -p "$OUT"
source "$(dirname "$0")/device_env.sh"
python3 - <<'EOF'
import torch, transformers, datasets
print(f"torch {torch.__version__}, transformers {transformers.__version__}, datasets {datasets.__version__}, "
      f"device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}")
EOF
python3 examples/benchmarks/bench_recovery.py \
  --model_name_or_path "$MODEL" --data_dir "$STAGE/sst2" \
  --teacher_epochs 1 --teacher_learning_rate 3e-5 \
  --recipes hidden_emb_front_b12 --num_train_epochs 3 \
  --per_device_train_batch_size 32 --per_device_eval_batch_size 256 \
  --logging_steps 200 --disable_tqdm true --tf32 true \
  --output_dir "$RUN" --results_file "$OUT/recovery_mpnet_sst2_gpu.md" "$@" 2>&1 | tee "$OUT/log.txt"
cp "$RUN/results.json" "$OUT/results.json"
