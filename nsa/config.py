"""Configuration schema: typed dataclasses, one comment per field. The only place defaults live.

`model:` section -> `ModelConfig` (with `nsa:` -> `NSAConfig`). `ModelConfig.from_dict` accepts the
plain dict parsed from YAML and rejects unknown keys and wrong types with a `UserError`.

The trainer's sections are `data:` -> `DataConfig`, `train:` -> `TrainConfig`, `runtime:` -> `RuntimeConfig`,
all under `Config`. `load_config(path, ["train.lr=3e-4", ...])` reads the YAML, applies dotted overrides
(values parsed as YAML scalars), builds the dataclasses (unknown keys / wrong types fail) and runs the
cross-section checks (`Config.validate`); `Config.resolve_accumulation(world_size)` checks that the global
batch splits evenly across ranks; `save_config` writes the resolved config next to the run's outputs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from nsa.errors import UserError


def _check_type(where: str, value: Any, typ: Any) -> Any:
    """Validate (and gently coerce int->float) one scalar field; raise UserError on mismatch."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" as a string; accept numeric strings for floats only
            return float(value)
        except ValueError:
            pass
    ok = isinstance(value, typ) and not (typ in (int, float) and isinstance(value, bool))
    if not ok:
        raise UserError(
            f"config key '{where}' must be of type {typ.__name__}, got {type(value).__name__} "
            f"({value!r}). Fix the value in your YAML or override."
        )
    return value


def dataclass_from_dict(cls, data: dict | None, prefix: str):
    """Build dataclass `cls` from `data`, recursing into nested dataclass fields.

    Unknown keys fail (a silently ignored key once cost a 24-hour run on a toy config)."""
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data):
        return data
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix}' must be a mapping, got {type(data).__name__}.")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(
            f"unknown config key(s) {', '.join(prefix + '.' + k for k in unknown)}. "
            f"Valid keys in '{prefix}': {', '.join(sorted(names))}. Check the spelling."
        )
    kwargs = {}
    for name, value in data.items():
        typ = hints[name]
        where = f"{prefix}.{name}"
        if dataclasses.is_dataclass(typ):
            kwargs[name] = dataclass_from_dict(typ, value, where)
        elif value is None and "None" in str(typ):
            kwargs[name] = None
        else:
            base = typ
            if "|" in str(typ) or "Optional" in str(typ):  # e.g. `int | None`
                base = next(a for a in typ.__args__ if a is not type(None))
            kwargs[name] = _check_type(where, value, base)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(prefix)
    return obj


@dataclass
class NSAConfig:
    """Native Sparse Attention hyperparameters (arXiv 2502.11089, paper defaults)."""

    cmp_block: int = 32  # l: tokens per compressed block
    cmp_stride: int = 16  # d: stride between compressed blocks (d <= l; d < l overlaps)
    slc_block: int = 64  # l': tokens per selection block
    n_selected: int = 16  # n: selected blocks per query, incl. the initial and 2 local blocks
    window: int = 512  # w: sliding-window length in tokens (incl. the query token)
    compress: str = "mlp"  # phi: "mlp" (learnable, intra-block position encoding) or "mean"
    compress_hidden: int = 0  # hidden width of the phi MLP; 0 -> 2 * head_dim
    gate_hidden: int = 0  # hidden width of the gate MLP; 0 -> dim // 4
    query_chunk: int = 0  # queries processed together in the PyTorch path; 0 -> automatic
    branches: str = "cmp,slc,win"  # enabled branches, for ablations (e.g. "win" = window only)
    impl: str = "auto"  # kernels: "auto" (Triton on CUDA when importable, else PyTorch) | "torch" | "triton"

    def validate(self, prefix: str = "model.nsa") -> None:
        for key in ("cmp_block", "cmp_stride", "slc_block", "n_selected", "window"):
            if getattr(self, key) < 1:
                raise UserError(f"'{prefix}.{key}' must be >= 1, got {getattr(self, key)}.")
        if self.cmp_stride > self.cmp_block:
            raise UserError(
                f"'{prefix}.cmp_stride' ({self.cmp_stride}) must be <= '{prefix}.cmp_block' "
                f"({self.cmp_block}); otherwise tokens fall between compressed blocks."
            )
        if self.n_selected < 3:
            raise UserError(
                f"'{prefix}.n_selected' must be >= 3 (the initial block and 2 local blocks are "
                f"always selected), got {self.n_selected}."
            )
        if self.compress not in ("mlp", "mean"):
            raise UserError(f"'{prefix}.compress' must be 'mlp' or 'mean', got {self.compress!r}.")
        if self.impl not in ("auto", "torch", "triton"):
            raise UserError(f"'{prefix}.impl' must be auto, torch or triton, got {self.impl!r}.")
        parts = [b.strip() for b in self.branches.split(",") if b.strip()]
        if not parts or any(b not in ("cmp", "slc", "win") for b in parts) or len(set(parts)) != len(parts):
            raise UserError(
                f"'{prefix}.branches' must be a comma-separated subset of cmp,slc,win, got {self.branches!r}."
            )


