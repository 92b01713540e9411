#!/usr/bin/env bash
# The `7b` recipe (7.06B parameters) trained with FSDP2 on NPROC GPUs (issues #9, #24):
# throughput at sequence 4096 and 32768, a full-size distributed checkpoint saved and
# resumed (on as many GPUs and on another number), and a run of 200 steps on token shards
# of real text. From the repository root; the device-call plan is docs/notes/7b-runbook.md:
#
#     OUT=out bash tools/fsdp_7b.sh                          # phase short: 30 steps at 4096
#     OUT=out PHASES="data real" bash tools/fsdp_7b.sh       # shards, then 200 steps on them
#     OUT=out PHASES=long bash tools/fsdp_7b.sh              # sequence 32768
#     OUT=out PHASES=ckpt bash tools/fsdp_7b.sh              # save, resume, compare
#     DRY_RUN=1 OUT=/tmp/dry PHASES="short long data real ckpt" bash tools/fsdp_7b.sh
#
# DRY_RUN=1 runs every phase on CPU with gloo and the tiny recipe (2 processes, a few
# steps, shards of this repository's docs/): it checks the script and the comparisons,
# and measures nothing.
#
# Phases (PHASES, run in the order given; default short):
#   short  RECIPE at SEQ (4096), global batch BATCH (4), STEPS (30) steps, no checkpoint;
#          data: DATA, or the corpus that ships with Python as byte tokens (about 440K
#          training tokens). Writes train.log, metrics.jsonl, summary.json.
#   long   the same at SEQ_LONG (32768), global batch BATCH_LONG (NPROC: one sequence of
#          32K tokens per GPU, 4x the tokens of a 4096 step), STEPS_LONG (12) steps, the
#          first SKIP_LONG (2) left out of the summary. Writes long.log, long.json.
#   data   token shards in DATA_DIR (default /tmp/mmrec-shards-site-packages-32k), unless
#          it holds them already: `python -m mmrec.data.prepare` over the Python sources
#          and docs of this interpreter's site-packages (docs/data.md; about 410 MB of text
#          on the H200 image), a 32000-token BPE trained there (BPE_TRAIN_BYTES caps its
#          text; 0, the default, is all of it; TOKENIZER=path/tokenizer.json skips the
#          training), all cores encoding, every 100th document held out for validation
#          (VAL_FRACTION, 0.01). Writes data.log, data.json (counts and seconds).
#   real   RECIPE on DATA_DIR's shards: STEPS_REAL (200) steps at SEQ, batch BATCH, warmup
#          WARMUP_REAL (20) to the recipe's lr then cosine to its min_lr, validation every
#          EVAL_REAL (50) steps on 4 batches. Also the throughput at SEQ over 195 steps.
#          Writes real.log, real.json (summary and loss curve), real.png (matplotlib).
#   ckpt   four runs at SEQ, batch BATCH, dropout 0 (one process and several would draw
#          different masks), the learning rate in warmup throughout (warmup CKPT_STEPS
#          steps, so a step's rate does not depend on train.steps), torch.compile off
#          (CKPT_COMPILE, 0: no compile time), in CKPT_DTYPE (float32: fp32 parameters and
#          TF32 matmuls, TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1, so that one process and FSDP
#          compute alike; bfloat16: the recipe's mixed precision, see CKPT_RTOL_OTHER):
#            B  from scratch, CKPT_STEPS (8) steps, no checkpoint: the uninterrupted run;
#            A  from scratch, CKPT_AT (4) steps, saving the checkpoint of step CKPT_AT
#               (84.8 GB: fp32 weights and AdamW moments) in CKPT_DIR (default: RUN_DIR's
#               filesystem, else /dev/shm, whichever has the room; checked first);
#            C  A's checkpoint resumed on NPROC processes to step CKPT_STEPS;
#            D  A's checkpoint resumed on RESUME_NPROC (1) processes for RESUME_STEPS (2)
#               steps, the global batch in RESUME_ACCUM (BATCH: one sequence at a time)
#               micro-batches: the same samples, the least activation memory.
#          CKPT_RESUMES ("C D") picks the resumed runs (B and A always run: "D" alone
#          re-runs D in a later call).
#          PASS when C's losses of steps CKPT_AT+1.. (and its validation loss) are B's
#          within relative CKPT_RTOL (1e-4; "bitwise identical" is said when they are),
#          and D's within CKPT_RTOL_OTHER (1e-4 in float32; 1e-2 in bfloat16, where one
#          process keeps fp32 parameters under autocast and FSDP gathers bf16 ones, so
#          their losses differ by rounding, about as much as batches differ: a loose
#          check). The step after the checkpoint is a forward pass of the loaded weights
#          alone; the steps after it use the loaded AdamW state too. The checkpoint is
#          deleted at the end (KEEP_CKPT=1 keeps it). Writes ckpt.log, ckpt.json
#          (numbers and verdicts); exit status 1 on FAIL.
#
# Other settings (environment): NPROC (2), RECIPE (7b), COMPILE (auto: torch.compile per
# block, and the run again without it if the compiled one fails before its first step;
# 1; 0), SKIP (5: steps left out of the throughput summaries), SAVE (0; 1: the short
# phase saves a checkpoint at its end), RUN_DIR (/tmp/fsdp-7b-run: run folders, outside
# $OUT; the metrics and summaries are copied to $OUT), PYTHON (python3).
#
# Time: CALL_BUDGET (570 s; TIMEOUT is its old name) is what the whole invocation may
# take, to fit one 10-minute device call. Every training run gets what is left of it (less
# 15 s for the summaries) as its timeout, then SIGTERM: the processes finish their current
# step and exit 143, and the steps done so far are still summarised; a phase that would
# start with under 60 s left is skipped and named. The exit status is the first failing
# phase's (0 when all pass).
#
# The model is built on the meta device, sharded (fully_shard per block, then the root),
# then materialised and initialised shard by shard on each GPU, so start-up takes seconds.
# Byte tokens keep the recipe's 32000-token vocabulary (a BPE tokenizer trained on the
# small default corpus would stop at about 9200 tokens and shrink the model).
#
# Expected memory per GPU (2 GPUs, 7,063,546,176 parameters, 2 x 4096 tokens per GPU):
#   fp32 master weights, sharded         13.2 GiB
#   fp32 gradients, sharded              13.2 GiB
#   AdamW moments (fused), sharded       26.3 GiB   -> 52.6 GiB of state
#   bf16 gathered parameters: root (embedding + head, kept) 0.5, two blocks in flight
#     (296M parameters each; 237M for the delta layers) 1.1, the last block kept for backward 0.55   ~2.2 GiB
#   gradient reduce-scatter (bf16 block gradient + its fp32 copy, two in flight) ~3.3 GiB
#   activations with checkpointing: 24 block inputs (8192 x 4096 bf16) 1.5, one
#     block recomputed for its backward ~4 (its saved tensors, counted on the meta
#     device: 3.8 GiB, plus 4.2 GiB more if the memory read's SDPA fell back to its
#     math kernel), the loss (chunked: no [tokens, 32000] logits)        ~6-8 GiB
#   total ~64-68 GiB (the block before the hybrid, 7.36B parameters, measured 67.7 GiB
#   max_memory_allocated on 2 x H100).
# Without activation checkpointing the activations alone would be ~70 GiB: it stays on.
# At 32768 tokens per GPU (phase long) the activations grow 4x: block inputs 6 GiB, one
# block's recomputation ~15 GiB -> ~80-90 GiB of the H200's ~139 GiB (~105 if the memory
# read's SDPA takes its math kernel: 4.2 GiB at 8192 tokens, 16.8 at 32768).
# One process holding the whole model (ckpt's D): 16 bytes a parameter, 105.3 GiB (fp32
# weights 26.3, gradients 26.3, AdamW 52.6), plus the activations of one 4096-token
# sequence at a time in fp32 (block inputs 1.5 GiB, one block's recomputation ~4, ~4
# more if the memory read's SDPA takes its math kernel, the chunked loss ~0.5): ~116-120
# GiB of the H200's ~140 GiB (not an H100's 80). The whole batch at once would add
# ~20 GiB more, and bf16 autocast its cached bf16 copies of the weights (13.2 GiB).
# The checkpoint: 12 bytes a parameter (fp32 weights, two AdamW moments) = 84.8 GB, one
# .distcp file per saving process; it is hashed (SHA-256) when saved and again, by rank 0
# alone, when resumed.
#
# Compile time: the blocks are alike, so one compiled graph serves all 24; the first step
# took 32 s on 2 x H100 (forward and backward graphs), the validation at the end another
# ~30 s (an eval-mode graph). The summaries leave out the first SKIP steps.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
PHASES=${PHASES:-short}
NPROC=${NPROC:-2}
COMPILE=${COMPILE:-auto}
SAVE=${SAVE:-0}
SKIP=${SKIP:-5}
CALL_BUDGET=${CALL_BUDGET:-${TIMEOUT:-570}}
RUN_DIR=${RUN_DIR:-/tmp/fsdp-7b-run}
REPORT=(tools/fsdp_7b_report.py)
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# NVLink multicast stays off on the lent machines (their KINDS.md): keep it so for our processes
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}

