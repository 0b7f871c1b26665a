"""Checkpoint and config safety: every config value PEFT defines is validated (a CheckpointError naming it, the
model unchanged), loading into MultiLoRALinear slots is all-or-nothing, adapter_name cannot leave the folder,
save_peft_adapter is atomic, aliased modules are handled deliberately, and no failure is an OverflowError,
RecursionError, re.error or AttributeError."""
import copy
import json
import os

import pytest
import torch
import torch.nn as nn

import peft_kernels as pk
from peft_kernels import checkpoint as ck


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 6)
        self.up_proj = nn.Linear(6, 10)

    def forward(self, x):
        return self.up_proj(torch.relu(self.v_proj(self.q_proj(x))))


def _saved(tmp_path, name="ckpt"):
    torch.manual_seed(0)
    m = Net()
    pk.inject_lora(m, ["q_proj", "v_proj", "up_proj"], r=2, lora_alpha=4, init_lora_weights=False)
    d = tmp_path / name
    pk.save_peft_adapter(m, d)
    return d


def _snapshot(m):
    return copy.deepcopy(m.state_dict()), [type(x) for x in m.modules()]


def _unchanged(m, snap):
    sd, kinds = snap
    return [type(x) for x in m.modules()] == kinds and all(torch.equal(sd[k], v) for k, v in m.state_dict().items())


def _edit_config(d, **changes):
    f = d / "adapter_config.json"
    cfg = json.loads(f.read_text())
    for k, v in changes.items():
        if v is _DROP:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    f.write_text(json.dumps(cfg))  # allow_nan: NaN / Infinity written as JSON extensions, as a bad file would


_DROP = object()
BAD = [
    ("r", 0), ("r", -2), ("r", 2.5), ("r", "2"), ("r", True), ("r", None), ("r", 10 ** 40), ("r", float("inf")),
    ("lora_alpha", float("nan")), ("lora_alpha", float("inf")), ("lora_alpha", 1e40), ("lora_alpha", -4),
    ("lora_alpha", 0), ("lora_alpha", "4"), ("lora_alpha", False), ("lora_alpha", [4]),
    ("use_rslora", "false"), ("use_rslora", "true"), ("use_rslora", 1), ("use_dora", "false"),
    ("lora_bias", "no"), ("fan_in_fan_out", "true"), ("inference_mode", "yes"),
    ("lora_dropout", -0.1), ("lora_dropout", 1.0), ("lora_dropout", "0.1"), ("lora_dropout", float("nan")),
    ("rank_pattern", {"(": 2}), ("rank_pattern", {"q_proj": 0}), ("rank_pattern", {"q_proj": "2"}),
    ("rank_pattern", []), ("rank_pattern", "q_proj"), ("alpha_pattern", {"[": 2}),
    ("alpha_pattern", {"q_proj": float("nan")}), ("alpha_pattern", {"q_proj": 1e39}),
    ("target_modules", ["k_proj"]), ("target_modules", "("), ("target_modules", 5), ("target_modules", [1]),
    ("target_modules", "q_proj"), ("exclude_modules", ["v_proj"]), ("bias", "all"), ("peft_type", "LOHA"),
    ("r", _DROP), ("lora_alpha", _DROP), ("modules_to_save", ["lm_head"]),
]


@pytest.mark.parametrize("key,value", BAD, ids=[f"{k}={v!r}"[:40] for k, v in BAD])
def test_every_bad_config_value_is_a_checkpoint_error_naming_it(tmp_path, key, value):
    d = _saved(tmp_path)
    _edit_config(d, **{key: value})
    m = Net()
    snap = _snapshot(m)
    with pytest.raises(pk.CheckpointError) as e:
        pk.load_peft_adapter(m, d)
    assert key in str(e.value) or (key == "target_modules" and value == "q_proj"), str(e.value)
    assert _unchanged(m, snap)


