"""PEFT and Hugging Face: patch_peft, PEFT's adapter format both ways, Conv1D (tiny random models)."""

import copy
import logging

import pytest
import torch
from conftest import BACKENDS, DEVICE, assert_close, tiny_hf_model

import lora_kernels

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = {"gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "v_proj", "down_proj"]}


def randomize_lora(model):
    """Trained-looking adapters: B = 0 at init would make every comparison trivial."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)


def peft_model(kind, **config):
    config = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[kind], "lora_dropout": 0.0, **config}
    model = peft.get_peft_model(tiny_hf_model(kind), peft.LoraConfig(fan_in_fan_out=kind == "gpt2", **config))
    randomize_lora(model)
    return model


def logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    logits.float().square().mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_peft_same_logits_and_gradients(kind, backend):
    model = peft_model(kind)
    ids = torch.randint(0, 128, (2, 12), device=DEVICE)
    ref_logits, ref_grads = logits_and_grads(model, ids)
    n_layers = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())
    assert lora_kernels.patch_peft(model, backend=backend) == n_layers
    assert all(
        lora_kernels.peft_patch.peft_layer_status(m) == ""
        for m in model.modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    )  # switched
    logits, grads = logits_and_grads(model, ids)
    assert_close(logits, ref_logits.double(), torch.float32, "logits")
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        assert_close(grads[name], ref_grads[name].double(), torch.float32, name)


def test_patched_model_keeps_peft_behaviour(tmp_path):
    model = peft_model("llama")
    ids = torch.randint(0, 128, (2, 10), device=DEVICE)
    before = model(input_ids=ids).logits
    state_before = peft.get_peft_model_state_dict(model)
    lora_kernels.patch_peft(model)
    torch.testing.assert_close(model(input_ids=ids).logits, before)
    # merge / unmerge and disabling still work (PEFT's own code paths)
    model.merge_adapter()
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    with model.disable_adapter():
        base = model(input_ids=ids).logits
    assert not torch.allclose(base, before)
    # save_pretrained writes the same adapter
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(tiny_hf_model("llama"), tmp_path)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    state_after = peft.get_peft_model_state_dict(model)
    assert state_after.keys() == state_before.keys()
    assert lora_kernels.unpatch_peft(model) > 0
    assert all(
        lora_kernels.peft_patch.peft_layer_status(m) != ""
        for m in model.modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    )  # none switched any more


def test_unsupported_layers_stay_on_peft_path_with_a_log_line(caplog):
    model = peft_model("llama", use_dora=True)
    ids = torch.randint(0, 128, (1, 8), device=DEVICE)
    before = model(input_ids=ids).logits
    with caplog.at_level(logging.WARNING, logger="lora_kernels"):
        assert lora_kernels.patch_peft(model) == 0
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 * 3 + 1 and all("DoRA" in line for line in lines)  # one per layer, then the summary
    assert "0 of 6 LoRA layers fused" in lines[-1] and "(6)" in lines[-1]
    torch.testing.assert_close(model(input_ids=ids).logits, before)
    report = lora_kernels.explain(model)
    assert len(report) == 6 and all(r.backend == "peft" and not r.fused and "DoRA" in r.why for r in report)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_adapter_names_run_fused(kind, backend, monkeypatch):
    model = peft_model(kind)
    model.add_adapter(
        "other", peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS[kind], fan_in_fan_out=kind == "gpt2")
    )
    model.eval()  # PEFT takes adapter_names in eval mode only
    randomize_lora(model)
    ids = torch.randint(0, 128, (4, 8), device=DEVICE)
    names = ["default", "other", "__base__", "other"]
    ref = model(input_ids=ids, adapter_names=names).logits
    lora_kernels.patch_peft(model, backend=backend)
    calls = []
    real = lora_kernels.peft_patch.lora_linear_mixed_batch
    monkeypatch.setattr(lora_kernels.peft_patch, "lora_linear_mixed_batch", lambda *a: calls.append(1) or real(*a))
    assert_close(model(input_ids=ids, adapter_names=names).logits, ref.double(), torch.float32, "mixed batch")
    assert len(calls) == sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_adapter_trained_here_loads_in_peft(kind, tmp_path):
    model = tiny_hf_model(kind)
    names = lora_kernels.inject_lora(model, TARGETS[kind], r=4, alpha=8)
    randomize_lora(model)
    ids = torch.randint(0, 128, (2, 10), device=DEVICE)
    ours = model(input_ids=ids).logits
    assert sorted(lora_kernels.save_peft_adapter(model, tmp_path)) == sorted(names)
    in_peft = peft.PeftModel.from_pretrained(tiny_hf_model(kind), tmp_path)
    torch.testing.assert_close(in_peft(input_ids=ids).logits, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_adapter_trained_in_peft_loads_here(kind, tmp_path):
    trained = peft_model(kind, r=6, lora_alpha=12, rank_pattern={"v_proj": 2} if kind == "llama" else {})
    trained.save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 10), device=DEVICE)
    ref = trained(input_ids=ids).logits
    model = tiny_hf_model(kind)
    names = lora_kernels.load_peft_adapter(model, tmp_path)
    assert len(names) == sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in trained.modules())
    assert all(isinstance(model.get_submodule(n), lora_kernels.LoRAMixin) for n in names)
    torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inject_lora_wraps_conv1d(backend):
    from transformers.pytorch_utils import Conv1D

    model = tiny_hf_model("gpt2")
    ids = torch.randint(0, 128, (2, 10), device=DEVICE)
    base = model(input_ids=ids).logits
    names = lora_kernels.inject_lora(model, ["c_attn"], r=4, alpha=8, backend=backend)
    layer = model.get_submodule(names[0])
    assert isinstance(layer, Conv1D) and layer.fan_in_fan_out and layer.in_features == 64 and layer.out_features == 192
    torch.testing.assert_close(model(input_ids=ids).logits, base)  # zero B: exactly the base model
    randomize_lora(model)
    x = torch.randn(5, 64, device=DEVICE, requires_grad=True)
    y = layer(x)
    ref = x @ layer.weight + layer.bias + layer.scaling * (x @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t()
    assert_close(y, ref.double(), torch.float32, "conv1d lora")
    merged = copy.deepcopy(layer).merge()
    assert_close(merged(x), ref.double(), torch.float32, "merged conv1d")


def test_named_adapters_round_trip_with_peft(tmp_path):
    """Two PEFT adapters load here as "default" + a named one and run as one mixed batch; the
    named one saved from here loads back in PEFT."""
    trained = peft_model("llama")
    trained.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=6, target_modules=TARGETS["llama"]))
    randomize_lora(trained)
    trained.eval()
    trained.save_pretrained(tmp_path)  # PEFT: default at the root, "other" in a sub-folder
    ids = torch.randint(0, 128, (3, 8), device=DEVICE)
    names = ["other", "default", "__base__"]
    ref = trained(input_ids=ids, adapter_names=names).logits
    model = tiny_hf_model("llama")
    lora_kernels.load_peft_adapter(model, tmp_path)
    lora_kernels.load_peft_adapter(model, tmp_path / "other", adapter_name="other")
    model.eval()
    for layer in model.modules():  # route PEFT's adapter_names kwarg to our layers
        if isinstance(layer, lora_kernels.LoRAMixin):
            layer.register_forward_pre_hook(lambda m, args, kw: (args, {"adapter_names": names}), with_kwargs=True)
    assert_close(model(input_ids=ids).logits, ref.double(), torch.float32, "mixed batch after loading")
    out = tmp_path / "saved_other"
    lora_kernels.save_peft_adapter(model, out, adapter_name="other")
    back = peft.PeftModel.from_pretrained(tiny_hf_model("llama"), out)
    with torch.no_grad():
        trained.set_adapter("other")
        torch.testing.assert_close(back(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_loading_into_an_existing_named_adapter_takes_the_files_alpha(tmp_path):
    """An adapter loaded into a named adapter that exists already scales as the file says, as the
    default adapter always did (it used to keep its old alpha: a silently different result)."""
    source = torch.nn.Sequential(lora_kernels.LoRALinear(12, 10, r=4, alpha=8))
    torch.nn.init.normal_(source[0].lora_B.weight)
    lora_kernels.save_peft_adapter(source, str(tmp_path))
    target = torch.nn.Sequential(lora_kernels.LoRALinear(12, 10, r=4, alpha=8))
    target[0].weight.data.copy_(source[0].weight.data)
    target[0].bias.data.copy_(source[0].bias.data)
    target[0].add_adapter("other", r=4, alpha=1)
    lora_kernels.load_peft_adapter(target, str(tmp_path), adapter_name="other")
    assert target[0].adapter("other").scaling == source[0].scaling
    x = torch.randn(3, 12)
    torch.testing.assert_close(target[0](x, adapter_names=["other"] * 3), source[0](x))
