#!/usr/bin/env bash
# FSDP2 training of the 24-layer `7b` recipe (7.36B parameters) on 2 GPUs at sequence
# length 4096, for a few dozen steps: tokens/s, MFU against the measured bf16 matmul rate,
# peak memory per GPU, and the loss going down (issue #9). From the repository root:
#
#     OUT=out bash tools/fsdp_7b.sh              # the 2-GPU run (about 3-5 minutes)
#     DRY_RUN=1 OUT=/tmp/dry bash tools/fsdp_7b.sh   # the same script on CPU: tiny recipe, gloo
#
# Settings (environment): RECIPE (7b), NPROC (2), STEPS (30), BATCH (4, the global batch: 2 sequences
# per GPU), SEQ (4096), COMPILE (auto: torch.compile per block, and the run again without
# it if the compiled one fails before its first step; 1; 0), SAVE (0: no checkpoint at
# all; 1: one distributed checkpoint at the end, about 88 GB of model and optimizer state
# in RUN_DIR), DATA (default: the corpus that ships with Python, byte tokens: about 440K
# training tokens, so 30 steps of 16K tokens see each token about once), TIMEOUT (480 s;
# SIGTERM then: the processes stop after their current step, exit 143, and the steps done
# so far are still summarised), PYTHON (python3).
#
# The model is built on the meta device, sharded (fully_shard per block, then the root),
# then materialised and initialised shard by shard on each GPU, so start-up takes seconds.
# Byte tokens keep the recipe's 32000-token vocabulary (a BPE tokenizer trained on the
# small default corpus would stop at about 9200 tokens and shrink the model).
#
# Expected memory per GPU (2 GPUs, 7,359,696,896 parameters, 2 x 4096 tokens per GPU):
#   fp32 master weights, sharded         13.7 GiB
#   fp32 gradients, sharded              13.7 GiB
#   AdamW moments (fused), sharded       27.4 GiB   -> 54.8 GiB of state
#   bf16 gathered parameters: root (embedding + head, kept) 0.5, two blocks in flight
#     (296M parameters each) 1.1, the last block kept for backward 0.55   ~2.2 GiB
#   gradient reduce-scatter (bf16 block gradient + its fp32 copy, two in flight) ~3.3 GiB
#   activations with checkpointing: 24 block inputs (8192 x 4096 bf16) 1.5, one
#     block recomputed for its backward ~4 (its saved tensors, counted on the meta
#     device: 3.8 GiB, plus 4.2 GiB more if the memory read's SDPA fell back to its
#     math kernel), logits and loss (8192 x 32000: bf16 logits, fp32 copy, saved
#     log-softmax, gradient) ~3                                           ~8-10 GiB
#   total ~68-70 GiB of the H100's 79.1 GiB (max_memory_allocated); the CUDA allocator
#   reserves some more, which expandable segments keep small.
# Without activation checkpointing the activations alone would be ~70 GiB: it stays on.
#
# Compile time: the blocks are alike, so one compiled graph serves all 24; expect the
# first step to take 1-2 minutes (forward and backward graphs) and the validation at the
# end another ~30 s (an eval-mode forward graph). The summary leaves out the first
# SKIP (5) steps.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
NPROC=${NPROC:-2}
COMPILE=${COMPILE:-auto}
SAVE=${SAVE:-0}
SKIP=${SKIP:-5}
TIMEOUT=${TIMEOUT:-480}
RUN_DIR=${RUN_DIR:-/tmp/fsdp-7b-run}  # checkpoints stay out of $OUT; the metrics are copied there
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

if ! "$PYTHON" -c "import mmrec, tqdm, pydantic, safetensors, einops" 2>/dev/null; then
    # a bare device machine: as tools/device_check.sh does
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . || exit 1
    export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "$DRY_RUN" = 1 ]; then  # the tiny recipe on CPU with gloo: checks this script, measures nothing
    STEPS=${STEPS:-8}; SKIP=${SKIP_DRY:-2}
    [ "$COMPILE" = auto ] && COMPILE=0
    args=(--recipe tiny --device cpu --peak-tflops 0.05
          --set train.seq_len="${SEQ:-64}" --set train.batch_size="${BATCH:-4}")
