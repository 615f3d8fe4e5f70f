"""Interop that never surprises: what a new user hit (issue 20), each with the right answer or a clear
error. Every result is checked against plain torch, float64 or unpatched PEFT."""

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from conftest import BACKENDS, DEVICE, assert_close, make_problem, tiny_hf_model

import lora_kernels


def leaf(t):
    return t.detach().clone().requires_grad_()


# ---- torch.inference_mode ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_mode_gives_what_no_grad_gives_and_its_tensors_are_refused_as_nn_linear_refuses(backend):
    """Serving loops run under torch.inference_mode: the layer (eval, and in training mode with
    dropout) computes there as under no_grad; an inference tensor fed to a layer whose adapters
    train raises torch's own error, as nn.Linear does."""
    torch.manual_seed(0)
    layer = lora_kernels.LoRALinear(40, 24, r=4, alpha=8, dropout=0.2, backend=backend, device=DEVICE)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 40, device=DEVICE)
    layer.eval()
    with torch.no_grad():
        want = layer(x)
    with torch.inference_mode():
        got = layer(x)
        layer.train()
        dropped = layer(x)
    assert torch.equal(got, want) and dropped.shape == want.shape and not dropped.requires_grad
    with torch.inference_mode():
        x_inference = torch.randn(2, 40, device=DEVICE)
    layer.eval()
    linear = torch.nn.Linear(40, 24, device=DEVICE)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        linear(x_inference)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        layer(x_inference)


# ---- second derivatives -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gradient_penalty_through_the_adapters_is_exact(backend, dropout_p):
    """create_graph=True: a penalty on dA (and dX) differentiates into x, A and B exactly as the
    plain-torch definition does, with the forward's dropout mask."""
    x, w, b, a, bb, s = make_problem(13, 24, 20, 4, torch.float32)
    x, a, bb = leaf(x), leaf(a), leaf(bb)
    torch.manual_seed(5)
    y = lora_kernels.lora_linear(x, w, b, a, bb, s, dropout_p=dropout_p, backend=backend)
    g_x, g_a = torch.autograd.grad(y.square().sum(), (x, a), create_graph=True)
    assert g_x.requires_grad and g_a.requires_grad
    (y.sum() + g_a.square().sum() + g_x.square().sum()).backward()
    from test_function import expected_dropout_mask

    mask = None if dropout_p == 0 else expected_dropout_mask(backend, 5, x, dropout_p).float()
    x2, a2, bb2 = leaf(x), leaf(a), leaf(bb)
    y2 = lora_kernels.lora_linear_reference(x2, w, b, a2, bb2, s, mask)
    g_x2, g_a2 = torch.autograd.grad(y2.square().sum(), (x2, a2), create_graph=True)
    (y2.sum() + g_a2.square().sum() + g_x2.square().sum()).backward()
    for got, want, what in ((x.grad, x2.grad, "x"), (a.grad, a2.grad, "A"), (bb.grad, bb2.grad, "B")):
        assert_close(got, want.double(), torch.float32, what)


def test_gradgradcheck_in_float64():
    x, w, b, a, bb, s = make_problem(5, 6, 7, 3, torch.float64)
    fn = lambda x, a, bb: lora_kernels.lora_linear(x, w, b, a, bb, s, backend="reference")  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (leaf(x), leaf(a), leaf(bb)))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"] or ["reference"])
