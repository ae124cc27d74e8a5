#!/bin/bash
# The GSM8K study (benchmarks/gsm8k_study.py) on a GPU machine reached through short calls that
# each carry at most 64 MiB, as BENCHMARKS.md's sessions run it: the SmolLM2 GGUF (98 MB) goes in
# two halves, the study runs detached under setsid, and each call polls and copies its results
# to $OUT (study.json, the study's log, every generation and child log as gens.tgz).
#
#   here:     benchmarks/gsm8k_study_remote.sh split GGUF DIR1 DIR2   # DIR1/part1, DIR2/part2
#   call 1:   benchmarks/gsm8k_study_remote.sh stage DIR1/part1 GSM8K_DIR
#   call 2:   benchmarks/gsm8k_study_remote.sh start DIR2/part2 SHA256 [POLL_S]   # within the
#             machine's idle release of call 1 (30 s): /tmp holds call 1's files only while warm
#   then:     benchmarks/gsm8k_study_remote.sh poll [POLL_S]   # again, until it prints DONE=yes
#
# STUDY_STEPS (default 1000) and STUDY_EXTRA (more gsm8k_study.py flags) reach every stage.
# Stages, in order of need: both fine-tunes side by side; the batch-1 speed stage alone; AR and
# sub-block-8 evaluations; the zero-shot row and sub-blocks 4, 16, 32. A stage whose results
# exist under /tmp/study is skipped by gsm8k_study.py itself.
set -u
WORK=/tmp/study

stages() {
  cd /tmp/repo || exit 1
  export PYTHONUNBUFFERED=1
  unset OUT  # the call that started us ends; poll copies the results instead
  local s="python3 benchmarks/gsm8k_study.py --data-dir /tmp/gsm8k --work $WORK"
  s+=" --base /tmp/smollm2.gguf --steps ${STUDY_STEPS:-1000} ${STUDY_EXTRA:-}"
  local n=0 rc
  stage() {
    echo "=== $(date -u +%T) stage: $*"
    local t0=$(date +%s)
    $s "$@"; rc=$?
    echo "=== $(date -u +%T) rc=$rc after $(( $(date +%s) - t0 )) s: $*"
    n=$((n + 1))  # keep each stage's child logs: the next stage's children reuse the names
    local f
    for f in "$WORK"/*.log; do
      [ -e "$f" ] || continue
      case "$(basename "$f")" in stage*) ;; *) mv "$f" "$WORK/stage${n}_$(basename "$f")" ;; esac
    done
    return $rc
  }
  stage --stages train --jobs 2 || { touch "$WORK/DONE"; exit 1; }
  stage --stages speed
  stage --stages areval,diffeval --sub-blocks 8 --jobs 2
  stage --stages zeroshot,diffeval --sub-blocks 4,16,32 --jobs 4
  touch "$WORK/DONE"
}

poll() {
  local lim=${1:-560} t0=$(date +%s) out=${OUT:-/tmp/study_out}
  mkdir -p "$out"
  while [ $(( $(date +%s) - t0 )) -lt "$lim" ] && [ ! -e "$WORK/DONE" ]; do sleep 15; done
  local done=no
  [ -e "$WORK/DONE" ] && done=yes
  echo "--- poll after $(( $(date +%s) - t0 )) s; DONE=$done"
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
  cp /tmp/study_log.txt "$out/" 2>/dev/null
  tail -n 40 /tmp/study_log.txt
  cd "$WORK" 2>/dev/null || return 0
  cp study.json "$out/" 2>/dev/null
  for f in *.log; do [ -e "$f" ] && { echo "--- $f"; grep -v '^\s*$' "$f" | tail -n 4; }; done
  tar czf "$out/gens.tgz" ./*.jsonl ./*.log 2>/dev/null
  ls ar diffusion 2>/dev/null | head -12  # checkpoints so far: how far the fine-tunes are
  return 0
}

case "${1:-}" in
  split)
    [ $# -eq 4 ] || { echo "usage: $0 split GGUF DIR1 DIR2" >&2; exit 2; }
    size=$(stat -c %s "$2"); half=$(( (size + 1) / 2 ))
    mkdir -p "$3" "$4"
    head -c "$half" "$2" > "$3/part1" && tail -c +$((half + 1)) "$2" > "$4/part2"
    sha256sum "$2" ;;
  stage)
    [ $# -eq 3 ] || { echo "usage: $0 stage PART1 GSM8K_DIR" >&2; exit 2; }
    mkdir -p /tmp/gsm8k && cp "$2" /tmp/part1 && cp "$3"/train.jsonl "$3"/test.jsonl /tmp/gsm8k/
    nvidia-smi -L 2>/dev/null; ls -l /tmp/part1 /tmp/gsm8k ;;
  start)
    [ $# -ge 3 ] || { echo "usage: $0 start PART2 SHA256 [POLL_S]" >&2; exit 2; }
    cat /tmp/part1 "$2" > /tmp/smollm2.gguf
    echo "$3  /tmp/smollm2.gguf" | sha256sum -c || exit 1
    mkdir -p /tmp/repo "$WORK"
    # The tree without what was carried in for this call (the second half, the wheels).
    tar cf - --exclude=./.whl --exclude="./$(dirname "$2")" . | tar xf - -C /tmp/repo
    python3 -c "import jax, grain, gguf; print(jax.__version__, jax.devices())" || exit 1
    setsid nohup bash /tmp/repo/benchmarks/gsm8k_study_remote.sh stages > /tmp/study_log.txt \
      2>&1 < /dev/null &
    sleep 5
    poll "${4:-560}" ;;
  stages) stages ;;
  poll) poll "${2:-560}" ;;
  *) echo "usage: $0 split|stage|start|poll ... (see the top of this file)" >&2; exit 2 ;;
esac
