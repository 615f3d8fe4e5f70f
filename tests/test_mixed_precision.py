"""Mixed precision as users run it: fp32 adapters on a 16-bit base, torch.autocast, GradScaler, the
HF Trainer, gradient checkpointing with dropout; and that no layer falls back silently."""

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    BACKENDS,
    DEVICE,
    KERNEL_BACKENDS,
    assert_close,
    backend_contract_vs_float64,
    make_problem,
    reference_grads,
    tiny_hf_model,
)

import lora_kernels

HALF = [torch.bfloat16, torch.float16]
SHAPES = [(1, 40, 24, 8), (37, 70, 50, 12), (33, 48, 65, 64)]
OPS = {"reference": lora_kernels.reference}
if "triton" in KERNEL_BACKENDS:
    OPS["triton"] = lora_kernels.triton
if "cuda" in KERNEL_BACKENDS:
    OPS["cuda"] = lora_kernels.cuda


def leaf(t):
    return t.detach().clone().requires_grad_()


# ---- fp32 adapters on a 16-bit base (PEFT's default) -------------------------------------------


@pytest.mark.parametrize("backend", list(OPS))
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backend_contract_with_fp32_adapters(backend, dtype, shape, poison):
    """Every output of a backend's forward and backward against float64; dA, dB in fp32."""
    backend_contract_vs_float64(OPS[backend], *shape, dtype, adapter_dtype=torch.float32)


