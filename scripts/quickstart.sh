#!/usr/bin/env bash
# Quick start on CPU: the whole job end to end on the toy teacher, in a few minutes.
#   1. set up the venv (first run: installs requirements.txt)
#   2. the toy SD3 teacher that generates coloured shapes, and its webdataset shards (assets/toy-teacher, committed;
#      rebuilt by scripts/make_toy_teacher.py if missing)
#   3. train with the seed's launch command shape: paddle.distributed.launch, 2 CPU ranks, every seed flag
#      (fp32 instead of fp16, toy sizes and learning rate, wandb offline unless WANDB_MODE says otherwise)
#   4. the image to look at: the teacher's 4-step samples next to the distilled 4-step samples (scripts/evaluate_pcm.py),
#      and one image from the trained LoRA with the PCM scheduler (the seed inference snippet, scripts/infer.py)
# Everything goes to ./quickstart-output (or $1).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
OUT="$(realpath -m "${1:-$REPO/quickstart-output}")"
mkdir -p "$OUT"
cd "$REPO"
export PYTHONWARNINGS=ignore
export WANDB_MODE="${WANDB_MODE:-offline}"   # --report_to wandb as in the seed command, logged locally

TOY="$REPO/assets/toy-teacher"
if [ ! -f "$TOY/toy_teacher.json" ]; then
  TOY="$OUT/toy"
  "$PY" scripts/make_toy_teacher.py --output_dir "$TOY" > /dev/null 2>&1
fi
PROMPT="a red circle on a blue background"
echo "teacher: $TOY/teacher   data: $TOY/data"

"$PY" -u -m paddle.distributed.launch --nproc_per_node 2 --log_dir "$OUT/launch-logs" train_pcm_lora_sd3_adv.py \
    --data_path "$TOY/data" \
    --text_embedding_cache_size 64 \
    --pretrained_teacher_model "$TOY/teacher" \
    --output_dir "$OUT/lora_toy_PCM_sd3" \
    --tracker_project_nam "lora_toy_PCM_sd3" \
    --mixed_precision "no" \
    --resolution "32" \
    --lora_rank "32" \
    --learning_rate "1e-3" \
    --loss_type "huber" \
    --adam_weight_decay "1e-3" \
    --max_train_steps "60" \
    --dataloader_num_workers "1" \
    --w_min "4" \
    --w_max "5" \
    --validation_steps "1000" \
    --validation_prompt "$PROMPT" \
    --checkpointing_steps "30" \
    --checkpoints_total_limit "10" \
    --train_batch_size "8" \
    --gradient_accumulation_steps "1" \
    --resume_from_checkpoint "latest" \
    --seed "453645634" \
    --num_euler_timesteps "100" \
    --multiphase "4" \
    --adv_weight "0.1" \
    --adv_lr "1e-5" \
    --report_to wandb

# library chatter goes to a log; on failure its end is shown
run_logged() {  # run_logged LOG command...: stdout kept, stderr to LOG
  local log="$1"; shift
  "$@" 2> "$log" || { echo "failed: $* (end of $log below)" >&2; tail -n 20 "$log" >&2; exit 1; }
}
run_logged "$OUT/evaluate.log" "$PY" scripts/evaluate_pcm.py --teacher "$TOY/teacher" --lora "$OUT/lora_toy_PCM_sd3" \
    --steps 4 --num_prompts 6 --noises_per_prompt 2 --output "$OUT/teacher_vs_pcm_4step.png" > "$OUT/evaluation.txt"
tail -n 1 "$OUT/evaluation.txt"
run_logged "$OUT/infer.log" "$PY" scripts/infer.py --pretrained_teacher_model "$TOY/teacher" --lora "$OUT/lora_toy_PCM_sd3" \
    --prompt "$PROMPT" --num_inference_steps 4 --pcm_timesteps 100 --guidance_scale 1 --output "$OUT/pcm_4step.png" > /dev/null
echo "LoRA: $OUT/lora_toy_PCM_sd3/paddle_lora_weights.safetensors"
echo "image: $OUT/teacher_vs_pcm_4step.png (teacher 50 steps | teacher 4 steps | PCM 4 steps; JSON above: latent MSE to the 50-step samples)"