def test_a_good_config_still_loads(tmp_path):
    d = _saved(tmp_path)
    _edit_config(d, use_rslora=False, rank_pattern={}, alpha_pattern={"up_proj": 3}, target_modules=None,
                 lora_dropout=None, inference_mode=None)
    m = Net()
    names = pk.load_peft_adapter(m, d)
    assert sorted(names) == ["q_proj", "up_proj", "v_proj"] and not m.q_proj.use_rslora
    assert m.up_proj.lora_alpha == 3 and m.q_proj.lora_alpha == 4


def test_broken_json_files_are_checkpoint_errors(tmp_path):
    d = _saved(tmp_path)
    f = d / "adapter_config.json"
    for text in ["[" * 100000 + "]" * 100000, '{"r": 2, "lora_alpha": NaN', "[1, 2]", "\xff\xfe", ""]:
        f.write_bytes(text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text)
        with pytest.raises(pk.CheckpointError):
            pk.load_peft_adapter(Net(), d)


def test_target_modules_is_honoured(tmp_path):
    d = _saved(tmp_path)
    _edit_config(d, target_modules=["q_proj", "v_proj", "up_proj"])
    pk.load_peft_adapter(Net(), d)
    _edit_config(d, target_modules=".*_proj")  # a regex, full-matched as PEFT does
    pk.load_peft_adapter(Net(), d)
    _edit_config(d, target_modules=["q_proj", "v_proj"])  # up_proj's tensors are not targeted
    with pytest.raises(pk.CheckpointError, match="'up_proj'.*target_modules"):
        pk.load_peft_adapter(Net(), d)


def test_slot_loading_is_all_or_nothing(tmp_path, monkeypatch):
    d = _saved(tmp_path)
    m = Net()
    for n in ("q_proj", "v_proj", "up_proj"):
        setattr(m, n, pk.MultiLoRALinear.from_linear(getattr(m, n), max_adapters=2, max_rank=4))
    torch.manual_seed(5)
    for n in ("q_proj", "v_proj", "up_proj"):
        lay = getattr(m, n)
        lay.set_adapter(1, torch.randn(3, lay.in_features), torch.randn(lay.out_features, 3), 0.5)
    snap = _snapshot(m)
    real = pk.MultiLoRALinear.set_adapter
    calls = []

    def failing_late(self, slot, A, B, s, dropout=None):
        calls.append(self)
        if self is m.v_proj:  # the second layer written (sorted names: q_proj, up_proj, v_proj)
            raise RuntimeError("device lost")
        return real(self, slot, A, B, s, dropout)

    monkeypatch.setattr(pk.MultiLoRALinear, "set_adapter", failing_late)
    with pytest.raises(RuntimeError, match="device lost"):
        pk.load_peft_adapter(m, d, slot=1)
    monkeypatch.setattr(pk.MultiLoRALinear, "set_adapter", real)
    assert len(calls) >= 3  # two layers were written before the failure, then rolled back
    assert _unchanged(m, snap)
    # a bad value in any layer is found before the first write
    sd = dict(ck._read_weights(str(d)))
    sd["base_model.model.v_proj.lora_B.weight"] = torch.full_like(sd["base_model.model.v_proj.lora_B.weight"],
                                                                  float("inf"))
    from safetensors.torch import save_file
    save_file(sd, str(d / "adapter_model.safetensors"))
    with pytest.raises(pk.CheckpointError, match="finite"):
        pk.load_peft_adapter(m, d, slot=1)
    assert _unchanged(m, snap)


@pytest.mark.parametrize("name", ["../ckpt", "..", "/etc", "sub/../../ckpt", "", ".", "a\\0b", "link"])
def test_adapter_name_cannot_leave_the_folder(tmp_path, name):
    outside = _saved(tmp_path, "outside")
    root = _saved(tmp_path, "root")
    os.symlink(outside, root / "link")
    m = Net()
    snap = _snapshot(m)
    with pytest.raises(pk.CheckpointError):
        pk.load_peft_adapter(m, root, adapter_name=name)
    assert _unchanged(m, snap)


