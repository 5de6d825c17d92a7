#!/bin/bash
# One sitting on a lent GPU machine (the workplace's device tool): install what .devcarry carries
# (benchmarks/gpu_carry.py packs it here), run the GPU tests, then train reproduce-table cells of the cpu
# profile on the GPU, several at a time, for at most CELL_BUDGET_S seconds; finished cells come back in
# $OUT/results.tgz (experiments/results/cpu/... and their fit.log), with the console log and GPU use.
#   SLOTS=12 CELL_BUDGET_S=420 ONLY="--only dataset=kvasir-seg --only labels=0.1" bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu-session-out}; mkdir -p "$OUT"
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}
SLOTS=${SLOTS:-12}
CELL_BUDGET_S=${CELL_BUDGET_S:-420}
ONLY=${ONLY:---only dataset=kvasir-seg --only labels=0.1 --only seed=0 --only part=table}
export PYTHONUNBUFFERED=1 WANDB_MODE=offline LESION_KD_DATA=$PWD/.devcarry/data LESION_KD_CACHE=/tmp/lesion_kd_cache
echo "== setup $(date +%T)"
${PIP:-$PY -m pip} install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .devcarry/whl/*.whl || exit 1
cp -r .devcarry/site/. "$SITE"/
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY benchmarks/gpu_carry.py --restore "$SITE" || exit 1
nvidia-smi -L
$PY -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU')" || exit 1
echo "== GPU tests $(date +%T)"
[ "${GPU_TESTS:-1}" = 0 ] || timeout 120 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_scan_cuda.py tests/test_losses_pckd.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -4
echo "== efficiency $(date +%T)"  # the report's GPU columns: copy $OUT/efficiency_gpu.json to experiments/results/cpu/
[ "${EFFICIENCY:-1}" = 0 ] || timeout 120 $PY -m lesion_kd.reporting.efficiency --out "$OUT"
echo "== cells $(date +%T)"
touch /tmp/cells-start
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 20 > "$OUT/gpu-use.csv" 2>&1 &
SMI=$!
GPUS=$(printf '0,%.0s' $(seq "$SLOTS")); GPUS=${GPUS%,}
# its own process group, so that the budget stops this table's cells and nothing else on the machine
setsid bash -c "$PY -m lesion_kd.cli reproduce-table --profile cpu --gpus $GPUS $ONLY 2>&1 | tee $OUT/reproduce.log" &
RT=$!
for ((i = 0; i < CELL_BUDGET_S; i += 5)); do kill -0 $RT 2>/dev/null || break; sleep 5; done
if kill -0 $RT 2>/dev/null; then echo "== budget of ${CELL_BUDGET_S}s reached: stopping the cells"; kill -TERM -- -$RT; sleep 15; fi
kill $SMI 2>/dev/null
echo "== pack $(date +%T)"
DONE=$(find experiments/results/cpu -name metrics.json -newer /tmp/cells-start -printf '%h\n' | sort)
LOGS=$(for d in $DONE; do c=${d#experiments/results/cpu/}; ls runs/reproduce/cpu/"$c"/fit.log 2>/dev/null; done)
UNFINISHED=$(find runs/reproduce/cpu \( -name fit.log -o -name "events.out.*" -o -name metrics.csv \) -newer /tmp/cells-start | sort)
for d in $DONE; do  # what these cells trained on differs from the dataset: say so beside their metrics
  echo "trained and tested on a lent GPU from .devcarry/data (benchmarks/gpu_carry.py): images at the model size (160x160) re-encoded as JPEG quality 95, masks lossless; LiteMedSAM weights rounded to float16" > "$d/carried_data.txt"
done
# shellcheck disable=SC2086
tar czf "$OUT/results.tgz" $DONE $LOGS $UNFINISHED 2>/dev/null
echo "finished cells: $(echo $DONE | wc -w)"; for d in $DONE; do echo "  $d"; done