if ! "$PYTHON" -c "import mmrec, tqdm, pydantic, safetensors, einops" 2>/dev/null; then
    # a bare device machine: as tools/device_check.sh does
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . || exit 1
    export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "$DRY_RUN" = 1 ]; then  # the tiny recipe on CPU with gloo: checks this script, measures nothing
    RECIPE=tiny; SEQ=${SEQ:-64}; BATCH=${BATCH:-4}; STEPS=${STEPS:-8}; SKIP=${SKIP_DRY:-2}
    SEQ_LONG=${SEQ_LONG:-256}; STEPS_LONG=${STEPS_LONG:-4}; SKIP_LONG=1
    STEPS_REAL=${STEPS_REAL:-12}; WARMUP_REAL=2; EVAL_REAL=4; VOCAB=512; VAL_FRACTION=0.2
    CKPT_STEPS=${CKPT_STEPS:-6}; CKPT_AT=${CKPT_AT:-3}
    [ "$COMPILE" = auto ] && COMPILE=0
    base=(--device cpu --peak-tflops 0.05)
    DATA_DIR=${DATA_DIR:-$RUN_DIR-shards}
    corpus=(--input docs --glob '*.md')  # a tiny input: this repository's docs
else
    RECIPE=${RECIPE:-7b}; SEQ=${SEQ:-4096}; BATCH=${BATCH:-4}; STEPS=${STEPS:-30}
    SEQ_LONG=${SEQ_LONG:-32768}; STEPS_LONG=${STEPS_LONG:-12}; SKIP_LONG=${SKIP_LONG:-2}
    STEPS_REAL=${STEPS_REAL:-200}; WARMUP_REAL=${WARMUP_REAL:-20}; EVAL_REAL=${EVAL_REAL:-50}; VOCAB=32000
    VAL_FRACTION=${VAL_FRACTION:-0.01}
    CKPT_STEPS=${CKPT_STEPS:-8}; CKPT_AT=${CKPT_AT:-4}
    base=()
    DATA_DIR=${DATA_DIR:-/tmp/mmrec-shards-site-packages-32k}
    site=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    corpus=(--input "$site" --glob '*.py' --glob '*.pyi' --glob '*.md' --glob '*.rst' --glob '*.txt')
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
BATCH_LONG=${BATCH_LONG:-$NPROC}
RESUME_NPROC=${RESUME_NPROC:-1}; RESUME_STEPS=${RESUME_STEPS:-2}; RESUME_ACCUM=${RESUME_ACCUM:-$BATCH}
CKPT_DTYPE=${CKPT_DTYPE:-float32}; CKPT_COMPILE=${CKPT_COMPILE:-0}; CKPT_RTOL=${CKPT_RTOL:-1e-4}
if [ "$CKPT_DTYPE" = float32 ]; then CKPT_RTOL_OTHER=${CKPT_RTOL_OTHER:-1e-4}; else CKPT_RTOL_OTHER=${CKPT_RTOL_OTHER:-1e-2}; fi
CKPT_RESUMES=${CKPT_RESUMES:-C D}
"$PYTHON" -c "import torch; print('torch', torch.__version__, '| cores', __import__('os').cpu_count())"
# every training run: activation checkpointing, no sample at the end
common=(--recipe "$RECIPE" "${base[@]}" --set train.activation_checkpointing=true --set train.sample_tokens=0)
byte=(); [ "$DRY_RUN" = 1 ] || byte=(--set train.tokenizer=byte)  # the default corpus as bytes, vocabulary kept