@dataclass
class ModelConfig:
    """M7C: a LLaMA-style decoder (RMSNorm, RoPE, SwiGLU, tied embeddings) with NSA or full attention."""

    vocab_size: int = 50257  # tokenizer vocabulary (GPT-2 BPE); padded internally to a multiple of 64
    dim: int = 768  # residual stream width
    n_layers: int = 12  # decoder blocks
    n_heads: int = 12  # query heads
    n_kv_heads: int = 2  # key/value heads (GQA groups); must divide n_heads
    head_dim: int = 64  # per-head width; n_heads * head_dim need not equal dim
    ffn_hidden: int = 2048  # SwiGLU hidden width (8/3 * dim, rounded)
    attention: str = "nsa"  # "nsa" or "full" (causal SDPA, the dense baseline)
    max_seq_len: int = 4096  # longest sequence the RoPE tables are built for (grown on demand)
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    init_std: float = 0.02  # std of normal weight init
    tie_embeddings: bool = True  # share input embedding and output head
    activation_checkpointing: bool = False  # recompute each block in backward to save memory
    nsa: NSAConfig = field(default_factory=NSAConfig)  # NSA hyperparameters (used when attention=nsa)

    @classmethod
    def from_dict(cls, data: dict | "ModelConfig" | None) -> "ModelConfig":
        if isinstance(data, ModelConfig):
            return data
        return dataclass_from_dict(cls, data, "model")

    @property
    def padded_vocab_size(self) -> int:
        return (self.vocab_size + 63) // 64 * 64

    def validate(self, prefix: str = "model") -> None:
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden"):
            if getattr(self, key) < 1:
                raise UserError(f"'{prefix}.{key}' must be >= 1, got {getattr(self, key)}.")
        if self.n_heads % self.n_kv_heads != 0:
            raise UserError(
                f"'{prefix}.n_heads' ({self.n_heads}) must be divisible by '{prefix}.n_kv_heads' "
                f"({self.n_kv_heads}) for grouped-query attention; pick a divisor."
            )
        if self.attention not in ("nsa", "full"):
            raise UserError(f"'{prefix}.attention' must be 'nsa' or 'full', got {self.attention!r}.")
        if self.head_dim % 2:
            raise UserError(f"'{prefix}.head_dim' must be even for RoPE, got {self.head_dim}.")
        self.nsa.validate(prefix + ".nsa")


# ---------------------------------------------------------------------------------------------------
# Trainer sections: data, train, runtime, and the top-level Config that ties them to `model`.
# ---------------------------------------------------------------------------------------------------

DATASET_KINDS = ("fineweb_edu", "synthetic", "embedded")  # plus "local:<path>"
SECTIONS = ("model", "data", "train", "runtime")


