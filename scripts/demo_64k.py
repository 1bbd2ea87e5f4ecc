"""Needle retrieval at long context with NSA: timing and tokens read per decode step.

    python scripts/demo_64k.py                       # CUDA: contexts up to 65536; CPU: 256..4096 (~3 min)
    python scripts/demo_64k.py --contexts 4096,65536 --train-steps 400

1. Trains a tiny NSA model (seconds to a minute) on a needle task: random filler tokens, somewhere a
   MARK token followed by a key token, and MARK again at the end; the model must emit the key.
2. For each context length: hides the needle at several depths, prefills the context into static
   decode caches, and checks that the next-token prediction after the final MARK is the key; times
   the prefill and that decode step (on CUDA replayed as a CUDA graph, static_decode.GraphedStep:
   the fused decode kernels, no launch overhead), and reports the tokens the step read (compressed +
   selected blocks + window) next to what full attention would read (every token).

The model is tiny and trained briefly (half the steps at length 64, then lengths growing 4x up to
--train-len: CPU 256, CUDA 2048), so retrieval far beyond the training length shows how far its
retrieval extrapolates, not what a trained M7C does. The reads and timings are exact.

Why RoPE base 1e8 and n = 8 (CPU, 300 steps trained to 1024, one run each, 2026-11-27): with the usual
base 1e4 and n = 4 the loss jumped at every length step (0.2 -> 0.9 at 64 -> 256, 1.7 at 1024, no
recovery in 50 steps; on an H100 it was at chance after the 50 steps at 2048, 0/3 needles at 4k-64k);
n = 8 alone made 64 -> 256 seamless but the model still broke at 1024 (loss 1.5 -> 2.1). With base 1e4
most of the 8 rotary frequencies of head dim 16 turn through angles at 1024 that training at 256 never
showed, so content matching across long distances fails; at base 1e8 they are 10^-i per token
(i = 0..7): four turn less than 0.11 rad over 1024 tokens, three less than 0.7 rad over 64k. Both
together: loss 0.004 right after the step to 1024 and 0.002 at the end, 3/3 needles at 1024 and 2/3 at
4096. The default CPU run (trained to 256, 164 s) finds 3/3 at 256 and 1024 and 0/3 at 4096, as it did
before the change: 16x the training length is still too far for this model.

Prints one JSON line per context and a summary table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nsa.attention.static_decode import GraphedStep  # noqa: E402
from nsa.model import build_model  # noqa: E402

VOCAB, MARK, N_KEYS = 64, 1, 16
KEYS = torch.arange(VOCAB - N_KEYS, VOCAB)
# RoPE base 1e8 and 8 selected blocks (5 free besides the forced initial and 2 local ones): with base 1e4
# and 4 blocks the model broke at every length step of the curriculum (see the module docstring)
MODEL = dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden=128,
             rope_theta=1e8, nsa=dict(cmp_block=8, cmp_stride=4, slc_block=8, n_selected=8, window=16))


def needle_batch(n: int, length: int, gen: torch.Generator, depth: float | None = None):
    x = torch.randint(2, VOCAB - N_KEYS, (n, length), generator=gen)
    if depth is None:
        pos = torch.randint(0, length - 2 * MODEL["nsa"]["window"], (n,), generator=gen)
    else:
        pos = torch.full((n,), int(depth * (length - 2 * MODEL["nsa"]["window"])))
    key = KEYS[torch.randint(0, N_KEYS, (n,), generator=gen)]
    rows = torch.arange(n)
    x[rows, pos], x[rows, pos + 1] = MARK, key
    x[:, -1] = MARK
    return x, key


def curriculum(steps: int, length: int, first: int = 64) -> list[int]:
    """Training length per step: half the steps at `first` (where the task is learnt), the rest split
    evenly over lengths growing 4x per stage up to `length`. Trained from scratch at 2048, the model
    never left chance (loss ln 16 = 2.77 for 250 steps on an H100), so retrieval is learnt short."""
    stages = [first]
    while stages[-1] < length:
        stages.append(min(length, stages[-1] * 4))
    if len(stages) == 1:
        return [first] * steps
    head = steps // 2
    per = (steps - head) // (len(stages) - 1)
    plan = [first] * head
    for L in stages[1:]:
        plan += [L] * per
    return plan + [stages[-1]] * (steps - len(plan))


def train(device: str, steps: int, length: int, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(MODEL).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for step, L in enumerate(curriculum(steps, length)):
        x, key = needle_batch(32, L, gen)
        loss = F.cross_entropy(model(x.to(device))[:, -1], key.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # a length step (x4) can make the loss jump (with RoPE base 1e4 it did at every step, see the
        # module docstring); clipping keeps a jump from becoming a blow-up
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 25 == 0:
            print(f"train step {step + 1}/{steps} (length {L}) loss {loss.item():.3f}", file=sys.stderr, flush=True)
    return model.eval()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def probe(model, context: int, depths: list[float], device: str) -> dict:
    """Prefill into static decode caches, then the final MARK as one decode step: on CUDA replayed as a
    CUDA graph (captured first, untimed), so the time is the step's GPU time, not its launches."""
    gen = torch.Generator().manual_seed(context)
    hits, prefill_s, decode_ms = 0, [], []
    for depth in depths:
        x, key = needle_batch(1, context, gen, depth)
        x = x.to(device)
        caches, position = model.new_static_caches(batch=1, capacity=context)
        sync(device)
        t0 = time.perf_counter()
        model.prefill(x[:, :-1], caches)
        sync(device)
        prefill_s.append(time.perf_counter() - t0)
        step = GraphedStep(lambda ids: model.decode_step(ids, caches), x[:, -1], position)
        sync(device)
        t0 = time.perf_counter()
        step_logits = step(x[:, -1])  # the final MARK
        sync(device)
        decode_ms.append((time.perf_counter() - t0) * 1e3)
        hits += int(step_logits.argmax(-1).item() == key.item())
    reads = caches[0].tokens_read
    return {
        "context": context, "retrieved": hits, "trials": len(depths), "depths": depths,
        "prefill_s": round(sum(prefill_s) / len(prefill_s), 3),
        "decode_step_ms": round(sum(decode_ms) / len(decode_ms), 3), "decode_graph": device == "cuda",
        "tokens_read_nsa": reads["total"], "tokens_read_by_branch": {k: v for k, v in reads.items() if k != "total"},
        "tokens_read_full": context, "read_ratio": round(context / reads["total"], 2),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--contexts", default=None, help="comma-separated context lengths")
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--train-len", type=int, default=None, help="default: 2048 on CUDA, 256 on CPU")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    contexts = [int(c) for c in (args.contexts or ("4096,16384,65536" if cuda else "256,1024,4096")).split(",")]
    args.train_len = args.train_len or (2048 if cuda else 256)
    depths = [float(d) for d in args.depths.split(",")]
    t0 = time.perf_counter()
    model = train(args.device, args.train_steps, args.train_len)
    print(f"trained {args.train_steps} steps at length {args.train_len} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    rows = []
    for context in contexts:
        row = probe(model, context, depths, args.device)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'context':>8} {'found':>6} {'prefill s':>10} {'decode ms':>10} {'NSA reads':>10} {'full reads':>11} {'ratio':>6}")
    for r in rows:
        print(f"{r['context']:>8} {r['retrieved']:>3}/{r['trials']:<2} {r['prefill_s']:>10.2f} {r['decode_step_ms']:>10.2f} "
              f"{r['tokens_read_nsa']:>10} {r['tokens_read_full']:>11} {r['read_ratio']:>6.1f}")


if __name__ == "__main__":
    main()