left() { echo $((CALL_BUDGET - SECONDS)); }
# elapsed LOG FROM PATTERN START: seconds from START to the stamp of the last line of LOG
# (from line FROM on) holding PATTERN; "?" when there is none
elapsed() {
    local t
    t=$(tail -n +"$2" "$1" | grep -a -- "$3" | tail -1 | awk '{ sub(/s$/, "", $1); print $1 }')
    if [ -n "$t" ] && [[ $4 =~ ^[0-9]+$ ]]; then echo $((t - $4)); else echo "?"; fi
}
stamp() { while IFS= read -r line; do printf '%4ds %s\n' "$SECONDS" "$line"; done; }  # seconds into the call

# launch NPROC LOG ARGS...: one torchrun of the trainer within the call's budget; its status
launch() {
    local nproc=$1 log=$2; shift 2
    local limit=$(($(left) - 15))
    if [ "$limit" -lt 45 ]; then
        echo "skipped: ${limit}s left of CALL_BUDGET=${CALL_BUDGET}s: torchrun --nproc-per-node $nproc ... $*" | tee -a "$log"
        return 124
    fi
    echo "+ torchrun --nproc-per-node $nproc -m mmrec.recipes.train $* (timeout ${limit}s)" | stamp | tee -a "$log"
    timeout --signal=TERM --kill-after=30 "$limit" \
        "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$nproc" \
        -m mmrec.recipes.train "$@" 2>&1 | stamp | tee -a "$log"
    return "${PIPESTATUS[0]}"
}

