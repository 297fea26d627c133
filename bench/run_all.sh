#!/usr/bin/env bash
# The whole bench set in one call, for the day a GPU is at hand: every published configuration of
# issue 16's list (REPA-E step, SiT / LightningDiT / DiT^DH stage 2, RAE / VA-VAE / VQGAN stage 1,
# ODE-50 + CFG and SDE-250 sampling), each plain and with the options that trade memory or launch
# overhead for speed. Every JSON line a bench prints (machine, commit and date included) is
# appended to one results file; a bench that fails is reported and the set goes on.
#
#   bash bench/run_all.sh                    # everything -> bench/results/<device>_<date>.jsonl
#   bash bench/run_all.sh sample train-ldm   # some groups only: train-repae train-ldm train-stage1 sample
#   OUT=my.jsonl STEPS=10 bash bench/run_all.sh
#
# Without CUDA the benches run their tiny configurations (machine-independent counts only).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[[ -x $PY ]] || PY=python
STEPS=${STEPS:-10}
device=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-') if torch.cuda.is_available() else 'cpu')")
cuda=$([[ $device == cpu ]] && echo 0 || echo 1)
OUT=${OUT:-bench/results/${device}_$(date -u +%Y%m%d).jsonl}
mkdir -p "$(dirname "$OUT")"
groups=("$@")
((${#groups[@]})) || groups=(train-repae train-ldm train-stage1 sample)
failed=()

run() {  # run BENCH ARGS...: the bench's JSON lines go to $OUT (and the terminal), its log to stderr
    echo "== $*" >&2
    if ! "$PY" "$@" --steps "$STEPS" | tee >(grep --line-buffered '^{"bench"' >>"$OUT"); then
        failed+=("$*")
    fi
}

gpu_run() {  # compiled variants: on CPU inductor's compile time (minutes) would be all they measure
    if ((cuda)); then run "$@"; else echo "== skipped without CUDA: $*" >&2; fi
}

for g in "${groups[@]}"; do
    case $g in
        train-repae)
            run bench/train_repae_step.py
            gpu_run bench/train_repae_step.py --compile
            run bench/train_repae_step.py --grad-checkpointing sit,vae,lpips ;;
        train-ldm)
            for m in SiT-XL/2 LightningDiT-XL/1 DiTDH-XL; do
                run bench/train_ldm_step.py --model "$m"
                gpu_run bench/train_ldm_step.py --model "$m" --compile
            done ;;
        train-stage1)
            run bench/train_stage1_step.py --recipe all
            run bench/train_stage1_step.py --recipe rae-xl --grad-checkpointing --lpips-grad-checkpointing ;;
        sample)
            for m in SiT-XL/2 LightningDiT-XL/1 DiTDH-XL; do
                run bench/sample.py --model "$m"
                gpu_run bench/sample.py --model "$m" --compile-mode reduce-overhead
            done
            run bench/sample.py --model SiT-XL/2 --recipe repae-ode-50 --decode-precision bf16
            run bench/sample.py --model SiT-XL/2 --recipe repae-ode-50 --output inline
            run bench/sample.py --model SiT-XL/2 --recipe repae-ode-50 --output writer --stream-eval ;;
        *) echo "unknown group $g (train-repae train-ldm train-stage1 sample)" >&2; exit 2 ;;
    esac
done
echo "results: $OUT" >&2
if ((${#failed[@]})); then
    printf 'failed: %s\n' "${failed[@]}" >&2
    exit 1
fi
