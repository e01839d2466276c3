#!/usr/bin/env bash
# Quick start on CPU: the whole job end to end on the embedded default, in about a minute.
#   1. set up the venv (first run: installs requirements.txt)
#   2. build the tiny random SD3 teacher and tiny CC3M-style webdataset shards
#   3. train with the seed's launch command shape: paddle.distributed.launch, 2 CPU ranks, every seed flag
#      (fp32 instead of fp16, tiny sizes, wandb offline unless WANDB_MODE says otherwise)
#   4. generate an image from the trained LoRA with the PCM scheduler (the seed inference snippet)
# Everything goes to ./quickstart-output (or $1).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
OUT="$(realpath -m "${1:-$REPO/quickstart-output}")"
mkdir -p "$OUT"
cd "$REPO"
export PYTHONWARNINGS=ignore
export WANDB_MODE="${WANDB_MODE:-offline}"   # --report_to wandb as in the seed command, logged locally

[ -f "$OUT/tiny-sd3/model_index.json" ] || "$PY" scripts/make_tiny_sd3.py --output_dir "$OUT/tiny-sd3" --seed 0 > /dev/null 2>&1
[ -d "$OUT/cc3m" ] || "$PY" scripts/make_tiny_cc3m.py --output_dir "$OUT/cc3m" --num_shards 4 --samples_per_shard 16 --seed 0 > /dev/null
echo "teacher: $OUT/tiny-sd3   data: $OUT/cc3m"

"$PY" -u -m paddle.distributed.launch --nproc_per_node 2 --log_dir "$OUT/launch-logs" train_pcm_lora_sd3_adv.py \
    --data_path "$OUT/cc3m" \
    --pretrained_teacher_model "$OUT/tiny-sd3" \
    --output_dir "$OUT/lora_tiny_PCM_sd3" \
    --tracker_project_nam "lora_tiny_PCM_sd3" \
    --mixed_precision "no" \
    --resolution "128" \
    --lora_rank "32" \
    --learning_rate "5e-6" \
    --loss_type "huber" \
    --adam_weight_decay "1e-3" \
    --max_train_steps "20" \
    --dataloader_num_workers "1" \
    --w_min "4" \
    --w_max "5" \
    --validation_steps "1000" \
    --checkpointing_steps "10" \
    --checkpoints_total_limit "10" \
    --train_batch_size "2" \
    --gradient_accumulation_steps "1" \
    --resume_from_checkpoint "latest" \
    --seed "453645634" \
    --num_euler_timesteps "100" \
    --multiphase "4" \
    --adv_weight "0.1" \
    --adv_lr "1e-5" \
    --report_to wandb

"$PY" scripts/infer.py --pretrained_teacher_model "$OUT/tiny-sd3" \
    --lora "$OUT/lora_tiny_PCM_sd3/paddle_lora_weights.safetensors" \
    --num_inference_steps 4 --pcm_timesteps 100 --output "$OUT/pcm_4step.png" 2>/dev/null | tail -n 1
echo "LoRA: $OUT/lora_tiny_PCM_sd3/paddle_lora_weights.safetensors   image: $OUT/pcm_4step.png"
