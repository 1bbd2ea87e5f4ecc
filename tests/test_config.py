"""Config schema: YAML + overrides -> validated dataclasses; every mistake is a clear UserError."""

import glob
import os

import pytest
import yaml

from tests.conftest import REPO, offline_env, run_train_concurrently, tiny_config
from nsa.config import config_from_dict, load_config, parse_faults, save_config
from nsa.errors import UserError

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.train.save_every > 0 and cfg.train.steps > 0


def test_required_configs_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"smoke.yaml", "m7c_cpu.yaml", "m7c_125m_24g.yaml", "m7c_125m_40g.yaml", "m7c_125m_80g.yaml"} <= names


def test_gpu_tiers_same_tokens_per_step_and_m7c_dims():
    tiers = [load_config(os.path.join(REPO, "configs", f"m7c_125m_{t}.yaml")) for t in ("24g", "40g", "80g")]
    for world in (1, 2, 4, 8):
        tokens = {c.train.batch_size * c.train.seq_len * c.resolve_accumulation(world) * world for c in tiers}
        assert len(tokens) == 1, f"tiers disagree on tokens per optimizer step at world {world}: {tokens}"
    for c in tiers:
        m = c.model
        assert (m.dim, m.n_layers, m.n_heads, m.head_dim, m.attention) == (768, 12, 12, 64, "nsa")
        assert (m.nsa.cmp_block, m.nsa.cmp_stride, m.nsa.slc_block, m.nsa.n_selected, m.nsa.window) == (32, 16, 64, 16, 512)
        assert c.data.dataset == "fineweb_edu" and c.runtime.precision == "bf16" and c.runtime.fused_adamw
        assert 2048 <= c.train.seq_len <= 4096


def test_cpu_default_every_nsa_branch_matters():
    c = load_config(os.path.join(REPO, "configs", "m7c_cpu.yaml"))
    n = c.model.nsa
    assert c.model.attention == "nsa" and c.data.dataset == "embedded"
    assert c.train.seq_len > n.window and c.train.seq_len > n.n_selected * n.slc_block


def test_dotted_overrides_and_types():
    c = load_config(None, ["train.lr=3e-4", "model.nsa.window=64", "train.steps=12", "runtime.compile=true",
                           "data.dataset=local:/x.jsonl", "model.attention=full"])
    assert c.train.lr == pytest.approx(3e-4) and isinstance(c.train.lr, float)
    assert c.model.nsa.window == 64 and c.train.steps == 12 and c.runtime.compile is True
    assert c.data.dataset == "local:/x.jsonl"


@pytest.mark.parametrize("overrides, needle", [
    (["train.lrr=1"], "train.lrr"),
    (["train.steps=abc"], "train.steps"),
    (["trian.steps=3"], "trian"),
    (["model.nsa.cmp_blok=3"], "model.nsa.cmp_blok"),
    (["train.seq_len=16", "model.nsa.cmp_block=32"], "train.seq_len"),
    (["train.save_every=0"], "save_every"),
    (["model.n_heads=12", "model.n_kv_heads=5"], "n_kv_heads"),
    (["data.dataset=imagenet"], "data.dataset"),
    (["runtime.precision=fp8"], "runtime.precision"),
    (["runtime.retune_step=-1"], "retune_step"),
    (["train.fault_inject=boom@x"], "fault_inject"),
    (["train.global_batch_tokens=-1"], "global_batch_tokens"),
    (["train.global_batch_tokens=4096", "train.accumulate_grad_batches=4"], "Set only one"),
    (["notakey"], "section.key=value"),
])
def test_bad_values_name_the_key(overrides, needle):
    with pytest.raises(UserError) as e:
        load_config(None, overrides)
    assert needle in str(e.value)


def test_global_batch_must_divide_across_ranks():
    c = load_config(os.path.join(REPO, "configs", "m7c_125m_80g.yaml"))
    assert c.resolve_accumulation(8) == 2
    with pytest.raises(UserError, match="divisible"):
        c.resolve_accumulation(3)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(bad))
    extra = tmp_path / "extra.yaml"
    extra.write_text("trainer: {steps: 3}\n")
    with pytest.raises(UserError, match="trainer"):
        load_config(str(extra))


def test_resolved_config_round_trip(tmp_path):
    c = config_from_dict(tiny_config(train={"lr": 1e-3}))
    path = tmp_path / "config.yaml"
    save_config(c, str(path))
    again = load_config(str(path))
    assert again.to_dict() == c.to_dict()
    assert yaml.safe_load(path.read_text())["train"]["lr"] == 1e-3


def test_fault_spec():
    assert parse_faults("nan@3, nan@4,oom@2") == {3: ["nan"], 4: ["nan"], 2: ["oom"]}
    assert parse_faults("") == {}
    # ":R" fires on rank R only; without a rank (validation) every fault counts
    assert parse_faults("compile@1:1,nan@2", rank=0) == {2: ["nan"]}
    assert parse_faults("compile@1:1,nan@2", rank=1) == {1: ["compile"], 2: ["nan"]}
    assert parse_faults("compile@1:1") == {1: ["compile"]}
    for bad in ("compile@1:", "compile@1:x", "compile@:1"):
        with pytest.raises(UserError, match="rank R only"):
            parse_faults(bad)


# Five (and more) distinct user mistakes through the real CLI: exit 2, one clear paragraph, no traceback.
CLI_ERRORS = [
    (["--config", "configs/does_not_exist.yaml"], "does not exist"),
    (["--config", "configs/smoke.yaml", "train.lerning_rate=1e-3"], "train.lerning_rate"),
    (["--config", "configs/smoke.yaml", "train.batch_size=four"], "train.batch_size"),
    (["--config", "configs/smoke.yaml", "train.seq_len=4"], "cmp_block"),
    (["--config", "configs/smoke.yaml", "--dataset", "local:/no/such/file.jsonl", "model.vocab_size=50257"],
     "does not exist"),
    (["--config", "configs/smoke.yaml", "--lr", "3"], "--lr"),
    (["--config", "configs/smoke.yaml"], "NSA_LOSS='fused'", {"NSA_LOSS": "fused"}),
]


@pytest.fixture(scope="module")
def cli_error_runs(tmp_path_factory):
    """Every case's own `python -m nsa.train` process, one per core at a time (each is mostly torch's
    single-threaded import: run one after another they leave a core idle)."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    return run_train_concurrently([((*args[1:], "--out-dir", str(tmp / f"out{i}")),
                                    {"timeout": 180, "env": {**offline_env(), **(env[0] if env else {})}})
                                   for i, (args, _, *env) in enumerate(CLI_ERRORS)])


@pytest.mark.parametrize("case", range(len(CLI_ERRORS)), ids=[f"args{i}-{case[1]}" for i, case in enumerate(CLI_ERRORS)])
def test_cli_user_errors_exit_2_without_traceback(cli_error_runs, case):
    r, needle = cli_error_runs[case], CLI_ERRORS[case][1]
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert needle in r.stderr
    assert "Traceback" not in out
    assert len([line for line in r.stderr.strip().splitlines() if line.strip()]) == 1


def test_gpu_tier_builds_the_125m_model():
    from nsa.model import build_model

    cfg = load_config(os.path.join(REPO, "configs", "m7c_125m_80g.yaml"))
    model = build_model(cfg.model)
    assert 115e6 < model.num_params() < 135e6
    assert model.flops_per_token(cfg.train.seq_len) > 6 * 85e6
