#!/usr/bin/env bash
# Byte-parity of two commits: runs the same pipelines with each commit's code, in the same
# folder one after the other (so no path differs), and compares the outputs that must not
# change (both LoRA files, the LLM adapter, every dvclive .tsv and metrics.json,
# reports/health.md). Usage: bench/parity.sh OLD_COMMIT NEW_COMMIT [config...]
# configs: sd (default params), sd-te (text-encoder LoRA, buckets, caption shuffle),
# sdxl (builtin:tiny-sdxl), llm (builtin:tiny-llm on data/example-llm).
# Needs the .venv of this checkout (make setup). Runs without the warm start (LORAPIPE_WARM=0),
# with each clone's own src/ first on PYTHONPATH.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
old="$1"; new="$2"; shift 2
configs=("${@:-sd sd-te sdxl llm}")
configs=(${configs[@]})
work="${PARITY_DIR:-/tmp/lorapipe-parity}"
export PATH="$repo/.venv/bin:$PATH" LORAPIPE_WARM=0 DVC_NO_ANALYTICS=1
settings() {
  case "$1" in
    sd) echo "" ;;
    sd-te) echo "lora.text_encoder=true preprocess.buckets=true train.captions.shuffle=true train.max_steps=120" ;;
    sdxl) echo "model.base=builtin:tiny-sdxl train.learning_rate=3e-3 train.max_steps=120" ;;
    llm) echo "task_type=llm model.base=builtin:tiny-llm data.dir=data/example-llm train.learning_rate=3e-3" ;;
  esac
}
run_one() {  # commit label config
  local run="$work/run"
  rm -rf "$run"; git clone -q "$repo" "$run"; git -C "$run" checkout -q "$1"
  (cd "$run" && python - $(settings "$3") <<'PY'
import sys
from ruamel.yaml import YAML
yaml = YAML(); path = "params.yaml"; doc = yaml.load(open(path))
for item in sys.argv[1:]:
    key, value = item.split("=", 1); *parents, last = key.split(".")
    node = doc
    for p in parents: node = node[p]
    node[last] = yaml.load(value)
yaml.dump(doc, open(path, "w"))
PY
  )
  (cd "$run" && PYTHONPATH="$run/src" dvc repro -q >"$work/$2-$3.log" 2>&1) || { echo "$2 $3 failed: $work/$2-$3.log"; tail -20 "$work/$2-$3.log"; exit 1; }
  local out="$work/$2/$3"; rm -rf "$out"; mkdir -p "$out"
  (cd "$run" && cp -r models reports/health.md "$out/" && mkdir -p "$out/dvclive" &&
     find dvclive \( -name "*.tsv" -o -name metrics.json \) -exec cp --parents {} "$out/" \;)
}
status=0
for config in "${configs[@]}"; do
  run_one "$old" old "$config"
  run_one "$new" new "$config"
  if diff -r "$work/old/$config" "$work/new/$config" >/dev/null; then
    echo "$config: identical ($(find "$work/new/$config" -type f | wc -l) files)"
  else
    echo "$config: DIFFERENT"; diff -rq "$work/old/$config" "$work/new/$config" || true; status=1
  fi
done
exit $status