def test_multi_adapter_batch_second_derivatives_and_trainable_base(backend):
    x = torch.randn(6, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(12, 16, device=DEVICE, requires_grad=True)  # a trainable base gets its true gradient
    A = torch.randn(2, 3, 16, device=DEVICE, requires_grad=True)
    B = torch.randn(2, 12, 3, device=DEVICE, requires_grad=True)
    ids = torch.tensor([0, 1, -1, 1, 0, 0], device=DEVICE)
    y = lora_kernels.lora_linear_multi(x, w, None, A, B, [0.5, 2.0], ids, backend=backend)
    (g_a,) = torch.autograd.grad(y.square().sum(), (A,), create_graph=True)
    (y.sum() + g_a.square().sum()).backward()
    refs = [leaf(t) for t in (x, w, A, B)]
    y2 = lora_kernels.lora_linear_multi_reference(*refs[:2], None, *refs[2:], torch.tensor([0.5, 2.0]), ids)
    (g_a2,) = torch.autograd.grad(y2.square().sum(), (refs[2],), create_graph=True)
    (y2.sum() + g_a2.square().sum()).backward()
    for got, want, what in zip((x, w, A, B), refs, ("x", "W", "A", "B")):
        assert got.grad is not None, what
        assert_close(got.grad, want.grad.double(), torch.float32, what)


# ---- torch.func --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_grad_vmap_jacrev(backend):
    x, w, b, a, bb, s = make_problem(4, 10, 6, 2, torch.float32)
    f = lambda x, a: lora_kernels.lora_linear(x, w, b, a, bb, s, backend=backend)  # noqa: E731
    ref = lambda x, a: lora_kernels.lora_linear_reference(x, w, b, a, bb, s)  # noqa: E731
    loss = lambda fn: lambda x, a: fn(x, a).square().sum()  # noqa: E731
    for got, want in zip(
        torch.func.grad(loss(f), argnums=(0, 1))(x, a), torch.func.grad(loss(ref), argnums=(0, 1))(x, a)
    ):
        assert_close(got, want.double(), torch.float32, "grad")
    assert_close(
        torch.func.vmap(f, in_dims=(0, None))(x.unsqueeze(1), a), ref(x, a).unsqueeze(1).double(), torch.float32, "vmap"
    )
    assert_close(
        torch.func.jacrev(f, argnums=1)(x, a), torch.func.jacrev(ref, argnums=1)(x, a).double(), torch.float32, "jacrev"
    )


# ---- arguments: consistent rules, errors that name them ----------------------------------------


def test_scale_that_requires_grad_is_refused_and_number_tensors_are_accepted():
    x, w, b, a, bb, s = make_problem(3, 8, 5, 2, torch.float32)
    with pytest.raises(TypeError, match="scale is a tensor that requires grad"):
        lora_kernels.lora_linear(x, w, b, a, bb, torch.tensor(2.0, requires_grad=True))
    want = lora_kernels.lora_linear(x, w, b, a, bb, 2.0)
    torch.testing.assert_close(lora_kernels.lora_linear(x, w, b, a, bb, torch.tensor(2.0)), want)
    torch.testing.assert_close(lora_kernels.lora_linear(x, w, b, a, bb, np.float32(2.0), np.float64(0.0)), want)
    torch.testing.assert_close(lora_kernels.lora_linear(x, w, b, a, bb, 2.0, torch.tensor(0.0)), want)
    with pytest.raises(TypeError, match="dropout_p is a tensor that requires grad"):
        lora_kernels.lora_linear(x, w, b, a, bb, 2.0, torch.tensor(0.1, requires_grad=True))
    with pytest.raises(ValueError, match="dropout_p must be in"):
        lora_kernels.lora_linear(x, w, b, a, bb, 2.0, 1.0)


def test_layer_arguments_are_checked_by_name():
    layer = lora_kernels.LoRALinear(8, 4, r=np.int64(2), alpha=np.float32(4.0))
    assert layer.r == 2 and type(layer.r) is int and layer.scaling == 2.0
    for kwargs, error, words in [
        (dict(alpha="16"), TypeError, "alpha must be a real number"),
        (dict(alpha=None), TypeError, "alpha must be a real number"),
        (dict(alpha=float("nan")), ValueError, "alpha must be finite"),
        (dict(dropout=None), TypeError, "dropout must be a number"),
        (dict(dropout=1.0), ValueError, "dropout must be in"),
        (dict(r=0), ValueError, "r must be a positive integer"),
        (dict(r=2.0), ValueError, "r must be a positive integer"),
        (dict(backend="fast"), ValueError, "backend must be one of"),
    ]:
        with pytest.raises(error, match=words):
            lora_kernels.LoRALinear(8, 4, **kwargs)
    with pytest.raises(TypeError, match="target_modules must be a regex string or a list"):
        lora_kernels.inject_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), None)
    with pytest.raises(TypeError, match="adapter_names must be a list of adapter names"):
        layer.eval()(torch.randn(2, 3, 8), adapter_names="default")


