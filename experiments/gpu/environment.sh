#!/usr/bin/env bash
# run_all.sh's first stage: what the node is. Usage: bash experiments/gpu/environment.sh RUN_DIR
# (PYTHON picks the interpreter; RUN_DIR/nvidia-smi-q.txt gets the full `nvidia-smi -q`).
RUN=${1:?usage: environment.sh RUN_DIR}
PY=${PYTHON:-python3}
nvidia-smi || echo "nvidia-smi: not available"
nvidia-smi -q > "$RUN/nvidia-smi-q.txt" 2>&1 || true
"$PY" - <<'PY'
import platform

import torch
import yaml

from profiler.bench.host import collect_meta

print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
for module in ("simpy", "numpy", "pandas", "yaml", "pytest", "pynvml", "matplotlib", "tqdm", "safetensors"):
    try:
        imported = __import__(module)
        print(module, getattr(imported, "__version__", "?"), getattr(imported, "__file__", ""))
    except ImportError as exc:
        print(module, "MISSING", exc)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print(yaml.safe_dump(collect_meta(device, {}), sort_keys=False))
PY
