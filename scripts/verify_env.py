#!/usr/bin/env python3
"""Bootstrap verification: the venv imports everything, and (with --expect-gpus N > 0) CUDA works.

    python scripts/verify_env.py [--expect-gpus N]

Prints Python/torch/CUDA versions, then for every visible GPU its model, memory (GiB) and compute
capability after a real matmul checked against the CPU result. Exits 1 with one clear line per
problem (CPU-only torch on a GPU node, driver too old for the wheel, a GPU that fails the matmul).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

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
        if torch.version.cuda is None:
            problems.append(f"nvidia-smi shows {a.expect_gpus} GPU(s) but torch {torch.__version__} is a CPU-only build. "
                            "Fix: rm -rf .venv && bash scripts/prime_bootstrap.sh (installs requirements-gpu.txt); "
                            "check that `pip config list` does not point at a CPU-only index")
        elif not torch.cuda.is_available():
            problems.append(f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use the GPU: the NVIDIA driver "
                            "is probably older than that CUDA runtime needs. Fix: compare `nvidia-smi` (CUDA Version) with "
                            "the torch CUDA version; use a node with a newer driver")
        else:
            n = torch.cuda.device_count()
            if n != a.expect_gpus:
                print(f"WARNING: torch sees {n} GPU(s), nvidia-smi {a.expect_gpus} (CUDA_VISIBLE_DEVICES={__import__('os').environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
            print(f"cudnn        : {torch.backends.cudnn.version()}")
            x = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
            ref = x @ x.T
            for i in range(n):
                p = torch.cuda.get_device_properties(i)
                try:
                    t0 = time.perf_counter()
                    d = torch.device("cuda", i)
                    y = x.to(d)
                    got = (y @ y.T).cpu()
                    torch.cuda.synchronize(d)
                    bf = (y.bfloat16() @ y.bfloat16().T).float()
                    torch.cuda.synchronize(d)
                    ok = torch.allclose(got, ref, rtol=1e-3, atol=1e-2) and bool(torch.isfinite(bf).all())
                    ms = (time.perf_counter() - t0) * 1e3
                    print(f"gpu {i}        : {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, "
                          f"fp32+bf16 matmul {'OK' if ok else 'WRONG RESULT'} ({ms:.0f} ms)")
                    if not ok:
                        problems.append(f"GPU {i} ({p.name}) computed a wrong matmul result. Fix: do not train on this node; report it to the provider")
                except Exception as e:  # noqa: BLE001
                    problems.append(f"GPU {i} ({p.name}) failed a matmul: {type(e).__name__}: {e}. Fix: check nvidia-smi for errors (Xid) or use another node")
    else:
        x = torch.randn(256, 256)
        assert torch.isfinite(x @ x).all()
        print("device       : CPU only (no GPU expected); CPU matmul OK")
    for p in problems:
        print(f"ERROR: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