# ---- inject_lora, merge and the state dict --------------------------------------------------------


def test_inject_lora_twice_never_wraps_the_adapters():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    assert lora_kernels.inject_lora(model, r".*", r=2) == ["0", "2"]
    keys = set(model.state_dict())
    for target in (r".*", ["0", "2"]):
        with pytest.raises(ValueError, match=r"matched only modules that are LoRA layers already \(0, 2\)"):
            lora_kernels.inject_lora(model, target, r=2)
    assert set(model.state_dict()) == keys and all(
        type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith(("lora_A", "lora_B"))
    )


def test_merged_state_travels_with_the_state_dict():
    torch.manual_seed(0)
    layer = lora_kernels.LoRALinear(8, 6, r=2)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 8)
    want = layer(x)
    state = copy.deepcopy(layer.merge().state_dict())
    assert state["lora_merged"].item() is True
    fresh = lora_kernels.LoRALinear(8, 6, r=2)
    fresh.load_state_dict(state)  # strict: the key is consumed
    assert fresh.merged
    torch.testing.assert_close(fresh(x), want)  # the adapter is not added a second time
    torch.testing.assert_close(fresh.unmerge()(x), want)
    unmerged = fresh.state_dict()
    assert "lora_merged" not in unmerged
    layer.load_state_dict(unmerged)  # an unmerged weight loaded into the merged layer: unmerged now
    assert not layer.merged
    torch.testing.assert_close(layer(x), want)
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.load_state_dict(lora_kernels.lora_state_dict(fresh), strict=False)


def test_training_a_merged_layer_warns():
    layer = lora_kernels.LoRALinear(8, 6, r=2).merge().train()
    with pytest.warns(UserWarning, match="adapters get no gradient"):
        layer(torch.randn(2, 8))


# ---- numerics --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_inf_in_x_gives_what_float64_gives(backend):
    x, w, b, a, bb, s = make_problem(6, 40, 24, 3, torch.float32)
    x[1, 5] = float("inf")
    x[4, 0] = -float("inf")
    x.requires_grad_()
    y = lora_kernels.lora_linear(x, w, b, a, bb, s, backend=backend)
    ref = lora_kernels.lora_linear_reference(x.double(), w.double(), b.double(), a.double(), bb.double(), s)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isposinf(y), torch.isposinf(ref))
    finite = torch.isfinite(ref)
    assert_close(y[finite], ref[finite], torch.float32, "finite outputs")
    assert torch.isfinite(y[[0, 2, 3, 5]]).all()  # rows without inf are untouched


# ---- PEFT ---------------------------------------------------------------------------------------

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from test_peft_compat import TARGETS, peft_model, randomize_lora  # noqa: E402


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