def test_a_missing_named_adapter_is_an_error_not_the_root_adapter(tmp_path):
    root = _saved(tmp_path, "root")
    with pytest.raises(pk.CheckpointError, match="no adapter named 'other'"):
        pk.load_peft_adapter(Net(), root, adapter_name="other")
    sub = _saved(tmp_path / "root", "other")
    assert pk.load_peft_adapter(Net(), root, adapter_name="other") and sub.exists()
    with pytest.raises(TypeError, match="adapter_name"):
        pk.load_peft_adapter(Net(), root, adapter_name=3)


def _files(d):
    return {p: (d / p).read_bytes() for p in sorted(os.listdir(d))}


@pytest.mark.parametrize("crash_at", ["weights", "config", "exchange"])
def test_save_is_atomic(tmp_path, monkeypatch, crash_at):
    d = _saved(tmp_path)
    (d / "README.md").write_text("model card")
    before = _files(d)
    torch.manual_seed(9)
    m = Net()
    pk.inject_lora(m, ["q_proj", "v_proj"], r=3, lora_alpha=6, init_lora_weights=False)

    def boom(*a, **k):
        raise OSError("disk full")

    target = {"weights": "safetensors.torch.save_file", "config": "json.dump", "exchange": None}[crash_at]
    if target == "json.dump":
        monkeypatch.setattr(ck.json, "dump", boom)
    elif target:
        import safetensors.torch as st
        monkeypatch.setattr(st, "save_file", boom)
    else:
        monkeypatch.setattr(ck, "_exchange", boom)
    with pytest.raises(OSError, match="disk full"):
        pk.save_peft_adapter(m, d)
    assert _files(d) == before  # the previous checkpoint, whole
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary folder left behind
    monkeypatch.undo()
    pk.save_peft_adapter(m, d)  # and a save that completes replaces it as a whole
    after = _files(d)
    assert after["README.md"] == b"model card" and after != before
    assert json.loads(after["adapter_config.json"])["r"] == 3
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    torch.manual_seed(9)
    m2 = Net()  # the same base
    pk.load_peft_adapter(m2, d)
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert torch.allclose(m2(x), m(x), atol=1e-6)


def test_save_refuses_a_folder_with_other_files(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "weights.pt").write_bytes(b"precious")
    m = Net()
    pk.inject_lora(m, ["q_proj"], r=2)
    with pytest.raises(ValueError, match="weights.pt"):
        pk.save_peft_adapter(m, d)
    assert os.listdir(d) == ["weights.pt"]


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = self.a  # one layer, two names
        self.c = nn.Linear(6, 4)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_aliased_modules(tmp_path):
    torch.manual_seed(0)
    m = Tied()
    names = pk.inject_lora(m, ["a", "b", "c"], r=2, init_lora_weights=False)
    assert isinstance(m.a, pk.LoRALinear) and m.a is m.b  # replaced under both names by one module: still tied
    assert sorted(names) == ["a", "c"]
    d = tmp_path / "tied"
    pk.save_peft_adapter(m, d)
    keys = set(ck._read_weights(str(d)))
    assert not any(".b." in k for k in keys)  # saved once, under its first name
    torch.manual_seed(0)
    m2 = Tied()  # the same base
    pk.load_peft_adapter(m2, d)
    assert isinstance(m2.a, pk.LoRALinear) and m2.a is m2.b
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.allclose(m2(x), m(x), atol=1e-6)
    # a checkpoint with an adapter for each alias cannot go into one layer
    sd = ck._read_weights(str(d))
    sd.update({k.replace(".a.", ".b."): v.clone() for k, v in sd.items() if ".a." in k})
    from safetensors.torch import save_file
    save_file(sd, str(d / "adapter_model.safetensors"))
    _edit_config(d, target_modules=["a", "b", "c"])
    m3 = Tied()
    snap = _snapshot(m3)
    with pytest.raises(pk.CheckpointError, match="aliased"):
        pk.load_peft_adapter(m3, d)
    assert _unchanged(m3, snap)
