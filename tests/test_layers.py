"""LoRALinear as a drop-in nn.Linear, merge/unmerge, and model surgery."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import BACKENDS, DEVICE, assert_close

import lora_kernels
from lora_kernels import LoRALinear, inject_lora, lora_state_dict, mark_only_lora_as_trainable


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_fresh_layer_equals_wrapped_linear(bias, backend):
    """Zero B: the wrapped layer's output, bit for bit on the reference path (cuBLAS either way);
    a fused kernel sums x·W₀ᵀ in its own order, so there it is equal to fp32 rounding."""
    linear = nn.Linear(40, 24, bias=bias, device=DEVICE)
    layer = LoRALinear.from_linear(linear, r=8, alpha=16, backend=backend)
    x = torch.randn(3, 5, 40, device=DEVICE)
    if backend == "reference":
        assert torch.equal(layer(x), linear(x))
    else:
        assert_close(layer(x), linear(x).double(), torch.float32, "fresh layer")
    assert layer.weight is linear.weight and layer.bias is linear.bias  # wrapped, not copied
    assert isinstance(layer, nn.Linear) and (layer.in_features, layer.out_features) == (40, 24)
    assert not layer.weight.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_sees_parametrized_and_replaced_weights(backend):
    """forward reads its tensors past nn.Module.__getattr__, yet a parametrization
    (torch.nn.utils.parametrize: a property on the class) of W₀ or lora_A, and a parameter
    swapped by torch.func.functional_call, are what it computes with."""
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    layer = LoRALinear(40, 24, r=4, alpha=8, backend=backend, device=DEVICE)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 40, device=DEVICE)
    W, A, B = (t.detach().clone().double() for t in (layer.weight, layer.lora_A.weight, layer.lora_B.weight))
    bias = layer.bias.detach().double()

    def expected(W, A, B):
        return x.double() @ W.t() + bias + layer.scaling * (x.double() @ A.t()) @ B.t()

    parametrize.register_parametrization(layer, "weight", Doubled())
    parametrize.register_parametrization(layer.lora_A, "weight", Doubled())
    assert_close(layer(x), expected(2 * W, 2 * A, B), torch.float32, "parametrized W₀ and A")
    B2 = torch.randn(24, 4, device=DEVICE)
    swapped = torch.func.functional_call(layer, {"lora_B.weight": B2}, (x,))
    assert_close(swapped, expected(2 * W, 2 * A, B2.double()), torch.float32, "functional_call's lora_B")


def test_constructor_like_nn_linear():
    layer = LoRALinear(32, 16, bias=False, r=4, alpha=8, dtype=torch.float64)
    assert layer.bias is None and layer.weight.dtype == torch.float64 and layer.scaling == 2.0
    assert layer.lora_A.weight.shape == (4, 32) and layer.lora_B.weight.shape == (16, 4)
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and torch.count_nonzero(layer.lora_A.weight) > 0
    assert LoRALinear(32, 16, r=4, alpha=8, use_rslora=True).scaling == 4.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_unmerge_round_trip(backend):
    layer = LoRALinear(40, 24, r=8, alpha=16, backend=backend, device=DEVICE)
    nn.init.normal_(layer.lora_B.weight)
    w0 = layer.weight.detach().clone()
    x = torch.randn(7, 40, device=DEVICE)
    y_unmerged = layer(x)
    layer.merge()
    assert layer.merged
    y_merged = layer(x)
    torch.testing.assert_close(y_merged, y_unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_merged, F.linear(x, layer.weight, layer.bias))
    layer.merge()  # idempotent
    layer.unmerge()
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), y_unmerged, rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training():
    layer = LoRALinear(40, 24, r=8, dropout=0.5, device=DEVICE)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(64, 40, device=DEVICE)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_autocast_runs_in_autocast_dtype():
    layer = LoRALinear(40, 24, r=8, device=DEVICE)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 40, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.lora_A.weight.grad.dtype == torch.float32


class TinyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(32, 32)
        self.v_proj = nn.Linear(32, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.norm = nn.LayerNorm(32)

    def forward(self, x):
        return self.mlp(self.norm(self.q_proj(x) + self.v_proj(x)))


def test_inject_by_names_and_by_regex():
    model = nn.Sequential(TinyBlock(), TinyBlock())
    names = inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    assert names == ["0.q_proj", "0.v_proj", "1.q_proj", "1.v_proj"]
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    assert isinstance(model[0].mlp[0], nn.Linear) and not isinstance(model[0].mlp[0], LoRALinear)
    model2 = nn.Sequential(TinyBlock())
    assert inject_lora(model2, r"0\.mlp\.\d+") == ["0.mlp.0", "0.mlp.2"]
    with pytest.raises(ValueError, match="matched no nn.Linear or Conv1D"):
        inject_lora(model2, ["k_proj"])


def test_training_changes_only_lora_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(TinyBlock(), TinyBlock()).to(DEVICE)
    inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    mark_only_lora_as_trainable(model)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(torch.randn(8, 32, device=DEVICE)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if ".lora_A." in k or ".lora_B." in k}


def test_lora_state_dict_keys_are_peft_style():
    model = nn.Sequential(TinyBlock())
    inject_lora(model, ["q_proj"], r=4)
    sd = lora_state_dict(model)
    assert sorted(sd) == ["0.q_proj.lora_A.weight", "0.q_proj.lora_B.weight"]


def test_merge_lora_on_model():
    model = nn.Sequential(TinyBlock()).to(DEVICE)
    inject_lora(model, ["q_proj", "v_proj"], r=4)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B.weight)
    x = torch.randn(3, 32, device=DEVICE)
    y = model(x)
    lora_kernels.merge_lora(model)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
    lora_kernels.unmerge_lora(model)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