def ids_for_test():
    return torch.randint(0, 128, (2, 10), device=DEVICE)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_load_peft_adapter_with_biases(bias, tmp_path):
    def model():
        return tiny_hf_model("llama", attention_bias=True)

    trained = peft.get_peft_model(model(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], bias=bias))
    randomize_lora(trained)
    with torch.no_grad():
        for name, p in trained.named_parameters():  # the biases PEFT saves with this setting
            if name.endswith("bias") and (bias == "all" or "base_layer" in name):
                p.normal_()
    trained.save_pretrained(tmp_path)
    ids = ids_for_test()
    ours = model()
    lora_kernels.load_peft_adapter(ours, tmp_path)
    torch.testing.assert_close(ours(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="not per adapter"):
        lora_kernels.load_peft_adapter(model(), tmp_path, adapter_name="other")


def test_load_peft_adapter_with_modules_to_save(tmp_path):
    trained = peft_model("llama", modules_to_save=["lm_head"])
    with torch.no_grad():
        trained.base_model.model.lm_head.modules_to_save["default"].weight.normal_()
    trained.save_pretrained(tmp_path)
    ids = ids_for_test()
    ours = tiny_hf_model("llama")
    lora_kernels.load_peft_adapter(ours, tmp_path)
    torch.testing.assert_close(ours(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_load_peft_adapter_refuses_tensors_it_cannot_place(tmp_path):
    from safetensors.torch import load_file, save_file

    peft_model("llama").save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    state["base_model.model.model.norm.unknown_thing"] = torch.zeros(3)
    save_file(state, tmp_path / "adapter_model.safetensors")
    model = tiny_hf_model("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="match no parameter of the model: model.norm.unknown_thing"):
        lora_kernels.load_peft_adapter(model, tmp_path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing half-loaded


def test_save_peft_adapter_takes_its_options_by_keyword(tmp_path):
    model = tiny_hf_model("llama")
    lora_kernels.inject_lora(model, TARGETS["llama"], r=4)
    with pytest.raises(TypeError):
        lora_kernels.save_peft_adapter(model, tmp_path, "other")
    lora_kernels.save_peft_adapter(model, tmp_path, base_model_name_or_path="my-base")
    import json

    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "my-base"


def test_patched_layers_look_like_peft_and_pickle(tmp_path):
    model = peft_model("llama")
    ids = ids_for_test()
    want = model(input_ids=ids).logits
    status_before = [(s.name, s.module_type) for s in model.get_layer_status()]
    reprs = [repr(m) for m in lora_layers(model)]
    lora_kernels.patch_peft(model)
    assert [repr(m) for m in lora_layers(model)] == reprs and reprs[0].startswith("lora.Linear(")
    assert [(s.name, s.module_type) for s in model.get_layer_status()] == status_before
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    for other in (loaded, copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(other(input_ids=ids).logits, want)
        assert lora_kernels.unpatch_peft(other) == len(lora_layers(other)), "patched layers stay patched"


def test_base_layer_hooks_run(monkeypatch):
    """PEFT calls base_layer(x): its hooks run, so a patched layer with hooks takes PEFT's path."""
    model = peft_model("llama")
    ids = ids_for_test()
    base = lora_layers(model)[0].get_base_layer()
    calls = []
    base.register_forward_pre_hook(lambda m, args: calls.append(1) or (args[0] * 2,))
    want = model(input_ids=ids).logits
    lora_kernels.patch_peft(model)
    got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want)
    assert len(calls) == 2
    report = lora_kernels.explain(model)
    assert report[0].backend == "peft" and "hooks" in report[0].why and all(r.backend != "peft" for r in report[1:])


@pytest.mark.parametrize("where", ["backward hook on lora_A", "forward replaced on lora_B", "global backward hook"])
def test_adapter_hooks_and_replaced_forwards_run(where):
    """PEFT calls lora_A and lora_B as modules: a backward hook there, or a forward replaced on the
    instance, runs under PEFT, so the patched layer takes PEFT's path (the fused call would skip it)."""
    model = peft_model("llama")
    ids = ids_for_test()
    layer = lora_layers(model)[0]
    calls = []
    handle = None
    if where == "backward hook on lora_A":
        layer.lora_A["default"].register_full_backward_hook(lambda m, gi, go: calls.append(1))
    elif where == "forward replaced on lora_B":
        plain = layer.lora_B["default"].forward
        layer.lora_B["default"].forward = lambda x: calls.append(1) or 3 * plain(x)
    else:
        handle = torch.nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: calls.append(1))
    try:
        want = model(input_ids=ids).logits
        want.sum().backward()
        calls_unpatched = len(calls)
        assert calls_unpatched > 0
        lora_kernels.patch_peft(model)
        got = model(input_ids=ids).logits
        got.sum().backward()
        torch.testing.assert_close(got, want)
        assert len(calls) == 2 * calls_unpatched
        report = lora_kernels.explain(model)
        assert report[0].backend == "peft" and "hooks" in report[0].why
        if where != "global backward hook":
            assert all(r.backend != "peft" for r in report[1:])
    finally:
        if handle is not None:
            handle.remove()


def test_accelerate_cpu_offload():
    accelerate = pytest.importorskip("accelerate")
    model = peft_model("llama")
    ids = ids_for_test()
    want = model(input_ids=ids).logits
    accelerate.cpu_offload(model, execution_device=torch.device(DEVICE))
    assert any(p.device.type == "meta" for p in model.parameters())  # weights live in the hooks' store
    lora_kernels.patch_peft(model)
    torch.testing.assert_close(model(input_ids=ids).logits, want)


def test_users_subclass_that_overrides_forward_keeps_its_forward(caplog):
    class Doubled(peft.tuners.lora.layer.Linear):
        def forward(self, x, *args, **kwargs):
            return 2 * super().forward(x, *args, **kwargs)

    model = tiny_hf_model("llama")
    config = peft.LoraConfig(r=4, target_modules=["q_proj"])
    config._register_custom_module({torch.nn.Linear: Doubled})
    model = peft.get_peft_model(model, config)
    randomize_lora(model)
    ids = ids_for_test()
    want = model(input_ids=ids).logits
    with caplog.at_level("WARNING", logger="lora_kernels"):
        assert lora_kernels.patch_peft(model) == 0
    assert "overrides lora.Linear.forward" in caplog.text
    torch.testing.assert_close(model(input_ids=ids).logits, want)


def test_adapters_changed_after_patching_are_judged_again():
    model = peft_model("llama")
    n = len(lora_layers(model))
    assert lora_kernels.patch_peft(model) == n
    model.add_adapter("dora", peft.LoraConfig(r=4, target_modules=TARGETS["llama"], use_dora=True))
    randomize_lora(model)
    model.set_adapter("dora")
    ids = ids_for_test()
    got = model(input_ids=ids).logits
    assert all(r.backend == "peft" and "variant" in r.why for r in lora_kernels.explain(model))
    assert lora_kernels.patch_peft(model) == 0  # a second call re-checks, and switches them back
    assert all(type(m) is peft.tuners.lora.layer.Linear for m in lora_layers(model))
    torch.testing.assert_close(model(input_ids=ids).logits, got)
    model.set_adapter("default")
    assert lora_kernels.patch_peft(model) == 0  # DoRA adapters are still on the layers


def test_quantized_base_weights_stay_on_peft_path():
    class Quantized(torch.Tensor):  # stands in for torchao's and bitsandbytes' weight subclasses
        pass

    model = peft_model("llama")
    base = lora_layers(model)[0].get_base_layer()
    base.weight = torch.nn.Parameter(base.weight.detach().as_subclass(Quantized), requires_grad=False)
    assert type(base.weight) is not torch.nn.Parameter
    assert lora_kernels.patch_peft(model) == len(lora_layers(model)) - 1
    assert "not a plain tensor" in lora_kernels.explain(model)[0].why


def test_valid_peft_configs_the_op_refuses_run_on_peft_path():
    model = peft_model("llama", lora_dropout=1.0)  # nn.Dropout(p=1): valid in PEFT, not in lora_linear
    model.train()
    ids = ids_for_test()
    torch.manual_seed(0)
    want = model(input_ids=ids).logits
    lora_kernels.patch_peft(model)
    torch.manual_seed(0)
    torch.testing.assert_close(model(input_ids=ids).logits, want)
    assert all(r.backend == "peft" and "dropout_p" in r.why for r in lora_kernels.explain(model))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_gives_a_trainable_base_weight_its_gradient(backend):
    model = peft_model("llama")
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS["llama"]))
    randomize_lora(model)
    model.eval()
    layer = lora_layers(model)[0]
    layer.get_base_layer().weight.requires_grad_(True)
    ids = torch.randint(0, 128, (3, 8), device=DEVICE)
    names = ["default", "other", "__base__"]

    def grad():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, adapter_names=names).logits.square().mean().backward()
        return layer.get_base_layer().weight.grad

    want = grad()
    lora_kernels.patch_peft(model, backend=backend)
    got = grad()
    assert got is not None
    assert_close(got, want.double(), torch.float32, "base weight gradient")
