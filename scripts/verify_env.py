#!/usr/bin/env python3
"""Bootstrap verification: the venv imports everything, and (with --expect-gpus N > 0) CUDA works.

    python scripts/verify_env.py [--expect-gpus N]

Prints Python/torch/CUDA versions, then for every visible GPU its model, memory (GiB) and compute
capability after a real matmul checked against the CPU result (`nsa.hardware.check_gpus`, which
`python -m nsa.preflight` runs too). Exits 1 with one clear line per
problem (CPU-only torch on a GPU node, driver too old for the wheel, a GPU that fails the matmul).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: import nsa/

# module -> pip distribution (for the fix message)
REQUIRED = {
    "numpy": "numpy", "yaml": "pyyaml", "safetensors": "safetensors", "tokenizers": "tokenizers",
    "transformers": "transformers", "datasets": "datasets", "tensorboard": "tensorboard",
    "matplotlib": "matplotlib",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--expect-gpus", type=int, default=0, help="GPUs nvidia-smi reported (0: CPU node)")
    a = ap.parse_args(argv)
    problems: list[str] = []
    print(f"python       : {sys.version.split()[0]} ({sys.executable})")
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure is the same problem for the user
        print(f"ERROR: torch does not import ({e}). Fix: rm -rf .venv && bash scripts/prime_bootstrap.sh")
        return 1
    print(f"torch        : {torch.__version__} (built for CUDA {torch.version.cuda or 'none: CPU build'})")
    for mod, dist in REQUIRED.items():
        t0 = time.perf_counter()
        try:
            m = importlib.import_module(mod)
            print(f"{mod:<13}: {getattr(m, '__version__', '?')} ({time.perf_counter() - t0:.1f} s import)")
        except Exception as e:  # noqa: BLE001
            problems.append(f"{mod} does not import ({type(e).__name__}: {e}). Fix: .venv/bin/pip install {dist} "
                            "with the version pinned in the requirements file")
    if a.expect_gpus > 0:
        from nsa.hardware import check_gpus  # the same check nsa/preflight.py runs before every training run

        lines, gpu_problems = check_gpus(a.expect_gpus)
        for line in lines:
            label, _, text = line.partition(": ")
            print(f"WARNING: {text}" if label == "warning" else f"{label:<13}: {text}")
        problems += gpu_problems
    else:
        x = torch.randn(256, 256)
        assert torch.isfinite(x @ x).all()
        print("device       : CPU only (no GPU expected); CPU matmul OK")
    for p in problems:
        print(f"ERROR: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