@dataclass
class DataConfig:
    """Where tokens come from. See nsa/data.py for each source."""

    dataset: str = "embedded"  # fineweb_edu | local:<path> | synthetic | embedded (offline stdlib corpus)
    subset: str = "sample-10BT"  # FineWeb-Edu config name (HF `name=`)
    hf_path: str = "HuggingFaceFW/fineweb-edu"  # HF dataset repo streamed when dataset=fineweb_edu
    text_field: str = "text"  # column holding the document text (fineweb_edu, local:)
    tokenizer: str = "gpt2"  # HF tokenizer name; GPT-2 BPE is loaded offline when the hub is unreachable
    val_fraction: float = 0.01  # share of documents held out for validation (by content hash, never trained on)
    val_min_docs: int = 8  # validation set needs at least this many documents; fail clearly otherwise
    docs_per_chunk: int = 64  # documents tokenized together (one fast-tokenizer batch call)
    prefetch_batches: int = 8  # micro-batches prepared ahead by the background thread
    max_retries: int = 5  # transient stream errors retried this many times (exponential backoff) ...
    retry_backoff_s: float = 2.0  # ... starting at this delay, doubling each time
    hub_timeout_s: float = 10.0  # give up on the HF hub after this long and use offline files
    hf_token_required: bool = False  # gated/private hub dataset: pre-flight fails unless a Hugging Face token is set
    synthetic_vocab: int = 512  # synthetic tokens are drawn from [0, synthetic_vocab) so loss can fall
    embedded_max_docs: int = 20000  # cap on stdlib-docstring documents in the embedded corpus

    def validate(self, prefix: str = "data") -> None:
        d = self.dataset
        if not (d in DATASET_KINDS or d.startswith("local:")):
            raise UserError(
                f"'{prefix}.dataset' is {d!r}; use one of fineweb_edu, synthetic, embedded or "
                f"local:<path to .jsonl/.txt/.parquet file or folder>."
            )
        if d.startswith("local:") and not d[len("local:"):]:
            raise UserError(f"'{prefix}.dataset' local: needs a path, e.g. local:data/train.jsonl.")
        if not 0.0 < self.val_fraction < 0.5:
            raise UserError(f"'{prefix}.val_fraction' must be in (0, 0.5), got {self.val_fraction}.")
        for key in ("docs_per_chunk", "prefetch_batches", "synthetic_vocab", "embedded_max_docs", "val_min_docs"):
            if getattr(self, key) < 1:
                raise UserError(f"'{prefix}.{key}' must be >= 1, got {getattr(self, key)}.")
        if self.max_retries < 0 or self.retry_backoff_s < 0 or self.hub_timeout_s <= 0:
            raise UserError(f"'{prefix}.max_retries'/'retry_backoff_s' must be >= 0 and 'hub_timeout_s' > 0.")


@dataclass
class TrainConfig:
    """The optimisation loop. Every count here is in optimizer steps, never micro-batches."""

    steps: int = 1000  # optimizer steps to train for (the LR schedule spans exactly this many)
    seq_len: int = 2048  # tokens per training sequence (the model sees seq_len, predicts seq_len targets)
    batch_size: int = 8  # sequences per micro-batch per rank
    accumulate_grad_batches: int = 1  # micro-batches per optimizer step (ignored if global_batch_tokens > 0)
    global_batch_tokens: int = 0  # tokens per optimizer step over all ranks; > 0 derives accumulation
    lr: float = 6e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    warmup_steps: int = 100  # linear warmup from 0 to lr
    weight_decay: float = 0.1  # AdamW decoupled weight decay on matrices (not norms/biases)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # max global grad norm (0 disables clipping; the norm is still logged)
    log_every: int = 10  # steps between training.csv rows / stdout lines
    eval_every: int = 200  # steps between validation passes (0 disables; a final eval always runs)
    eval_batches: int = 20  # micro-batches of held-out data per validation pass (split across ranks)
    save_every: int = 500  # steps between full checkpoints (a final one is always written)
    keep_last_k: int = 3  # full checkpoints kept on disk (best/final safetensors are always kept)
    out_dir: str = "artifacts/m7c_125m"  # where every output of the run goes
    seed: int = 1337  # seeds python, numpy and torch (per-rank offset for data-side randomness)
    max_bad_steps: int = 3  # consecutive non-finite steps (never applied) before stopping as diverged
    early_stop_patience: int = 0  # evals without relative improvement before stopping; 0 disables
    early_stop_min_evals: int = 3  # never early-stop before this many evaluations
    early_stop_min_delta: float = 0.001  # relative val-loss improvement that counts as progress
    fault_inject: str = ""  # testing only: "nan@5,oom@3,crash@7,stall@9,hang@9,compile@1" (see parse_faults)

    def validate(self, prefix: str = "train") -> None:
        for key in ("steps", "seq_len", "batch_size", "accumulate_grad_batches", "log_every", "eval_batches",
                    "keep_last_k", "max_bad_steps"):
            if getattr(self, key) < 1:
                raise UserError(f"'{prefix}.{key}' must be >= 1, got {getattr(self, key)}.")
        for key in ("save_every", "eval_every", "warmup_steps", "global_batch_tokens", "early_stop_patience"):
            if getattr(self, key) < 0:
                raise UserError(f"'{prefix}.{key}' must be >= 0, got {getattr(self, key)}.")
        if self.save_every == 0:
            # A run without periodic checkpoints cannot survive preemption; say so instead of obeying.
            raise UserError(
                f"'{prefix}.save_every' is 0, which would never checkpoint a preemptible run. "
                f"Set it to a positive number of optimizer steps (e.g. 500)."
            )
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"'{prefix}.lr' must be > 0 and '{prefix}.min_lr_ratio' in [0, 1].")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise UserError(f"'{prefix}.grad_clip' and '{prefix}.weight_decay' must be >= 0.")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise UserError(f"'{prefix}.beta1'/'beta2' must be in [0, 1).")
        if self.global_batch_tokens > 0 and self.accumulate_grad_batches != 1:
            raise UserError(
                f"both '{prefix}.global_batch_tokens' ({self.global_batch_tokens}) and "
                f"'{prefix}.accumulate_grad_batches' ({self.accumulate_grad_batches}) are set; accumulation is derived "
                f"from global_batch_tokens. Set only one of them."
            )
        parse_faults(self.fault_inject)  # raises on a malformed spec