# train RUN LOG ARGS...: a fresh run into folder RUN, compiled as COMPILE says
train() {
    local run=$1 log=$2; shift 2
    attempt() {  # attempt true|false ARGS...
        local compile=$1; shift
        rm -rf "$run"
        launch "$NPROC" "$log" --out "$run" "$@" --set train.compile="$compile"
    }
    case $COMPILE in
    1 | true) attempt true "$@" ;;
    0 | false) attempt false "$@" ;;
    *)
        attempt true "$@"
        local status=$?
        if [ $status -ne 0 ] && ! grep -q train_loss "$run/metrics.jsonl" 2>/dev/null; then
            echo "the compiled run failed before its first step: again without torch.compile" | tee -a "$log"
            attempt false "$@"
        else
            return $status
        fi ;;
    esac
}

phase_short() {
    : > "$OUT/train.log"
    local save=(); [ "$SAVE" = 1 ] || save=(--set train.save=false)
    train "$RUN_DIR" "$OUT/train.log" "${common[@]}" "${byte[@]}" ${DATA:+--data "$DATA"} "${save[@]}" \
        --set train.seq_len="$SEQ" --set train.batch_size="$BATCH" --set train.steps="$STEPS" \
        --set train.warmup_steps=5 --set train.eval_every=100000 --set train.eval_batches=1
    local status=$?
    cp "$RUN_DIR/metrics.jsonl" "$OUT/metrics.jsonl" 2>/dev/null
    "$PYTHON" "${REPORT[@]}" summary "$OUT/metrics.jsonl" --processes "$NPROC" --skip "$SKIP" \
        --out "$OUT/summary.json" || { [ $status = 0 ] && status=1; }
    return $status
}

