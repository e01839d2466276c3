#!/usr/bin/env bash
# Does it distil? The demonstration on 2 CPU ranks, one command:
#   1. the toy teacher (assets/toy-teacher, committed; else built by scripts/make_toy_teacher.py into OUT/toy)
#   2. PCM distillation with the seed command's flags scaled down to the toy world
#      (huber, w in [4, 5] as in the seed command, 100 Euler points, 4 phases, adversarial loss on; rank 16, lr 1e-3 with cosine decay, STEPS steps)
#   3. scripts/evaluate_pcm.py: teacher 1/2/4 steps and PCM 1/2/4 steps against the teacher's 50-step samples
# Writes OUT/pcm-lora/ (the run), OUT/toy_distill_grid.png and OUT/evaluation.json; the last line printed is
# the evaluation JSON. OUT defaults to ./toy-distill-output; STEPS (default 1200) overrides the step count.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
OUT="$(realpath -m "${1:-$REPO/toy-distill-output}")"
STEPS="${STEPS:-1200}"
mkdir -p "$OUT"
cd "$REPO"
export PYTHONWARNINGS=ignore

TOY="$REPO/assets/toy-teacher"
if [ ! -f "$TOY/toy_teacher.json" ]; then
  TOY="$OUT/toy"
  "$PY" scripts/make_toy_teacher.py --output_dir "$TOY" >&2
fi
echo "toy teacher: $TOY" >&2

"$PY" -u -m paddle.distributed.launch --nproc_per_node 2 --log_dir "$OUT/launch-logs" train_pcm_lora_sd3_adv.py \
    --pretrained_teacher_model "$TOY/teacher" \
    --data_path "$TOY/data" \
    --text_embedding_cache_size 64 \
    --output_dir "$OUT/pcm-lora" \
    --mixed_precision no \
    --resolution 32 \
    --lora_rank 16 \
    --learning_rate 1e-3 \
    --lr_scheduler cosine \
    --lr_warmup_steps 0 \
    --loss_type huber \
    --adam_weight_decay 1e-3 \
    --max_train_steps "$STEPS" \
    --w_min 4 \
    --w_max 5 \
    --train_batch_size 8 \
    --checkpointing_steps 100000 \
    --num_validation_images 0 \
    --seed 453645634 \
    --num_euler_timesteps 100 \
    --multiphase 4 \
    --adv_weight 0.1 \
    --adv_lr 1e-5 \
    --report_to none >&2

"$PY" scripts/evaluate_pcm.py --teacher "$TOY/teacher" --lora "$OUT/pcm-lora" --steps 1 2 4 \
    --output "$OUT/toy_distill_grid.png" 2>/dev/null | tee "$OUT/evaluation.log" >&2
tail -n 1 "$OUT/evaluation.log" > "$OUT/evaluation.json"
cat "$OUT/evaluation.json"
