#!/usr/bin/env bash
# GPU check: everything this project could not test without a GPU, in one go (at most 8 minutes):
#
#     make gpu-check                 # or: bash tools/gpu_check.sh
#
# For the project's first GPU machine (one NVIDIA GPU, no internet, torch preinstalled). Bring along the Detectron2
# wheel of `python tools/install_detectron2.py` (build/wheels/detectron2-*.whl) and the wheels of
# your folder of wheels (GPU_CHECK_WHEELS=DIR); the `setup` check installs them into output/gpu_check/site.
# `bash tools/gpu_check.sh --prepare-carry` (on this side) copies the wheels, the ACDC slices and two MoNuSeg tiles
# into build/device-wheels and build/shared-data (git-ignored, ~40 MiB): carry build/wheels, build/device-wheels,
# build/shared-data and pretrained (the ImageNet MobileNetV2 of `make setup`, 7 MiB) to the GPU machine and run
# `make gpu-check` there.
# Prints one line per check, `PASS name`, `FAIL name (reason)` or `SKIP name (reason)` (data not there, or a check it
# needs failed), keeps each check's log in output/gpu_check/logs/ and writes output/gpu_check/summary.json (schema
# mmt_psm.gpu_check/1: checks with status, reason, seconds, log, command; benchmark numbers; environment). Every
# check runs under `timeout` (its own limit, cut to what is left of the 480 s budget); the script goes on after a
# failure and exits 1 if any check failed.
#
#   --dry-run | GPU_CHECK_DRY_RUN=1   list the checks and validate every command (paths, options, pytest ids, config
#                                     keys and values), run nothing
#   GPU_CHECK_ONLY=a,b                run only these checks          GPU_CHECK_BUDGET_S=480   total time budget
#   GPU_CHECK_STUB=true|false         every command replaced by `true`/`false` (GPU_CHECK_STUB_FAIL=a,b: those
#                                     `false`, the rest `true`): tests the bookkeeping and summary
#   GPU_CHECK_DEVICE=cuda  GPU_CHECK_TRAIN_OPTS="KEY VALUE ..."   (device; extra overrides of every Mask R-CNN training
#                                     and benchmark run, e.g. a smaller model for a CPU smoke run of the script)
#   GPU_CHECK_OUT=output/gpu_check  PYTHON=python3  GPU_CHECK_DATA=DIR (the real annotated data; default
#                                     shared/data or build/shared-data inside the repository)
set -u
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
STUB=${GPU_CHECK_STUB:-}
STUB_FAIL=",${GPU_CHECK_STUB_FAIL:-},"
ONLY=${GPU_CHECK_ONLY:-}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
first_dir() { for d in "$@"; do [ -d "$d" ] && { echo "$d"; return; }; done; echo "$1"; }
export PY=${PYTHON:-python3}
export OUT=${GPU_CHECK_OUT:-output/gpu_check}
export DEV=${GPU_CHECK_DEVICE:-cuda}
export TRAIN_OPTS=${GPU_CHECK_TRAIN_OPTS:-}
export WHEELS=${GPU_CHECK_WHEELS:-$(first_dir shared/device-wheels build/device-wheels)}
export SHARED_DATA=${GPU_CHECK_DATA:-$(first_dir shared/data build/shared-data)}