phase_long() {
    : > "$OUT/long.log"
    train "$RUN_DIR-long" "$OUT/long.log" "${common[@]}" "${byte[@]}" ${DATA:+--data "$DATA"} \
        --set train.save=false --set train.seq_len="$SEQ_LONG" --set train.batch_size="$BATCH_LONG" \
        --set train.steps="$STEPS_LONG" --set train.warmup_steps=5 --set train.eval_every=100000 \
        --set train.eval_batches=1
    local status=$?
    "$PYTHON" "${REPORT[@]}" summary "$RUN_DIR-long/metrics.jsonl" --processes "$NPROC" --skip "$SKIP_LONG" \
        --label "sequence $SEQ_LONG, batch $BATCH_LONG" --out "$OUT/long.json" 2>&1 | tee -a "$OUT/long.log"
    [ "${PIPESTATUS[0]}" = 0 ] || { [ $status = 0 ] && status=1; }
    return $status
}

phase_data() {
    : > "$OUT/data.log"
    if [ -f "$DATA_DIR/index.json" ]; then
        echo "token shards already in $DATA_DIR: kept" | tee -a "$OUT/data.log"
        return 0
    fi
    local tok=(--vocab-size "$VOCAB" --tokenizer-train-bytes "${BPE_TRAIN_BYTES:-0}" --val-fraction "$VAL_FRACTION")
    [ -n "${TOKENIZER:-}" ] && tok=(--tokenizer "$TOKENIZER")
    local started=$SECONDS limit=$(($(left) - 15))
    echo "+ python -m mmrec.data.prepare ${corpus[*]} ${tok[*]} --out $DATA_DIR (timeout ${limit}s)" | stamp | tee -a "$OUT/data.log"
    TOKENIZERS_PARALLELISM=true timeout --signal=TERM --kill-after=10 "$limit" \
        "$PYTHON" -m mmrec.data.prepare "${corpus[@]}" "${tok[@]}" --out "$DATA_DIR" --overwrite 2>&1 \
        | tr '\r' '\n' | grep -v '^\s*$' | stamp | tee -a "$OUT/data.log" | tail -5
    local status=${PIPESTATUS[0]}
    "$PYTHON" - "$DATA_DIR/index.json" "$OUT/data.json" $((SECONDS - started)) <<'EOF' | tee -a "$OUT/data.log"
import json, os, sys
from pathlib import Path
index, out, wall = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
if not index.exists():
    sys.exit(f"no shards were written ({wall} s): see data.log")
i = json.loads(index.read_text())
report = {"dir": str(index.parent), "wall_s": wall, "cores": os.cpu_count(), "prepare_s": i.get("seconds"),
          "documents": i["documents"], "input_bytes": i["input_bytes"], "tokenizer": i["tokenizer"],
          "train_tokens": i["splits"]["train"]["tokens"], "val_tokens": i["splits"]["val"]["tokens"],
          "sources": i["sources"]}
out.write_text(json.dumps(report, indent=1) + "\n")
print(f"shards: {report['documents']:,} documents, {report['input_bytes'] / 1e6:.1f} MB of text -> "
      f"{report['train_tokens']:,} training and {report['val_tokens']:,} validation tokens in {wall} s "
      f"on {report['cores']} cores ({index.parent})")
EOF
    return "$status"
}