@pytest.mark.parametrize("backend", list(OPS))
def test_backend_contract_with_fp32_adapters_and_fused_dropout(backend):
    if not getattr(OPS[backend], "FUSED_DROPOUT", False):
        pytest.skip("the reference backend's dropout is a mask lora_linear applies")
    backend_contract_vs_float64(OPS[backend], 21, 40, 36, 8, torch.bfloat16, dropout_p=0.3, adapter_dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_lora_linear_with_fp32_adapters(backend, dtype, dropout_p, poison):
    """y and dX in x's dtype, dA and dB in fp32, all against float64 of the same stored values."""
    x, w, b, a, bb, s = make_problem(23, 56, 40, 8, dtype)
    x, a, bb, b = leaf(x), leaf(a.float()), leaf(bb.float()), leaf(b)
    torch.manual_seed(7)
    y = lora_kernels.lora_linear(x, w, b, a, bb, s, dropout_p=dropout_p, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert y.dtype == dtype and x.grad.dtype == dtype and b.grad.dtype == dtype
    assert a.grad.dtype == torch.float32 and bb.grad.dtype == torch.float32
    if dropout_p:  # the mask itself is checked against reference.dropout_keep in test_function.py
        assert torch.isfinite(y).all() and torch.isfinite(a.grad).all()
        return
    refs = reference_grads(x, w, b, a, bb, s, dy)
    for out, ref, what in zip((y, x.grad, a.grad, bb.grad, b.grad), refs, ("y", "dx", "dA", "dB", "dbias")):
        assert_close(out, ref, dtype, what)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_adapters_keep_nothing_extra_for_backward(backend):
    """Nothing M×K or M×N beyond what the 16-bit case keeps: x, W₀ and A, B by reference, xa (M×r)."""
    from test_memory_determinism import saved_storages

    M, K, N, r = 64, 48, 96, 4
    x, w, b, a, bb, s = make_problem(M, K, N, r, torch.bfloat16)
    x, a, bb = leaf(x), leaf(a.float()), leaf(bb.float())
    saved = saved_storages(lambda: lora_kernels.lora_linear(x, w, b, a, bb, s, backend=backend))
    inputs = {t.untyped_storage().data_ptr() for t in (x, w, a, bb)}
    assert inputs <= set(saved)
    extra = sorted(n for ptr, n in saved.items() if ptr not in inputs)
    assert extra == [M * r * 2], extra


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_adapter_batch_with_fp32_adapters(backend):
    x, w, b, _, _, _ = make_problem(10, 40, 24, 4, torch.bfloat16)
    A = torch.randn(3, 4, 40, device=DEVICE, requires_grad=True)
    B = torch.randn(3, 24, 4, device=DEVICE, requires_grad=True)
    ids = torch.tensor([0, 1, 2, -1, 0, 1, 2, 2, -1, 0], device=DEVICE)
    y = lora_kernels.lora_linear_multi(x, w, b, A, B, [0.5, 1.0, 2.0], ids, backend=backend)
    y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16 and A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32
    ref = lora_kernels.lora_linear_multi_reference(
        x.double(), w.double(), b.double(), A.double(), B.double(), torch.tensor([0.5, 1.0, 2.0]), ids
    )
    assert_close(y, ref, torch.bfloat16, "y")


# ---- bad mixes get clear errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    "which, dtypes, names",
    [
        ("weight", dict(weight=torch.float32), ["weight", "float32", "bfloat16"]),
        ("bias", dict(bias=torch.float32), ["bias", "float32"]),
        ("lora_B", dict(lora_B=torch.bfloat16), ["lora_A", "lora_B", "float32", "bfloat16"]),
        ("adapters", dict(lora_A=torch.float64, lora_B=torch.float64), ["lora_A", "float64"]),
    ],
)
def test_bad_dtype_mixes_name_the_arguments(which, dtypes, names):
    x, w, b, a, bb, s = make_problem(5, 16, 8, 2, torch.bfloat16)
    args = dict(weight=w, bias=b, lora_A=a.float(), lora_B=bb.float())
    args.update({k: args[k].to(v) for k, v in dtypes.items()})
    with pytest.raises(TypeError) as err:
        lora_kernels.lora_linear(x, args["weight"], args["bias"], args["lora_A"], args["lora_B"], s)
    assert all(n in str(err.value) for n in names), str(err.value)


def test_16_bit_adapters_on_an_fp32_x_are_refused_outside_autocast():
    x, w, b, a, bb, s = make_problem(5, 16, 8, 2, torch.float32)
    with pytest.raises(TypeError, match="lora_A and lora_B have dtype torch.bfloat16 but x has dtype torch.float32"):
        lora_kernels.lora_linear(x, w, b, a.bfloat16(), bb.bfloat16(), s)


# ---- torch.autocast -----------------------------------------------------------------------------


def autocast_dtypes():
    return [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amp", autocast_dtypes(), ids=str)
def test_lora_linear_under_autocast_computes_in_its_dtype(backend, amp):
    """fp32 tensors under autocast: y in the autocast dtype (as nn.Linear), every gradient in its
    tensor's own dtype (fp32), values against float64 within the autocast dtype's bound."""
    x, w, b, a, bb, s = make_problem(19, 48, 40, 8, torch.float32)
    x, a, bb, b = leaf(x), leaf(a), leaf(bb), leaf(b)
    with torch.autocast(DEVICE, dtype=amp):
        y = lora_kernels.lora_linear(x, w, b, a, bb, s, backend=backend)
        assert y.dtype == F.linear(x, w, b).dtype == amp
    dy = torch.randn_like(y)
    y.backward(dy)
    assert all(t.grad.dtype == torch.float32 for t in (x, a, bb, b))
    refs = reference_grads(x, w, b, a, bb, s, dy)
    for out, ref, what in zip((y, x.grad, a.grad, bb.grad, b.grad), refs, ("y", "dx", "dA", "dB", "dbias")):
        assert_close(out, ref, amp, what)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_layer_under_autocast_matches_peft_style_code(backend):
    """LoRALinear under autocast against the unfused layer under the same autocast."""
    torch.manual_seed(0)
    layer = lora_kernels.LoRALinear(48, 40, r=8, alpha=16, backend=backend).to(DEVICE)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(2, 9, 48, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = layer(x)
        ref = F.linear(x, layer.weight, layer.bias) + layer.scaling * layer.lora_B(layer.lora_A(x))
    assert y.dtype == ref.dtype == torch.bfloat16
    assert_close(y, ref.double(), torch.bfloat16, "y")
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32


def test_lora_layer_on_the_meta_device():
    layer = lora_kernels.LoRALinear(16, 8, r=2, device="meta")
    assert layer(torch.empty(3, 16, device="meta")).shape == (3, 8)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "triton"])
def test_custom_ops_under_autocast_cast_activations_and_keep_fp32_adapters(backend):
    """Called directly under autocast (as a compiled graph calls them), the ops compute in the
    autocast dtype and read fp32 adapters as they are, as lora_linear does."""
    x, w, b, a, bb, s = make_problem(9, 40, 24, 8, torch.float32)
    forward = getattr(torch.ops.lora_kernels, f"{backend}_forward")
    backward = getattr(torch.ops.lora_kernels, f"{backend}_backward")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y, xa = forward(x, w, b, a, bb, s, None)
        dx, da, db, g = backward(torch.randn(9, 24, device=DEVICE), x, w, a, bb, xa, s, True)
    assert y.dtype == xa.dtype == dx.dtype == g.dtype == torch.bfloat16
    assert da.dtype == db.dtype == torch.float32
    assert_close(
        y,
        lora_kernels.lora_linear_reference(x.double(), w.double(), b.double(), a.double(), bb.double(), s),
        torch.bfloat16,
        "y",
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_under_autocast(backend, compiler):
    from conftest import lora_mlp

    torch._dynamo.reset()
    model = lora_mlp(backend=backend)
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    x = torch.randn(3, 5, 32, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y_eager = model(x)
        y = compiled(x)
    assert y.dtype == y_eager.dtype == torch.bfloat16
    assert_close(y, y_eager.double(), torch.bfloat16, "y")
    y.float().square().mean().backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_autocast_with_grad_scaler(backend):
    """GradScaler trains, and an overflow in the scaled fp16 gradients is found (the step skipped,
    the scale lowered) without a crash."""
    from conftest import lora_mlp

    model = lora_mlp(backend=backend)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    # 2⁴⁰ overflows the fp16 gradients on the first step; the backoff then lands on 2⁸, which fits
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**40, backoff_factor=2.0**-32)
    x, target = torch.randn(8, 32, device=DEVICE), torch.randn(8, 32, device=DEVICE)
    scales, losses = [], []
    for _ in range(4):
        opt.zero_grad()
        with torch.autocast(DEVICE, dtype=torch.float16):
            loss = F.mse_loss(model(x).float(), target)
        before = [p.detach().clone() for p in params]
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        losses.append(loss.item())
        if len(scales) == 1:
            assert all(torch.equal(p, q) for p, q in zip(params, before)), "the overflowing step must be skipped"
    assert scales == [2.0**8] * 4 and losses[-1] < losses[1]  # the overflow found once, then it trains


# ---- PEFT's default: fp32 adapters on a bf16 base, and PEFT under autocast ----------------------

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


TARGETS = {"gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "v_proj", "down_proj"]}


def peft_model(kind, dtype=torch.float32, dropout=0.0, **config):
    """PEFT's defaults (autocast_adapter_dtype=True: fp32 adapters on a 16-bit base), B non-zero."""
    model = peft.get_peft_model(
        tiny_hf_model(kind, dtype),
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=TARGETS[kind],
            lora_dropout=dropout,
            fan_in_fan_out=kind == "gpt2",
            **config,
        ),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


def logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    logits.float().square().mean().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_as_accurate_as_peft(ours, baselines, exact, dtype, what):
    """Whole-model results against the float64 model: within the dtype's bound, or twice the error
    of unpatched PEFT's own results (``baselines``), whichever is larger. Two layers of a 16-bit
    model round more than one op does; PEFT's default computes the LoRA branch in fp32 (an fp32 copy
    of x), under autocast in the 16-bit dtype, as ours does."""
    from conftest import REL_TOL, rel_err

    peft_err = max(rel_err(b, exact) for b in baselines)
    bound = max(REL_TOL[dtype], 2 * peft_err)
    err = rel_err(ours, exact)
    assert err <= bound, f"{what}: relative error {err:.2e} against float64 > {bound:.2e} (PEFT: {peft_err:.2e})"


def compare_with_peft(model, patch_backend, ids, dtype, autocast=None):
    """Logits and gradients of the patched model against unpatched PEFT and the float64 model. On
    a 16-bit model outside autocast, PEFT under autocast to the model's dtype is a second baseline
    (the computation the fused op does)."""
    import contextlib
    import copy

    exact_logits, exact_grads = logits_and_grads(copy.deepcopy(model).double(), ids)
    amp = lambda dt: torch.autocast(DEVICE, dtype=dt) if dt else contextlib.nullcontext()
    with amp(autocast):
        baselines = [logits_and_grads(model, ids)]
    if autocast is None and dtype != torch.float32:
        with amp(dtype):
            baselines.append(logits_and_grads(model, ids))
    lora_kernels.patch_peft(model, backend=patch_backend)
    with amp(autocast):
        logits, grads = logits_and_grads(model, ids)
    assert logits.dtype == baselines[0][0].dtype
    assert_as_accurate_as_peft(logits, [b[0] for b in baselines], exact_logits, dtype, "logits")
    assert grads.keys() == baselines[0][1].keys() == exact_grads.keys() and grads
    for name in grads:
        assert grads[name].dtype == baselines[0][1][name].dtype == torch.float32
        assert_as_accurate_as_peft(grads[name], [b[1][name] for b in baselines], exact_grads[name], dtype, name)
    return logits


def spy_on_peft_forward(monkeypatch):
    """Count calls of PEFT's own lora.Linear.forward (the patched layers' fallback)."""
    calls = []
    real = peft.tuners.lora.layer.Linear.forward
    monkeypatch.setattr(
        peft.tuners.lora.layer.Linear, "forward", lambda self, *a, **k: calls.append(self) or real(self, *a, **k)
    )
    return calls


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_peft_default_on_a_16_bit_base_is_fused_for_every_layer(kind, backend, dtype, monkeypatch):
    """get_peft_model keeps fp32 adapters on a bf16/fp16 base: every targeted layer runs our op (no
    call reaches PEFT's forward), logits and gradients track unpatched PEFT, grads stay fp32."""
    model = peft_model(kind, dtype)
    layers = lora_layers(model)
    assert layers and all(m.lora_A["default"].weight.dtype == torch.float32 for m in layers)
    ids = torch.randint(0, 128, (2, 10), device=DEVICE)
    peft_calls = spy_on_peft_forward(monkeypatch)
    kernel_calls = []
    if backend == "triton":
        real = lora_kernels.triton.forward
        monkeypatch.setattr(lora_kernels.triton, "forward", lambda *a, **k: kernel_calls.append(1) or real(*a, **k))
    logits = compare_with_peft(model, backend, ids, dtype)
    assert logits.dtype == dtype
    on_these_layers = [c for c in peft_calls if any(c is m for m in layers)]  # not the float64 copy's
    assert len(on_these_layers) == 2 * len(layers), "PEFT's own forward ran beyond the unpatched baselines"
    report = lora_kernels.explain(model)
    assert len(report) == len(layers) and all(r.backend == backend for r in report), str(report)
    if backend == "triton":
        assert len(kernel_calls) == len(layers) and all(r.fused for r in report)
    assert lora_kernels.patch_peft(model, backend=backend) == len(layers)  # counted as fused


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_peft_under_autocast_matches_unpatched(kind, backend):
    """An fp32 PEFT model under bf16 autocast (Trainer(bf16=True)): fused, as accurate as PEFT."""
    model = peft_model(kind)
    logits = compare_with_peft(
        model, backend, torch.randint(0, 128, (2, 10), device=DEVICE), torch.bfloat16, autocast=torch.bfloat16
    )
    assert logits.dtype == torch.bfloat16
    assert all(r.backend == backend for r in lora_kernels.explain(model))


def test_lora_conv1d_under_autocast():
    model = tiny_hf_model("gpt2")
    lora_kernels.inject_lora(model, ["c_attn"], r=4, alpha=8)
    layer = model.get_submodule("transformer.h.0.attn.c_attn")
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(5, 64, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = layer(x)
    ref = (
        x.double() @ layer.weight.double()
        + layer.bias.double()
        + layer.scaling * (x.double() @ layer.lora_A.weight.double().t()) @ layer.lora_B.weight.double().t()
    )
    assert y.dtype == torch.bfloat16
    assert_close(y, ref, torch.bfloat16, "conv1d under autocast")


def test_patch_peft_counts_only_layers_that_will_fuse(caplog):
    """bf16 adapters on an fp32 base fuse only under autocast: switched, not counted, said why."""
    model = peft_model("llama")
    layers = lora_layers(model)
    for m in layers[:2]:
        m.lora_A["default"].to(torch.bfloat16)
        m.lora_B["default"].to(torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="lora_kernels"):
        assert lora_kernels.patch_peft(model) == len(layers) - 2
    summary = caplog.records[-1].getMessage()
    assert f"{len(layers) - 2} of {len(layers)} LoRA layers fused" in summary and "autocast (2)" in summary


def test_a_call_that_falls_back_is_logged_once_per_layer_and_explained(caplog):
    model = peft_model("llama")
    lora_kernels.patch_peft(model)
    layer = lora_layers(model)[0]
    layer.lora_A["default"].to(torch.bfloat16)
    layer.lora_B["default"].to(torch.bfloat16)  # bf16 adapters, fp32 x: PEFT casts, we do not
    ids = torch.randint(0, 128, (1, 6), device=DEVICE)
    with caplog.at_level(logging.WARNING, logger="lora_kernels"):
        for _ in range(3):
            model(input_ids=ids)
    lines = [r.getMessage() for r in caplog.records if "not a fused kernel" in r.getMessage()]
    assert len(lines) == 1 and "q_proj" in lines[0] and "bfloat16" in lines[0], lines
    report = {r.name: r for r in lora_kernels.explain(model)}
    row = report["base_model.model.model.layers.0.self_attn.q_proj"]
    assert row.backend == "peft" and not row.fused and "dtype" in row.why
    assert "LoRA layers fused on their last call" in str(lora_kernels.explain(model))


# ---- gradient checkpointing with dropout --------------------------------------------------------


# every_n_layers: some layers checkpointed, some not; offload: the checkpoints' saved inputs kept in
# pinned host memory (torch's save_on_cpu) until the backward
CHECKPOINTING_OPTIONS = [
    pytest.param({}, id="every-layer"),
    pytest.param({"offload": True, "every_n_layers": 2}, id="offload-every-2nd"),
]


def enable_checkpointing(model, reentrant, options):
    """transformers' activation checkpointing, by its current name where it has one (renamed after 5.17,
    the old name kept as a deprecated alias), with the options that both names take."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant}, **options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant}, **options)
    model.enable_input_require_grads()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("options", CHECKPOINTING_OPTIONS)
def test_gradient_checkpointing_redraws_the_same_dropout_mask(backend, reentrant, options):
    """HF gradient checkpointing over a patched PEFT model with lora_dropout > 0: the recomputed
    forward draws the forward's mask, so the gradients equal those of the run without it."""

    def grads(checkpointing):
        model = peft_model("llama", dropout=0.3)
        lora_kernels.patch_peft(model, backend=backend)
        model.train()
        if checkpointing:
            enable_checkpointing(model, reentrant, options)
        torch.manual_seed(123)
        ids = torch.randint(0, 128, (2, 10), device=DEVICE)
        return logits_and_grads(model, ids)[1]

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


# ---- the HF Trainer ---------------------------------------------------------------------------


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, 128, (16, 12), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer_losses(tmp_path, patch_backend=None, **precision):
    model = peft_model("llama")
    if patch_backend:
        lora_kernels.patch_peft(model, backend=patch_backend)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=2e-2,
        logging_steps=1,
        use_cpu=DEVICE == "cpu",
        report_to=[],
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        **precision,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset())
    trainer.train()
    if patch_backend:
        assert all(r.backend == patch_backend for r in lora_kernels.explain(model))
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_hf_trainer_tracks_unpatched_peft(backend, precision, tmp_path):
    if precision == "fp16" and DEVICE != "cuda":
        pytest.skip("Trainer(fp16=True) needs a GPU")
    ref = trainer_losses(tmp_path / "ref", **{precision: True})
    ours = trainer_losses(tmp_path / "ours", backend, **{precision: True})
    assert len(ours) == len(ref) == 4
    for step, (a, b) in enumerate(zip(ours, ref)):
        assert abs(a - b) <= 1e-2 * abs(b), (step, ours, ref)