if [ "${1:-}" = "--prepare-carry" ]; then  # with GPU_CHECK_WHEELS / GPU_CHECK_DATA set: what the GPU machine needs, git-ignored
  set -e
  mkdir -p build/device-wheels build/shared-data/cardiac build/shared-data/nuclei/monuseg/train/images
  cp "$WHEELS"/*.whl build/device-wheels/
  rm -rf build/shared-data/cardiac/acdc_slices
  cp -r "$SHARED_DATA/cardiac/acdc_slices" build/shared-data/cardiac/
  for f in $(ls "$SHARED_DATA"/nuclei/monuseg/train/images/* | head -2); do cp "$f" build/shared-data/nuclei/monuseg/train/images/; done
  ls build/wheels/detectron2-*.whl 2>/dev/null || echo "no build/wheels/detectron2-*.whl yet: python tools/install_detectron2.py --route sdist --force writes it"
  du -sh build/wheels build/device-wheels build/shared-data 2>/dev/null
  echo "carry: build/wheels build/device-wheels build/shared-data pretrained; then on the GPU machine: make gpu-check"
  exit 0
fi
case $OUT in /*) SITE=$OUT/site ;; *) SITE=$REPO/$OUT/site ;; esac
export SITE
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

# ------------------------------------------------------------------ the checks
# add NAME TIMEOUT_S MODE DEPS 'COMMAND': MODE seq (one at a time, in order) or bg (started in the background at its
# place in the list, running beside the seq checks after it, reported at the end); DEPS: checks that must pass first
# (else SKIP). The timed benchmarks come before any bg check. Commands are run by `bash -c` with the variables above
# exported; values with shell characters go through variables (an unquoted $X expands to its words).
NAMES=(); TIMEOUTS=(); MODES=(); DEPS=(); CMDS=()
add() { NAMES+=("$1"); TIMEOUTS+=("$2"); MODES+=("$3"); DEPS+=("$4"); CMDS+=("$5"); }

# synthetic data for the paper config: 50 iterations, 2 + 2 images per step (AMP on, as in the config), burn-in 20
export E2E_OPTS="MODEL.DEVICE $DEV DATASETS.TRAIN (\"synthetic_train\",) DATASETS.TRAIN_UNLABELED (\"synthetic_unlabeled\",) \
DATASETS.TEST () DATASETS.SPLIT_FILE \"\" SOLVER.STEPS (40,) SOLVER.WARMUP_ITERS 10 SOLVER.CHECKPOINT_PERIOD 50 \
SEMI.BURN_IN_ITERS 20 SEMI.EMA_START_ITER 15 SEMI.RAMP_UP_ITERS 10 SEMI.RAMP_DOWN_ITERS 5 SEMI.VIS_PERIOD 0 \
TEST.EVAL_PERIOD 0 OUTPUT_DIR $OUT/e2e $TRAIN_OPTS"
export EVAL_OPTS="DATASETS.TEST (\"synthetic_test\",) MODEL.WEIGHTS $OUT/e2e/model_final.pth OUTPUT_DIR $OUT/e2e_eval"
# the benchmark: real (synthetic) images through the training mappers, so the data-time share is measured too
export BENCH="--device $DEV --dataset synthetic_train --iters 8 --warmup 2 --json"
export ACDC_SRC="$SHARED_DATA/cardiac/acdc_slices"
export NEED_ACDC="test -f datasets/cardiac/acdc/index.json"
export SEM_OPTS="MODEL.DEVICE $DEV SOLVER.MAX_ITER 20 SOLVER.WARMUP_ITERS 5 SOLVER.CHECKPOINT_PERIOD 1000 \
TEST.EVAL_PERIOD 0 DATALOADER.NUM_WORKERS 2 $TRAIN_OPTS"
export NO_TEST="DATASETS.TEST ()"
export PSM_IMAGES="$SHARED_DATA/nuclei/monuseg/train/images"
CUDA_TESTS="tests/core/test_cuda.py"
# MMT_PSM_REQUIRE_CUDA=1: the CUDA tests fail (instead of skipping) where torch sees no GPU
PYTEST='MMT_PSM_REQUIRE_CUDA=1 $PY -m pytest -q -p no:cacheprovider -rfEs -m cuda'

add setup 240 seq "" '$PY tools/gpu_check_steps.py setup --site $SITE --wheels $WHEELS --d2-wheels build/wheels'
add data_synthetic 90 seq "" '$PY datasets/prepare_synthetic.py'
add cuda_ema_amp 120 seq "" "$PYTEST $CUDA_TESTS::test_ema_teacher_stays_fp32_and_finite_under_amp"
add cuda_mmt_psm_fp16 120 seq "" "$PYTEST $CUDA_TESTS::test_mmt_psm_step_under_fp16_autocast"
add cuda_semantic_amp 120 seq "" "$PYTEST $CUDA_TESTS::test_semantic_unet_steps_under_autocast"
add cuda_psm_stage1 90 seq "" "$PYTEST $CUDA_TESTS::test_psm_stage1_trains_on_the_gpu"
for cfg in paper:mmt_psm_R50 plus:mmt_psm_plus_R50; do
  add "bench_${cfg%%:*}_fp32" 150 seq data_synthetic \
    "\$PY tools/benchmark.py --config-file configs/${cfg#*:}.yaml \$BENCH --profile \$TRAIN_OPTS > \$OUT/bench/bench_${cfg%%:*}_fp32.json"
  add "bench_${cfg%%:*}_amp" 150 seq data_synthetic \
    "\$PY tools/benchmark.py --config-file configs/${cfg#*:}.yaml \$BENCH --amp \$TRAIN_OPTS > \$OUT/bench/bench_${cfg%%:*}_amp.json"
done
add data_acdc 90 seq "" \
  'test -d $ACDC_SRC || { echo "no ACDC slices at $ACDC_SRC (GPU_CHECK_DATA=DIR: DIR/cardiac/acdc_slices)"; exit 77; }; $PY datasets/prepare_acdc.py --source $ACDC_SRC'
for c in supervised_p3 supervised_all scribble_only mixed_supervision mean_teacher lcc_mean_teacher lcc_plus; do
  tests='$NO_TEST'; [ $c = supervised_p3 ] && tests=""  # one run evaluates (acdc_test, volume metrics) on the GPU
  add "acdc_$c" 180 bg data_acdc \
    "\$NEED_ACDC || { echo 'no ACDC data (data_acdc skipped)'; exit 77; }; \$PY tools/train_net.py --config-file configs/acdc/$c.yaml \$SEM_OPTS $tests OUTPUT_DIR \$OUT/acdc/$c"
done
add psm_stage1_cuda 150 bg "" \
  'test -d $PSM_IMAGES || { echo "no MoNuSeg tiles at $PSM_IMAGES"; exit 77; }; test -f pretrained/mobilenet_v2_imagenet.pth || { echo "no pretrained/mobilenet_v2_imagenet.pth (configs/psm/ trains the ImageNet encoder): carry pretrained"; exit 77; }; rm -rf $OUT/psm && $PY tools/psm_stage.py activation --images $PSM_IMAGES --labels $OUT/psm/labels --config-file configs/psm/Base-PSM-UNet.yaml MODEL.DEVICE $DEV PSM.SELF_SUP.ITERS 100'

# while the bg checks above run (not timed), the Mask R-CNN runs
add e2e_train_50 180 seq data_synthetic \
  '$PY tools/train_net.py --config-file configs/mmt_psm_R50.yaml $E2E_OPTS SOLVER.MAX_ITER 50'
add e2e_resume_60 120 seq e2e_train_50 \
  '$PY tools/train_net.py --config-file configs/mmt_psm_R50.yaml --resume $E2E_OPTS SOLVER.MAX_ITER 60'
add e2e_eval_only 150 seq e2e_resume_60 \
  '$PY tools/train_net.py --config-file configs/mmt_psm_R50.yaml --eval-only $E2E_OPTS SOLVER.MAX_ITER 60 $EVAL_OPTS && $PY tools/gpu_check_steps.py expect-keys $OUT/e2e_eval/eval_results.json segm/AP segm_student/AP bbox/AP bbox_student/AP --allow-nan'
add e2e_export_predictor 90 seq e2e_resume_60 \
  '$PY tools/export_teacher.py $OUT/e2e && $PY tools/gpu_check_steps.py predict --config-file $OUT/e2e/config_teacher.yaml --image datasets/synthetic/images/test_0.png --device $DEV'
add ddp_gloo_2proc 150 seq data_synthetic '$PY tools/gpu_check_steps.py ddp --output $OUT/ddp --device $DEV --timeout 140'

# ------------------------------------------------------------------ bookkeeping
MODE=run
[ -n "$STUB" ] && MODE=stub-$STUB
mkdir -p "$OUT/logs" "$OUT/bench"
RESULTS=$OUT/results.tsv
START=$(date +%s)
STARTED=$(date +%Y-%m-%dT%H:%M:%S%z)
DEADLINE=$((START + BUDGET))
declare -A STATUS=()

selected() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

if [ "$DRY_RUN" = 1 ]; then
  PLAN=$OUT/plan.tsv
  : > "$PLAN"
  for i in "${!NAMES[@]}"; do
    selected "${NAMES[$i]}" || continue
    echo "CHECK ${NAMES[$i]} (timeout ${TIMEOUTS[$i]} s, ${MODES[$i]}${DEPS[$i]:+, after ${DEPS[$i]}}): ${CMDS[$i]}"
    printf '%s\t%s\t%s\t%s\t%s\n' "${NAMES[$i]}" "${TIMEOUTS[$i]}" "${MODES[$i]}" "${DEPS[$i]}" "${CMDS[$i]}" >> "$PLAN"
  done
  "$PY" tools/gpu_check_steps.py validate --plan "$PLAN" --produced "$OUT" datasets/synthetic datasets/cardiac \
    --python-names "$(basename "$PY")" python python3
  exit $?
fi

: > "$RESULTS"
record() {  # name status rc seconds reason log command
  local reason=${5//$'\t'/ }
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${reason//$'\n'/ }" "$6" "${7//$'\t'/ }" >> "$RESULTS"
  STATUS[$1]=$2
  case $2 in
    pass) echo "PASS $1" ;;
    fail) echo "FAIL $1 ($5)" ;;
    skip) echo "SKIP $1 ($5)" ;;
  esac
}

last_line() { grep -v '^\s*$' "$1" 2>/dev/null | tail -n 1 | cut -c1-240; }

# start check i in the background; its exit code lands in $OUT/logs/<name>.rc
PENDING=()
start() {
  local i=$1 name=${NAMES[$1]} cmd=${CMDS[$1]} left t
  local log=$OUT/logs/$name.log
  for d in ${DEPS[$i]//,/ }; do
    if [ "${STATUS[$d]:-}" != pass ] && { [ -z "$ONLY" ] || selected "$d"; }; then
      record "$name" skip 0 0 "needs $d, which did not pass" "$log" "$cmd"
      return
    fi
  done
  left=$((DEADLINE - $(date +%s)))
  t=${TIMEOUTS[$i]}
  [ "$left" -lt "$t" ] && t=$left
  if [ "$t" -lt 5 ]; then
    record "$name" fail 124 0 "not started: the ${BUDGET} s budget is spent" "$log" "$cmd"
    return
  fi
  if [ -n "$STUB" ]; then
    cmd=$STUB
    [[ "$STUB_FAIL" == *",$name,"* ]] && cmd=false
  fi
  echo "$t" > "$OUT/logs/$name.limit"
  date +%s > "$OUT/logs/$name.start"
  ( timeout --kill-after=10 "$t" bash -c "$cmd" > "$log" 2>&1; echo $? > "$OUT/logs/$name.rc" ) &
  PENDING+=("$i:$!")
}

finish() {  # wait for one started check ("index:pid") and record it
  local i=${1%%:*} pid=${1#*:} name rc t secs reason last
  name=${NAMES[$i]}
  wait "$pid"
  rc=$(cat "$OUT/logs/$name.rc" 2>/dev/null || echo 1)
  t=$(cat "$OUT/logs/$name.limit")
  secs=$(( $(date +%s) - $(cat "$OUT/logs/$name.start") ))
  if [ "$rc" = 0 ]; then
    record "$name" pass 0 "$secs" "$(last_line "$OUT/logs/$name.log")" "$OUT/logs/$name.log" "${CMDS[$i]}"
  elif [ "$rc" = 77 ]; then
    record "$name" skip 77 "$secs" "$(last_line "$OUT/logs/$name.log")" "$OUT/logs/$name.log" "${CMDS[$i]}"
  else
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then reason="timeout after $t s"; else reason="exit $rc"; fi
    last=$(last_line "$OUT/logs/$name.log")
    record "$name" fail "$rc" "$secs" "$reason${last:+: $last}" "$OUT/logs/$name.log" "${CMDS[$i]}"
  fi
}

BG=()
for i in "${!NAMES[@]}"; do
  selected "${NAMES[$i]}" || continue
  PENDING=()
  start "$i"
  [ ${#PENDING[@]} -eq 0 ] && continue  # recorded already (skipped, or no time left)
  if [ "${MODES[$i]}" = seq ]; then finish "${PENDING[0]}"; else BG+=("${PENDING[0]}"); fi
done
for entry in ${BG[@]+"${BG[@]}"}; do finish "$entry"; done

"$PY" tools/gpu_check_steps.py summary --results "$RESULTS" --output "$OUT/summary.json" --bench-dir "$OUT/bench" \
  --env "$OUT/env.json" --mode "$MODE" --started "$STARTED" --wall-s "$(( $(date +%s) - START ))" \
  --budget-s "$BUDGET" || echo "FAIL summary (could not write $OUT/summary.json)"
for s in ${STATUS[@]+"${STATUS[@]}"}; do [ "$s" = fail ] && exit 1; done
[ -f "$OUT/summary.json" ] || exit 1
exit 0
