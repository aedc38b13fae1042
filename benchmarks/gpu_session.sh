#!/usr/bin/env bash
# The GPU measurements, in stages that each fit one 10-minute call on a lent GPU machine (an H100 here).
#
#   BENCH_COMMIT=<commit> bash benchmarks/gpu_session.sh STAGE [STAGE ...]
#
# (the copy on the GPU machine has no .git: BENCH_COMMIT names the commit in the result files)
# The machine's image has torch, torchvision, Lightning and tensorboard but not kornia or faiss, and nothing can
# be downloaded there: the wheels travel in .whl/ and CIFAR-10 in .carry/cifar10/ (both git-ignored; see the
# device notes in the README's "Speed on an H100"). Each stage writes benchmarks/results/*-cuda*.json and copies
# them to $OUT when that is set (the device tool brings $OUT back). Minutes are measured or estimated on an H100
# (setup ~20 s each call):
#   speed     ~4 min  loop overhead on CUDA, the SimCLR peer rows with 2 and 16 workers (warmup = workers + 2),
#                     MoCo eager with its recipe's 8 batch-norm splits, SGD's multi-tensor step against the fused
#                     one (--no-fused), the kNN search's GPU rows, the contrastive losses' fp32 similarities
#                     against bf16 ones (time and gradient error)
#   audit     ~7 min  step_audit.py: the SimCLR recipe's Lightning step (compiled, eager, with the old blocking
#                     read of the non-finite flag, with CUDA graphs) and MoCo's: ms per step, device busy fraction,
#                     every host sync
#   eager     ~6 min  throughput of every method eager (the README's H100 table), again since the views stopped
#                     waiting for the GPU each step (jitter bounds made once, kornia's blur sigma check and
#                     solarize threshold copy avoided): predicted well above the old eager ratios
#   compiled1 ~7 min  throughput with views + backbone compiled: SimCLR, MoCo, DINO, CPC, CLIP (~80 s each)
#   compiled2 ~9 min  the same for RotNet, Jigsaw, context encoder, colorization; MoCo and DINO with their EMA
#                     copies (key encoder, teacher) left eager, the A/B of compiling them
#   simclr    ~8 min  the SimCLR recipe as written (LARS), 200 epochs, kNN every 10: time to accuracy
#   parity    ~5 min  view_parity.py: resnet18, 30 epochs, toolkit views vs torchvision transforms (16 workers)
#   decay     ~8 min  the SimCLR recipe with lightly's optimizer and weight decay on norms and biases too
#   suspects  ~9 min  accuracy A/B of what still differs from lightly's SimCLR benchmark, five 30-epoch runs at
#                     once (lightly's optimizer in all; their seconds are shared, not speeds): as before (bf16,
#                     BN in the head, no decay on norms/biases, both views in one batch); + decay on norms/biases;
#                     + the v1 head without BN; + each view its own batch (per-view batch-norm statistics); all of
#                     lightly's (fp32, v1 head, decay on everything, per-view batches)
#   reference ~8 min  lightly_reference.py: lightly's own SimCLR benchmark model (its package: CIFAR ResNet, v1 head,
#                     NT-Xent, SimCLRTransform in 12 workers, SGD, fp32), 30 epochs on our CIFAR-10 copy; the same with
#                     the toolkit's GPU views; and with the toolkit's views and backbone (torchvision init, stem ReLU).
#                     Three runs at once (shared GPU: seconds are not speeds); an arm still running at 500 s saves
#                     data/reference-<tag>.pt and the stage run again goes on from there
#   reference200      the reference for all 200 epochs (~25 min at ~7 s an epoch): stops after 510 s and saves
#                     data/reference200.pt; run the stage again, in calls back to back, until its JSON says finished
#   moco      ~9 min  MoCo v2 recipe, 200 epochs (DINO: replace moco by dino; ~2x the step)
#   pretext   ~9 min  the four pretext recipes and SimCLR for 20 epochs each: kNN and linear probe
#                     (issue 4's table)
#   evalprec  ~1 min  eval_precision.py: kNN top-1 of the newest time-to-accuracy checkpoint with features
#                     extracted in fp32 and in bf16 (the evaluators' default on CUDA); simclr runs it itself when its
#                     call has a minute left, else run this right after simclr, moco or dino (same warm machine)
#   node      ~3 min  CPU work on the GPU machine's 16 cores (no GPU needed): decode_workers.py (images/s by
#                     decoding processes; the default takes every core) and folder_memory.py --ranks 8 (8 DDP ranks'
#                     memory with and without data.cache_dir) on CIFAR-10 as 60,000 JPEGs; results *-gpunode.json
#   tests     ~1 min  the tests marked `cuda` (CI has no GPU and skips them): kNN, views and compiled views on the
#                     GPU, the views without a host sync, the non-finite flag without a wait, the online probe's
#                     stream, and DINO's gradient clipping with the fused and multi-tensor optimizers in bf16 and in
#                     fp16 with the scaler
set -uo pipefail
cd "$(dirname "$0")/.."