@dataclass
class RuntimeConfig:
    """Where and how the loop runs."""

    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32 (autocast; weights stay fp32)
    compile: bool = False  # torch.compile the model (the NSA kernels stay eager); falls back to eager if compiling fails
    tf32: bool = True  # allow TF32 matmuls on Ampere+ for the fp32 parts
    fused_adamw: bool = True  # fused AdamW kernel on CUDA (ignored on CPU)
    dist_backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    dist_timeout_s: int = 900  # collective timeout, so a hang becomes an error
    threads: int = 0  # torch intra-op CPU threads; 0 keeps torch's default
    peak_tflops: float = 0.0  # bf16 peak per device for MFU; 0 -> table by GPU name (env NSA_PEAK_TFLOPS wins)
    usd_per_gpu_hour: float = 0.0  # your price per GPU-hour (env GPU_HOURLY_USD wins); > 0 adds cost to metrics.json
    oom_fallback: bool = True  # on CUDA OOM: halve micro-batch (same tokens), then activation checkpointing
    # re-time the self-tuned Triton kernel variants once at this step (0 = never): the first choice saw a random
    # model's scattered block selections; a trained model's are coherent, which favours other variants
    retune_step: int = 1000

    def validate(self, prefix: str = "runtime") -> None:
        choices = {"device": ("auto", "cpu", "cuda"), "precision": ("auto", "bf16", "fp16", "fp32"),
                   "dist_backend": ("auto", "nccl", "gloo")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UserError(f"'{prefix}.{key}' must be one of {', '.join(allowed)}, got {getattr(self, key)!r}.")
        if (self.threads < 0 or self.peak_tflops < 0 or self.usd_per_gpu_hour < 0 or self.dist_timeout_s < 1
                or self.retune_step < 0):
            raise UserError(f"'{prefix}.threads', 'peak_tflops', 'usd_per_gpu_hour', 'retune_step' must be >= 0, "
                            "dist_timeout_s >= 1.")


FAULT_KINDS = ("nan", "oom", "crash", "stall", "hang", "compile")


def parse_faults(spec: str, rank: int | None = None) -> dict[int, list[str]]:
    """"nan@5,oom@3" -> {5: ["nan"], 3: ["oom"]}. Fault injection exists so tests can prove recovery paths:
    nan = the step's loss becomes NaN, oom = the step raises a CUDA-style OOM once, crash = an exception,
    stall = the step waits (up to 10 min) until a signal arrives, standing in for a long step that gets preempted/killed,
    hang = the step blocks for good, deaf to SIGTERM (a stuck collective or read: only SIGKILL ends it),
    compile = with runtime.compile, the step's compiled forward fails as a torch.compile error would.
    Every rank fires a fault, unless it names one rank: "compile@1:1" fails rank 1's step 1 only (the
    spec's faults for `rank`; None: all of them, for validation).
    Each fault fires once per out_dir (recorded in out_dir/.fault_inject_fired), so a resumed run gets past it."""
    out: dict[int, list[str]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, when = item.partition("@")
        step, colon, only = when.partition(":")
        if kind not in FAULT_KINDS or not step.isdigit() or (colon and not only.isdigit()):
            raise UserError(f"'train.fault_inject' item {item!r} must look like nan@5, oom@3, crash@7, stall@9, hang@9 "
                            "or compile@1, with :R to fire on rank R only (compile@1:1).")
        if rank is None or not colon or int(only) == rank:
            out.setdefault(int(step), []).append(kind)
    return out


@dataclass
class Config:
    """The whole run: `model` (build_model), `data`, `train`, `runtime`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self, prefix: str = "") -> None:
        """Checks that span sections (each section already validated itself)."""
        m, t = self.model, self.train
        if m.attention == "nsa":
            if t.seq_len < m.nsa.cmp_block:
                raise UserError(
                    f"'train.seq_len' ({t.seq_len}) is shorter than 'model.nsa.cmp_block' ({m.nsa.cmp_block}): "
                    f"no compressed block would ever be complete, so NSA's compressed and selected branches "
                    f"would see nothing. Raise train.seq_len or lower model.nsa.cmp_block."
                )
            if t.seq_len < m.nsa.slc_block:
                raise UserError(
                    f"'train.seq_len' ({t.seq_len}) is shorter than 'model.nsa.slc_block' ({m.nsa.slc_block}); "
                    f"raise train.seq_len or lower model.nsa.slc_block."
                )
        if self.data.dataset == "synthetic" and self.data.synthetic_vocab > m.vocab_size:
            raise UserError(
                f"'data.synthetic_vocab' ({self.data.synthetic_vocab}) exceeds 'model.vocab_size' ({m.vocab_size})."
            )
        if self.data.dataset not in ("synthetic",) and m.vocab_size < 50257:
            raise UserError(
                f"'model.vocab_size' ({m.vocab_size}) is smaller than the GPT-2 BPE vocabulary (50257) that "
                f"dataset {self.data.dataset!r} is tokenized with. Set model.vocab_size=50257."
            )

    def resolve_accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step for this world size; checks the global batch divides evenly."""
        t = self.train
        if t.global_batch_tokens <= 0:
            return t.accumulate_grad_batches
        per_micro = t.batch_size * t.seq_len * world_size
        if t.global_batch_tokens % per_micro:
            raise UserError(
                f"'train.global_batch_tokens' ({t.global_batch_tokens}) is not divisible by "
                f"batch_size x seq_len x ranks = {t.batch_size} x {t.seq_len} x {world_size} = {per_micro}, so "
                f"the batch cannot be split evenly across ranks. Pick a global_batch_tokens that is a multiple "
                f"of {per_micro}, or change train.batch_size / the number of processes."
            )
        return t.global_batch_tokens // per_micro

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _set_dotted(tree: dict, dotted: str, raw: str) -> None:
    import yaml

    keys = dotted.split(".")
    if keys[0] not in SECTIONS:
        raise UserError(
            f"override '{dotted}={raw}' targets unknown section '{keys[0]}'; sections are "
            f"{', '.join(SECTIONS)} (e.g. train.lr=3e-4)."
        )
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise UserError(f"override '{dotted}': '{k}' is a value, not a section.")
        node = nxt
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key or " " in key:
        raise UserError(
            f"cannot parse argument {item!r}: overrides look like section.key=value (e.g. train.lr=3e-4); "
            f"flags are --config, --resume, --dataset, --steps, --out-dir."
        )
    return key, value


def load_config(path: str | None, overrides: list[str] | None = None) -> Config:
    """YAML file (optional) + dotted overrides -> validated Config. Every mistake is a UserError."""
    import yaml

    tree: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                tree = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise UserError(f"config file '{path}' does not exist. Pass an existing YAML via --config (see configs/).")
        except yaml.YAMLError as e:
            raise UserError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]} ... Fix the syntax.")
        if not isinstance(tree, dict):
            raise UserError(f"config file '{path}' must be a mapping with sections {', '.join(SECTIONS)}.")
    unknown = sorted(set(tree) - set(SECTIONS))
    if unknown:
        raise UserError(
            f"unknown config section(s) {', '.join(unknown)} in '{path}'. Valid sections: {', '.join(SECTIONS)}."
        )
    for item in overrides or []:
        _set_dotted(tree, *parse_override(item))
    return config_from_dict(tree)


def config_from_dict(tree: dict) -> Config:
    unknown = sorted(set(tree) - set(SECTIONS))
    if unknown:
        raise UserError(f"unknown config section(s) {', '.join(unknown)}. Valid sections: {', '.join(SECTIONS)}.")
    cfg = Config(
        model=ModelConfig.from_dict(tree.get("model")),
        data=dataclass_from_dict(DataConfig, tree.get("data"), "data"),
        train=dataclass_from_dict(TrainConfig, tree.get("train"), "train"),
        runtime=dataclass_from_dict(RuntimeConfig, tree.get("runtime"), "runtime"),
    )
    cfg.validate()
    return cfg


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config (every default filled in) atomically, so the run can be reproduced."""
    import os

    import yaml

    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write("# Resolved configuration of this run (all defaults filled in). Re-run with --config this file.\n")
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)