phase_real() {
    : > "$OUT/real.log"
    if [ ! -f "$DATA_DIR/index.json" ]; then
        echo "no token shards in $DATA_DIR: run the data phase first (PHASES=\"data real\")" | tee -a "$OUT/real.log"
        return 2
    fi
    local vocab=(); [ "$DRY_RUN" = 1 ] && vocab=(--set model.vocab_size="$VOCAB")  # tiny's 256 bytes < the BPE
    train "$RUN_DIR-real" "$OUT/real.log" "${common[@]}" "${vocab[@]}" --data "$DATA_DIR" --set train.save=false \
        --set train.seq_len="$SEQ" --set train.batch_size="$BATCH" --set train.steps="$STEPS_REAL" \
        --set train.warmup_steps="$WARMUP_REAL" --set train.eval_every="$EVAL_REAL" --set train.eval_batches=4
    local status=$?
    "$PYTHON" "${REPORT[@]}" summary "$RUN_DIR-real/metrics.jsonl" --processes "$NPROC" --skip "$SKIP" --curve \
        --label "real data, sequence $SEQ" --out "$OUT/real.json" 2>&1 | tee -a "$OUT/real.log"
    if [ "${PIPESTATUS[0]}" = 0 ]; then
        "$PYTHON" "${REPORT[@]}" plot "$OUT/real.json" --out "$OUT/real.png" \
            --title "$RECIPE, FSDP2 on $NPROC GPUs: $(basename "$DATA_DIR") shards, $BATCH x $SEQ tokens a step" \
            2>&1 | tee -a "$OUT/real.log"
    elif [ $status = 0 ]; then
        status=1
    fi
    return $status
}

# ckpt_dir LOG NEED: the first of CKPT_DIR (default: $RUN_DIR-ckpt, on disk, then
# /dev/shm/fsdp-7b-ckpt, in memory) whose filesystem has NEED bytes and 5% more free, or
# nothing; what it found goes to LOG
ckpt_dir() {
    local dir free
    for dir in ${CKPT_DIR:-$RUN_DIR-ckpt /dev/shm/fsdp-7b-ckpt}; do
        mkdir -p "$dir" 2>/dev/null || continue
        free=$(df -B1 --output=avail "$dir" | tail -1)
        echo "$((free / 1000000)) MB free in $dir" | tee -a "$1" >&2
        if [ "$free" -ge $(($2 + $2 / 20)) ]; then echo "$dir"; return; fi
        rmdir "$dir" 2>/dev/null
    done
}