setup() {
    if ! python3 -c "import kornia, faiss" 2>/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
    export BENCH_COMMIT=${BENCH_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
    [ -f data/cifar10/cifar10.npz ] || python3 .carry/cifar10/unpack.py data/cifar10 || exit 1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi: not a GPU machine"
}

collect() {  # results back through the device tool, and their tables in the call's output
    if [ -n "${OUT:-}" ]; then cp benchmarks/results/*cuda*.json benchmarks/results/*gpunode*.json "$OUT"/ 2>/dev/null; fi
    python3 benchmarks/report.py --device cuda --newer /tmp/stage-start
}

tta() {  # time to accuracy: recipe, tag, then pretrain flags
    local recipe=$1 tag=$2; shift 2
    timeout 570 python3 benchmarks/time_to_accuracy.py --recipe "$recipe" --epochs 200 --knn-every 10 \
        --tag "$tag" -- "$@"
}

LIGHTLY_OPTIM=(--model.init_args.optim.name sgd --model.init_args.optim.lr 0.24
    --model.init_args.optim.weight_decay 5e-4 --model.init_args.optim.warmup_epochs 0
    --model.init_args.proj_hidden_dim 512)  # lightly's CIFAR-10 SimCLR: SGD 0.06 x 512/128, no warmup, 512 head

suspect() {  # one arm of the suspects stage, in the background: tag, then pretrain flags
    local tag=$1; shift
    timeout 560 python3 benchmarks/time_to_accuracy.py --epochs 30 --knn-every 10 --runs "/tmp/runs-$tag" \
        --tag "suspect-$tag" --note "one of the suspects stage's five runs sharing the GPU: seconds are not speeds" \
        -- "${LIGHTLY_OPTIM[@]}" "$@" > "/tmp/suspect-$tag.log" 2>&1 &
}

reference() {  # one lightly_reference.py arm in the background: tag, then its flags
    local tag=$1; shift
    timeout 560 python3 benchmarks/lightly_reference.py --epochs 30 --knn-every 10 --tag "$tag" \
        --max-seconds 500 --state "data/reference-$tag.pt" --note "one of the reference stage's three runs sharing the GPU: seconds are not speeds" "$@" \
        > "/tmp/reference-$tag.log" 2>&1 &
}

evalprec() {  # fp32 against bf16 features, kNN of the newest checkpoint of time_to_accuracy.py: seconds, tag
    timeout "$1" python3 benchmarks/eval_precision.py --latest /tmp/ssl-toolkit-bench --data data/cifar10/cifar10.npz \
        --tag "$2"
}

compiled() {  # one process per method, so a slow compile costs only its own row
    for m in "$@"; do timeout 110 python3 benchmarks/throughput.py --method "$m" --compile views,model --tag compiled; done
}

stage() {
    case $1 in
    speed)
        timeout 60 python3 benchmarks/loop_overhead.py --device cuda
        timeout 90 python3 benchmarks/throughput.py --peer-workers 2 16 --data data/cifar10/cifar10.npz --tag peer
        timeout 60 python3 benchmarks/throughput.py --method moco
        timeout 60 python3 benchmarks/throughput.py --no-fused --tag unfused  # A/B against the default run's rows
        timeout 60 python3 benchmarks/knn.py --repeats 3
        timeout 60 python3 benchmarks/loss_precision.py --device cuda ;;
    audit)
        timeout 150 python3 benchmarks/step_audit.py
        timeout 150 python3 benchmarks/step_audit.py --blocking-check --tag blocking-check
        timeout 60 python3 benchmarks/step_audit.py --no-compile --tag eager
        timeout 150 python3 benchmarks/step_audit.py --recipe recipes/moco/cifar10.yaml
        timeout 150 python3 benchmarks/step_audit.py --compile-mode reduce-overhead --tag cudagraphs ;;
    eager)
        for m in simclr moco dino cpc clip rotation jigsaw inpainting colorization; do
            timeout 60 python3 benchmarks/throughput.py --method "$m"
        done ;;
    compiled1) compiled simclr moco dino cpc clip ;;
    compiled2) compiled rotation jigsaw inpainting colorization
        for m in moco dino; do  # A/B: EMA copies left eager, as before compile_parts
            timeout 110 python3 benchmarks/throughput.py --method "$m" --compile views,online --tag compiled-online
        done ;;
    simclr) tta recipes/simclr/cifar10.yaml recipe
        if [ "$SECONDS" -lt 540 ]; then evalprec 50 simclr; fi ;;  # within the call's 10 minutes
    parity) timeout 570 python3 benchmarks/view_parity.py --epochs 30 --seeds 0 ;;
    decay) tta recipes/simclr/cifar10.yaml lightly-decay-all "${LIGHTLY_OPTIM[@]}" \
        --model.init_args.optim.decay_norm_and_bias true ;;
    suspects)
        suspect base
        suspect decay --model.init_args.optim.decay_norm_and_bias true
        suspect v1head --model.init_args.proj_batch_norm false
        suspect perview --model.init_args.per_view_batch_norm true
        suspect lightly --trainer.precision 32-true --model.init_args.optim.decay_norm_and_bias true \
            --model.init_args.proj_batch_norm false --model.init_args.per_view_batch_norm true
        wait
        tail -n 4 /tmp/suspect-*.log ;;
    reference)
        reference 30ep --workers 12
        reference 30ep-toolkit-views --views toolkit
        reference 30ep-toolkit-views-backbone --views toolkit --backbone toolkit
        wait
        tail -n 3 /tmp/reference-*.log ;;
    reference200) timeout 580 python3 benchmarks/lightly_reference.py --epochs 200 --knn-every 10 --max-seconds 510 \
        --state data/reference200.pt --tag 200ep ;;
    moco) tta recipes/moco/cifar10.yaml recipe ;;
    dino) tta recipes/dino/cifar10.yaml recipe ;;
    pretext)
        for m in simclr rotation jigsaw inpainting colorization; do
            timeout 110 python3 benchmarks/time_to_accuracy.py --recipe recipes/$m/cifar10.yaml \
                --epochs 20 --knn-every 20 --probe --tag 20ep
        done ;;
    evalprec) evalprec 120 latest ;;
    node)
        [ -d data/cifar10-folder ] || python3 .carry/cifar10/unpack.py data/cifar10-folder --imagefolder || exit 1
        timeout 150 python3 benchmarks/decode_workers.py --out benchmarks/results/decode-workers-gpunode.json
        timeout 300 python3 benchmarks/folder_memory.py --ranks 8 --sizes 32 \
            --out benchmarks/results/folder-memory-ranks-gpunode.json ;;
    tests) timeout 300 python3 -m pytest -q -rs -m cuda $(grep -l "mark.cuda" tests/test_*.py) ;;
    *) echo "unknown stage $1 (speed audit eager compiled1 compiled2 simclr parity decay suspects reference reference200 moco dino pretext evalprec tests)" >&2; return 2 ;;
    esac
}

setup
for s in "$@"; do
    touch /tmp/stage-start
    stage "$s"
    collect
done