else
    STEPS=${STEPS:-30}
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    args=(--recipe "${RECIPE:-7b}" --set train.tokenizer=byte
          --set train.seq_len="${SEQ:-4096}" --set train.batch_size="${BATCH:-4}")
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__)"
args+=(--out "$RUN_DIR" ${DATA:+--data "$DATA"}
       --set train.steps="$STEPS" --set train.warmup_steps=5 --set train.activation_checkpointing=true
       --set train.eval_every=100000 --set train.eval_batches=1 --set train.sample_tokens=0)
[ "$SAVE" = 1 ] || args+=(--set train.save=false)

started=$SECONDS
train() {  # $1: compile (true/false); both tries together stay within TIMEOUT
    rm -rf "$RUN_DIR"
    echo "+ torchrun --nproc-per-node $NPROC -m mmrec.recipes.train ${args[*]} --set train.compile=$1"
    timeout --signal=TERM --kill-after=30 $((TIMEOUT - (SECONDS - started))) \
        "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
        -m mmrec.recipes.train "${args[@]}" --set train.compile="$1" 2>&1 | tee -a "$OUT/train.log"
    status=${PIPESTATUS[0]}
    cp "$RUN_DIR/metrics.jsonl" "$OUT/metrics.jsonl" 2>/dev/null
    return "$status"
}

: > "$OUT/train.log"
case $COMPILE in
1 | true) train true ;;
0 | false) train false ;;
*)
    train true
    if [ $? -ne 0 ] && ! grep -q train_loss "$OUT/metrics.jsonl" 2>/dev/null; then
        echo "the compiled run failed before its first step: again without torch.compile"
        train false
    fi ;;
esac
status=$?

"$PYTHON" - "$OUT" "$SKIP" "$NPROC" <<'EOF'
import json, sys
from pathlib import Path

out, skip, nproc = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
path = out / "metrics.jsonl"
records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
steps = [r for r in records if "train_loss" in r]
if not steps:
    sys.exit("no training step finished: see train.log")
timed = steps[skip:] if len(steps) > skip else steps
seconds = sum(r["train_step_s"] for r in timed)
tokens = sum(r["train_step_s"] * r["train_tokens_per_s"] for r in timed)
summary = {
    "processes": nproc, "steps": len(steps), "steps_timed": len(timed), "first_timed_step": timed[0]["step"],
    "tokens_per_s": tokens / seconds, "s_per_step": seconds / len(timed),
    "first_step_s": steps[0]["train_step_s"],
    "loss_first": steps[0]["train_loss"], "loss_last": steps[-1]["train_loss"],
    "loss_min": min(r["train_loss"] for r in steps),
}
if "train_mfu" in timed[0]:  # per step MFU is linear in tokens/s: weight by time
    summary["mfu"] = sum(r["train_mfu"] * r["train_step_s"] for r in timed) / seconds
if "train_peak_gib" in steps[-1]:
    summary["peak_gib_per_gpu"] = steps[-1]["train_peak_gib"]
    summary["peak_reserved_gib_per_gpu"] = steps[-1]["train_peak_reserved_gib"]
events = [r for r in records if r.get("event") == "throughput"]
if events:
    summary["trainer_summary"] = events[-1]  # the trainer's own, over all but its first 3 steps
val = [r["val_loss"] for r in records if "val_loss" in r]
if val:
    summary["val_loss"] = val[-1]
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print("\nloss by step: " + " ".join(f"{r['train_loss']:.3f}" for r in steps))
print(json.dumps(summary, indent=1))
mfu = f", MFU {100 * summary['mfu']:.1f}%" if "mfu" in summary else ""
mem = (", peak memory per GPU " + " / ".join(f"{g:.1f}" for g in summary["peak_gib_per_gpu"]) + " GiB"
       if "peak_gib_per_gpu" in summary else "")
print(f"{nproc} processes: {summary['tokens_per_s']:,.0f} tokens/s over steps {summary['first_timed_step']}-"
      f"{steps[-1]['step']}{mfu}{mem}; loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}")
EOF
exit $status