phase_ckpt() {
    local log=$OUT/ckpt.log status=0 need dir
    : > "$log"
    need=$("$PYTHON" -c 'import sys, mmrec.recipes as r; from mmrec.sizing import estimate_parameters as e
print(12 * e(r.load(sys.argv[1]).model)[0])' "$RECIPE")
    echo "the checkpoint: about $((need / 1000000)) MB (12 bytes a parameter)" | tee -a "$log"
    dir=$(ckpt_dir "$log" "$need")
    if [ -z "$dir" ]; then
        echo "FAIL: no room for the checkpoint: set CKPT_DIR to a folder on a filesystem with more" | tee -a "$log"
        return 1
    fi
    rm -rf "${dir:?}"/{a,b,c,d}
    echo "runs in $dir: B, A, then $CKPT_RESUMES, in $CKPT_DTYPE" | tee -a "$log"
    # TF32 for fp32 matmuls in these runs alone: the others compute in bf16
    [ "$CKPT_DTYPE" = float32 ] && local -x TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1
    local args=("${common[@]}" "${byte[@]}" ${DATA:+--data "$DATA"} --set model.dropout=0 --set train.dtype="$CKPT_DTYPE"
                --set train.seq_len="$SEQ" --set train.batch_size="$BATCH" --set train.warmup_steps="$CKPT_STEPS"
                --set train.eval_every=100000 --set train.eval_batches=1)
    local COMPILE=$CKPT_COMPILE compare=()
    echo "== B: the uninterrupted run, $CKPT_STEPS steps" | tee -a "$log"
    train "$dir/b" "$log" "${args[@]}" --set train.steps="$CKPT_STEPS" --set train.save=false || status=1
    echo "== A: from scratch to step $CKPT_AT, saving its checkpoint" | tee -a "$log"
    train "$dir/a" "$log" "${args[@]}" --set train.steps="$CKPT_AT" --set train.save=true || status=1
    local ckpt validated started from
    ckpt=$(printf '%s/a/step_%06d' "$dir" "$CKPT_AT")
    if [ -f "$ckpt/manifest.json" ]; then
        # the save: from the validation line before it to the line that names the saved folder
        validated=$(elapsed "$log" 1 "step $CKPT_AT: validation loss" 0)
        echo "saved $ckpt: $(du -sh "$ckpt" | cut -f1) in about $(elapsed "$log" 1 "step $CKPT_AT: saved" "$validated") s" \
            | tee -a "$log"
        local resume=(--resume "$ckpt" --set train.save=false --set train.compile="$CKPT_COMPILE" "${base[@]}")
        if [[ " $CKPT_RESUMES " == *" C "* ]]; then
            started=$SECONDS from=$(($(wc -l < "$log") + 1))
            echo "== C: resumed on $NPROC processes to step $CKPT_STEPS" | tee -a "$log"
            launch "$NPROC" "$log" "${resume[@]}" --out "$dir/c" --set train.steps="$CKPT_STEPS" || status=1
            echo "C: launch to resumed (start-up, checking the files' SHA-256, loading):" \
                "$(elapsed "$log" "$from" "resuming from" "$started") s" | tee -a "$log"
            compare+=(--resumed "$dir/c" --processes "$NPROC")
        fi
        if [[ " $CKPT_RESUMES " == *" D "* ]]; then
            started=$SECONDS from=$(($(wc -l < "$log") + 1))
            echo "== D: resumed on $RESUME_NPROC process(es) to step $((CKPT_AT + RESUME_STEPS))," \
                 "$RESUME_ACCUM micro-batch(es) a step" | tee -a "$log"
            launch "$RESUME_NPROC" "$log" "${resume[@]}" --out "$dir/d" --set train.steps=$((CKPT_AT + RESUME_STEPS)) \
                --set train.batch_size=$((BATCH / RESUME_ACCUM)) --set train.grad_accum="$RESUME_ACCUM" || status=1
            echo "D: launch to resumed: $(elapsed "$log" "$from" "resuming from" "$started") s" \
                "$(tail -n +"$from" "$log" | grep -ao 'peak memory per GPU [^(]*' | tail -1)" | tee -a "$log"
            compare+=(--other "$dir/d" --other-processes "$RESUME_NPROC" --other-until $((CKPT_AT + RESUME_STEPS)))
        fi
    else
        echo "FAIL: no checkpoint $ckpt was written" | tee -a "$log"
        status=1
    fi
    if [ ${#compare[@]} -gt 0 ]; then
        "$PYTHON" "${REPORT[@]}" resume --reference "$dir/b" --fresh "$dir/a" "${compare[@]}" --at "$CKPT_AT" \
            --rtol "$CKPT_RTOL" --rtol-other "$CKPT_RTOL_OTHER" --out "$OUT/ckpt.json" 2>&1 | tee -a "$log"
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
    fi
    [ "${KEEP_CKPT:-0}" = 1 ] || rm -rf "$dir/a"/step_*  # 88 GB at 7b size
    return $status
}

overall=0
for phase in ${PHASES//,/ }; do
    case $phase in short | long | data | real | ckpt) ;; *)
        echo "unknown phase '$phase': PHASES takes short, long, data, real and ckpt" >&2; exit 2 ;;
    esac
    echo "=== phase $phase ($(left)s left of CALL_BUDGET=${CALL_BUDGET}s)"
    if [ "$(left)" -lt 60 ]; then
        echo "=== phase $phase skipped: under 60 s left"
        [ $overall = 0 ] && overall=124
        continue
    fi
    "phase_$phase"
    status=$?
    echo "=== phase $phase: exit status $status after ${SECONDS}s"
    [ $overall = 0 ] && overall=$status
done
exit $overall
