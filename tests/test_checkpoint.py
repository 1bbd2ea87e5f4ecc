"""Checkpoint files: atomic writes, retention, skipping corrupt files, compatibility messages, safetensors."""

import json
import os

import pytest
import torch

from nsa import checkpoint as ckpt
from nsa.errors import UserError


def fake_state(step, **extra):
    s = {"format_version": ckpt.FORMAT_VERSION, "step": step, "tokens_seen": step * 10, "config": {"model": {"dim": 8}},
         "model": {"w": torch.full((4,), float(step))}, "optimizer": {}, "scheduler": {}, "rng": [{}], "data": [{}],
         "run_state": {"step": step}, "world_size": 1}
    s.update(extra)
    return s


def test_atomic_save_prune_and_no_temp_files(tmp_path):
    for step in (2, 4, 6, 8):
        ckpt.save_checkpoint(str(tmp_path), step, fake_state(step), keep_last_k=2)
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [8, 6]
    assert not [f for f in os.listdir(tmp_path) if "tmp" in f]
    path, state = ckpt.find_latest_valid(str(tmp_path))
    assert path.endswith("checkpoint_step8.pt") and torch.equal(state["model"]["w"], torch.full((4,), 8.0))


def test_failed_write_leaves_previous_file_untouched(tmp_path):
    ckpt.save_checkpoint(str(tmp_path), 5, fake_state(5), keep_last_k=3)
    path = ckpt.checkpoint_path(str(tmp_path), 5)
    before = open(path, "rb").read()

    def boom(f):
        f.write(b"partial")
        raise OSError("disk full")
    with pytest.raises(OSError):
        ckpt.atomic_write(path, boom)
    assert open(path, "rb").read() == before and not [f for f in os.listdir(tmp_path) if "tmp" in f]


def test_truncated_newest_is_skipped_with_warning(tmp_path, capsys):
    for step in (3, 6):
        ckpt.save_checkpoint(str(tmp_path), step, fake_state(step), keep_last_k=3)
    newest = ckpt.checkpoint_path(str(tmp_path), 6)
    size = os.path.getsize(newest)
    with open(newest, "r+b") as f:
        f.truncate(size // 2)  # what a crash during a non-atomic copy would leave
    path, state = ckpt.find_latest_valid(str(tmp_path))
    assert path.endswith("checkpoint_step3.pt") and state["step"] == 3
    out = capsys.readouterr().out
    assert "WARNING" in out and "checkpoint_step6.pt" in out
    assert os.path.exists(newest)  # reported, never deleted


def test_leftover_temp_files_are_cleaned(tmp_path):
    (tmp_path / ".checkpoint_step9.pt.tmp123").write_bytes(b"half")
    ckpt.clean_temp_files(str(tmp_path))
    assert not list(tmp_path.iterdir())


def test_malformed_and_wrong_version(tmp_path):
    p = tmp_path / "checkpoint_step1.pt"
    torch.save({"step": 1}, p)
    with pytest.raises(ckpt.CorruptCheckpoint, match="missing"):
        ckpt.load_checkpoint(str(p))
    torch.save(fake_state(1, format_version=99), p)
    with pytest.raises(UserError, match="format_version 99"):
        ckpt.load_checkpoint(str(p))


def test_compatibility_names_the_difference():
    old = {"model": {"dim": 64, "n_layers": 2, "nsa": {"window": 16, "impl": "torch"}}}
    ckpt.check_compatible(old, {"dim": 64, "n_layers": 2, "nsa": {"window": 16, "impl": "triton"}}, 1, 1)
    with pytest.raises(UserError) as e:
        ckpt.check_compatible(old, {"dim": 64, "n_layers": 4, "nsa": {"window": 32, "impl": "torch"}}, 1, 1)
    assert "model.n_layers: checkpoint 2 vs config 4" in str(e.value) and "model.nsa.window" in str(e.value)
    with pytest.raises(UserError, match="2 process"):
        ckpt.check_compatible(old, old["model"], 1, 2)


def test_safetensors_export_with_tied_weights(tmp_path):
    from safetensors.torch import load_file

    m = torch.nn.Module()
    m.embed = torch.nn.Embedding(10, 4)
    m.head = torch.nn.Linear(4, 10, bias=False)
    m.head.weight = m.embed.weight
    ckpt.export_safetensors(m, str(tmp_path / "best-model.safetensors"), {"step": 7, "val_loss": 1.5})
    tensors = load_file(str(tmp_path / "best-model.safetensors"))
    assert list(tensors) == ["embed.weight"] and torch.equal(tensors["embed.weight"], m.embed.weight.detach())
    meta = json.loads((tmp_path / "best-model.json").read_text())
    assert meta["step"] == 7 and meta["val_loss"] == 1.5 and meta["tied"] == {"head.weight": "embed.weight"}
