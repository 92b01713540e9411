#!/usr/bin/env bash
# GPU tests and benchmarks in one pass, for the lent device machine (see docs/benchmarks.md).
# Usage there, from the repository root: bash tools/device_check.sh [tests|bench|sweep|quality|model|delta|intermediates|host|fla|hybrid|candidate|memory-attention|recall|recall-long|scale|seeds]...
# Wheels the device lacks (pydantic, ...) may be carried in .whl/, the quality benchmark's
# corpus in .data/ (both ignored by git); logs and JSON go to $OUT.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
# SKIP_INSTALL=1: another run of this script in the same call has installed (two at once would race)
if [ -z "${SKIP_INSTALL:-}" ]; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    fi
    # installed, not only on the path: the registry reads the entry points from the package metadata
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . plugins/* || exit 1
fi
export PYTHONPATH=$PWD:/tmp/site
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
parts=("$@"); [ ${#parts[@]} -eq 0 ] && parts=(tests bench)
for part in "${parts[@]}"; do
    case $part in
    tests)
        # the CUDA tests only (-k cuda): the interpreter tests are CPU work that CI already does
        timeout "${TESTS_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider -k cuda ${TEST_FILES:-tests plugins} 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
    bench)
        [ -n "${SKIP_SCAN:-}" ] || timeout 120 python3 -m mmrec.bench scan --out "$OUT/scan.json" 2>&1 | tee "$OUT/scan.log" | tail -22
        timeout 60 python3 -m mmrec.bench block --out "$OUT/block.json" 2>&1 | tail -12
        timeout 240 python3 -m mmrec.bench decode --modes graph --compile both --kv-splits 0 --batches 1 8 16 \
            --out "$OUT/decode.json" --plot "$OUT/decode.png" 2>&1 | tee "$OUT/decode.log" | grep -v "^{" | tail -30
        [ -n "${SKIP_GATED:-}" ] || timeout 90 python3 -m mmrec.bench gated-rnn --batches 4 16 64 --lengths 512 --out "$OUT/gated_rnn.json" 2>&1 | tail -16 ;;
    sweep)
        # the op with its default tiles, then the kernels alone with these tiles: the H100's
        # and the H200's tables and neighbours (tools/scan_sweep.py, docs/notes/scan-kernel.md)
        timeout 100 python3 -m mmrec.bench scan --no-baselines --lengths 2048 8192 32768 \
            --out "$OUT/sweep-op.json" 2>&1 | tee "$OUT/sweep-op.log" | tail -12
        timeout 240 python3 -m tools.scan_sweep --lengths 32768 --log \
            --tiles 8,8,128,4,stages=3,reread=0 16,8,128,8,stages=3,reread=0 16,4,128,8,reread=0 \
                    16,8,64,4 32,4,64,8,reread=0 16,8,64,4,stages=3,reread=0 16,4,64,4,stages=3,reread=0 \
                    16,4,64,4,reread=0 32,4,64,8,stages=3,reread=0 \
            --out "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.log" | grep -v "^{" | tail -30 ;;
    quality)
        # QUALITY_RECIPES: shipped names or recipe files, trained side by side (default: the shipped
        # pair); QUALITY_STEPS: fewer steps than the recipes' own
        timeout "${QUALITY_TIMEOUT:-560}" python3 -m mmrec.bench quality --data .data/tinyshakespeare.txt --runs /tmp/quality \
            ${QUALITY_RECIPES:+--recipes $QUALITY_RECIPES} --set train.compile=true \
            ${QUALITY_STEPS:+--set train.steps=$QUALITY_STEPS} --out "$OUT/quality.json" 2>&1 | tail -12
        cp /tmp/quality/*.log "$OUT/" 2>/dev/null ;;
    model)
        timeout 560 python3 -m mmrec.bench model --out "$OUT/model.json" --plot "$OUT/model.png" 2>&1 | tee "$OUT/model.log" | tail -12 ;;
    delta)
        # the delta rule's op, with float32 and with bf16 intermediates, against the PyTorch loop,
        # and each launcher alone (also with 32 and 64 value columns, 2 pipeline stages and
        # OUTPUT=after) at 2K with batch 4, 8 and 16 (and the preparation with INVERSE=blocks and
        # with tf32 products, PRECISION=tf32), then at batch 1 x 32K
        # (TF32 as training runs it; fla is the separate
        # part `fla`, whose autotuning takes minutes). The kernels' CUDA tests, about 60, take a
        # call of their own: `tests` with TEST_FILES="tests/ops/test_delta_rule_chunk_scan.py
        # tests/ops/test_delta_rule_chunk_prepare.py"
        for tokens in 8192 16384 32768; do
            timeout 100 python3 -m mmrec.bench delta --kernels --no-baselines --precision high --head-dims 128 \
                --tokens $tokens --config BLOCK_V=32 --config BLOCK_V=64 --config STAGES=2 --config OUTPUT=after \
                --prepare-config INVERSE=blocks --prepare-config PRECISION=tf32 \
                --out "$OUT/delta_$tokens.json" 2>&1 \
                | grep -v "^{" | tail -40
        done
        timeout 150 python3 -m mmrec.bench delta --kernels --no-baselines --precision high --head-dims 128 \
            --tokens 32768 --lengths 32768 --out "$OUT/delta_32k.json" 2>&1 | grep -v "^{" | tail -20 ;;
    host)
        # host time per call of every op the model calls, against its GPU time (the recall issue's 0.1 ms)
        timeout 240 python3 -m mmrec.bench host --out "$OUT/host.json" 2>&1 | tee "$OUT/host.log" | tail -16 ;;
    fla)
        # the delta rule's op (and its launchers alone) against fla 0.6 at the 1b delta layer's heads (16 x 128), T 2K and 32K
        # (TF32, as training runs it; fla autotunes each kernel on its first call: about 4 minutes
        # for both lengths; 2K alone ran past 190 s on an H100). The device has no fla: carry fla-core 0.6.0's wheel in .whl/
        timeout 420 python3 -m mmrec.bench delta --kernels --tokens 32768 --lengths 2048 32768 --head-dims 128 --precision high \
            --out "$OUT/delta_fla.json" 2>&1 | tee "$OUT/delta_fla.log" | grep -v "^{" | tail -44 ;;
    hybrid)
        # what a hybrid stack costs: the delta recurrence in every fourth layer of 1b, with hds
        # beside it and without (memory none), against the plain block (1b-all-parallel) and the
        # Transformer at 2K and 32K (float32 chunk products on TF32, as training runs them); the
        # JSON is written at the end, so the timeout leaves room for all eight rows
        timeout 430 python3 -m mmrec.bench model --recipes docs/results/recipes/1b-all-parallel.json docs/results/recipes/1b-hybrid.json \
            docs/results/recipes/1b-hybrid-nomem.json transformer-1b --lengths 2048 32768 \
            --out "$OUT/model_hybrid.json" 2>&1 | tail -12 ;;
    candidate)
        # the shipped 1b (the hybrid) beside the block before it and the Transformer: training at
        # 2K and 32K, then decode at 1K and 32K context, batch 8
        # (CANDIDATE_RECIPES and DECODE_CONTEXTS change what is run)
        recipes=${CANDIDATE_RECIPES:-1b docs/results/recipes/1b-all-parallel.json transformer-1b}
        timeout 330 python3 -m mmrec.bench model --recipes $recipes --lengths 2048 32768 \
            --out "$OUT/model_candidate.json" 2>&1 | tail -9
        timeout 220 python3 -m mmrec.bench decode --recipes $recipes --contexts ${DECODE_CONTEXTS:-1024 32768} --modes graph \
            --compile ${DECODE_COMPILE:-both} --kv-splits 0 --batches 8 --out "$OUT/decode_candidate.json" 2>&1 \
            | grep -v "^{" | tail -24 ;;
    memory-attention)
        # the memory's attention alone at 1b's shapes (the write's pooling, then the read): which kernel, eager and compiled
        timeout 120 python3 tools/memory_attention_probe.py --backends --parts read write 2>&1 | tee "$OUT/memory_attention.txt" | grep -v "^USDT" ;;
    recall)
        # MQAR L 512, 64 pairs, Zoology's pair mixture: the delta recurrence in both layers, in the
        # first (with hds and without a memory), and the Transformer
        timeout "${RECALL_TIMEOUT:-560}" python3 -m mmrec.bench recall --recipes transformer-tiny \
            docs/results/recipes/tiny-delta.json docs/results/recipes/tiny-hybrid-first-nomem.json \
            docs/results/recipes/tiny-hybrid-first.json --seq-len 512 --pairs 64 --train-pairs 4 8 16 32 64 \
            --steps "${RECALL_STEPS:-2500}" --lrs 1e-3 3e-3 --jobs 8 --eval-every 500 \
            --out "$OUT/recall_hybrid.json" --plot "$OUT/recall_hybrid.png" 2>&1 | grep -v "^{" | tail -14 ;;
    recall-long|intermediates)
        # intermediates: the delta layer's bf16 intermediates (an option) against float32 ones,
        # tiny against tiny-bf16-intermediates, the same way. The rest of that comparison, each a
        # call of its own: 1b's training speed, `candidate` with CANDIDATE_RECIPES="1b
        # docs/results/recipes/1b-bf16-intermediates.json transformer-1b"; the loss, `quality`
        # with QUALITY_RECIPES="tiny docs/results/recipes/tiny-bf16-intermediates.json".
        # recall-long: the long-range form at the task's size (L 4096, 16 pairs, vocabulary 8192, every
        # held-out query 256 tokens or more after its pair), trained 3,000 steps on a mixture
        # of minimum gaps (0, 64, 256): tiny (its delta layer one head of 128 at decay 0.999,
        # the layout that recalled it: docs/benchmarks.md, "The long-range form learned"), the
        # tiny before it (four heads of 32), and the Transformer.
        # Whether a run learns the lookup depends on the seed, so each runs with two seeds;
        # RECALL_SEEDS, RECALL_RECIPES, RECALL_STEPS and RECALL_BATCH change it
        defaults="transformer-tiny tiny docs/results/recipes/tiny-heads32.json"
        [ "$part" = intermediates ] && defaults="tiny docs/results/recipes/tiny-bf16-intermediates.json"
        recipes=(${RECALL_RECIPES:-$defaults})
        seeds=(${RECALL_SEEDS:-0 1})
        timeout "${RECALL_TIMEOUT:-560}" python3 -m mmrec.bench recall --seq-len 4096 --pairs 16 --vocab 8192 \
            --min-gap 256 --train-min-gaps 0 64 256 --recipes "${recipes[@]}" --steps "${RECALL_STEPS:-3000}" \
            --batch "${RECALL_BATCH:-32}" --lrs 1e-3 --jobs $((${#recipes[@]} * ${#seeds[@]})) --compile \
            --eval-every 1000 --eval-examples 512 --seeds "${seeds[@]}" \
            --out "$OUT/recall_long.json" --plot "$OUT/recall_long.png" 2>&1 | grep -v "^{" | grep -v " step " | tail -16 ;;
    scale|seeds)
        # quality at scale: shards of this machine's site-packages (about 45 s), then SCALE_RECIPES
        # (default the hybrid small against transformer-small) side by side on the same batches:
        # two at 50M tokens took 476 s with the shards prepared (2026-12-01), so a call without
        # them is tight; SCALE_TOKENS makes it shorter
        site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        [ -f /tmp/shards/index.json ] || python3 -m mmrec.data.prepare --input "$site" --glob '*.py' --glob '*.pyi' \
            --glob '*.md' --glob '*.rst' --glob '*.txt' --vocab-size 32000 --tokenizer-train-bytes 40000000 \
            --out /tmp/shards --quiet 2>&1 | tail -3
        # seeds: the seeds' ablations of the shipped small, side by side on the same batches at 8M tokens
        # (about 340 s for five; half batches with two accumulation steps, so five fit beside the
        # CUDA tests). Default: small and one seed option a run at small's size; the first set
        # (2026-12-01) was SEEDS_RECIPES="small docs/results/recipes/small-no-planning.json
        # docs/results/recipes/small-no-hem.json docs/results/recipes/small-seed-options.json docs/results/recipes/small-exact.json"
        seeds="small docs/results/recipes/small-gated-integration.json docs/results/recipes/small-pe.json \
            docs/results/recipes/small-own-value.json docs/results/recipes/small-level3.json"
        recipes=${SCALE_RECIPES:-small transformer-small}
        tokens=${SCALE_TOKENS:-50_000_000}; warmup=100; evals=${SCALE_EVALS:-6}; windows=8; batch=()
        if [ "$part" = seeds ]; then
            recipes=${SEEDS_RECIPES:-$seeds}; tokens=${SEEDS_TOKENS:-8_000_000}; warmup=20; evals=5; windows=4
            batch=(--set train.batch_size=16 --set train.grad_accum=2)
        fi
        runs="/tmp/$part-$(date +%s)"  # a fresh folder: a run cut by an earlier call's limit stays where it was
        timeout "${SCALE_TIMEOUT:-540}" python3 -m mmrec.bench scale --data /tmp/shards --tokens "$tokens" \
            --recipes $recipes --runs "$runs" --evals "$evals" --eval-windows $windows \
            --set train.compile=true --set train.warmup_steps=$warmup --set train.sample_tokens=0 ${batch[@]+"${batch[@]}"} \
            --out "$OUT/$part.json" --plot "$OUT/$part.png" 2>&1 | tail -20
        cp "$runs"/*.log "$OUT/" 2>/dev/null ;;
    esac
done
