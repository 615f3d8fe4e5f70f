"""LoRA layers under tensor parallelism (lora_kernels.parallel), alone and with FSDP2 on a 2-D mesh:
outputs, dX, the adapters' gradients, a few optimizer steps and the saved adapter equal those of
the same model on one process. The processes use NCCL with a GPU each where the machine has enough
GPUs, else gloo on CPU (the Triton kernels then run only under the interpreter, i.e. without GPU)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from conftest import KERNEL_BACKENDS, assert_close, spawn

import lora_kernels
from lora_kernels.function import draw_dropout_seed

BATCH, STEPS, LR = 8, 3, 0.5


def on_gpus(world) -> bool:
    """Whether ``world`` processes run with NCCL and a GPU each (else gloo, on CPU)."""
    return torch.cuda.device_count() >= world and dist.is_available() and dist.is_nccl_available()


def rank_device(world, rank) -> torch.device:
    return torch.device("cuda", rank) if on_gpus(world) else torch.device("cpu")


def init_process_group(world, rank, init_file) -> torch.device:
    """This process's group and device."""
    device = rank_device(world, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    return device


def backends(world):
    """reference, and the Triton kernels where they run on the processes' tensors: on their own
    GPUs, or on CPU tensors under the interpreter (a machine without a GPU: conftest turns it on)."""
    triton_runs = on_gpus(world) or not torch.cuda.is_available()
    return ["reference"] + [b for b in KERNEL_BACKENDS if b == "triton" and triton_runs]


def make_model(backend, dropout=0.0, kind="ours", device="cpu"):
    """Linear(16→24) colwise, ReLU, Linear(24→16) rowwise; LoRA on both, LoRA and biases trainable,
    B non-zero; the same in every process. Dropout on the colwise layer only (its input is the
    replicated one). kind: "ours" (LoRALinear), "peft" (PEFT's layers, switched by patch_peft) or
    "peft-unpatched"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16))
    if kind == "ours":
        model[0] = lora_kernels.LoRALinear.from_linear(model[0], r=4, alpha=8, dropout=dropout, backend=backend)
        model[2] = lora_kernels.LoRALinear.from_linear(model[2], r=4, alpha=8, backend=backend)
        lora_kernels.mark_only_lora_as_trainable(model)
        biases = model[0].bias, model[2].bias
    else:
        import peft

        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], lora_dropout=dropout)
        model = peft.get_peft_model(model, config)
        layers = model.base_model.model
        layers[2].lora_dropout["default"] = nn.Identity()  # dropout on the colwise layer only, as above
        if kind == "peft":
            assert lora_kernels.patch_peft(model, backend=backend) == 2
        biases = layers[0].base_layer.bias, layers[2].base_layer.bias
    for bias in biases:  # trainable biases: the colwise one sharded, the rowwise one replicated
        bias.requires_grad_(True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model.to(device)  # built on CPU: the same values on every device


PLANS = {  # the two layers' names: ours, and inside a PEFT model
    "ours": ("0", "2"),
    "peft": ("base_model.model.0", "base_model.model.2"),
}


def data(device="cpu"):
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 16, generator=g).to(device), torch.randn(BATCH, 16, generator=g).to(device)


def host(t):
    """A plain CPU copy (the collectives' outputs are tensor subclasses that torch.load refuses)."""
    return t.detach().clone().cpu()


def step_results(model, x, y, world_dp=1, rank_dp=0):
    """One forward/backward on this process's share of the batch, then STEPS SGD steps; the
    values to compare, gathered whole."""
    from lora_kernels.layers import full_tensor

    shard = slice(rank_dp * BATCH // world_dp, (rank_dp + 1) * BATCH // world_dp)
    xs = x[shard].clone().requires_grad_()
    torch.manual_seed(2)  # the dropout seed's draw
    out = model(xs)
    nn.functional.mse_loss(out, y[shard]).backward()
    grads = {n: host(full_tensor(p.grad)) for n, p in model.named_parameters() if p.grad is not None}
    results = {"out": host(out), "dx": host(xs.grad), "grads": grads}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(model(x[shard]), y[shard]).backward()
        opt.step()
    with torch.no_grad():
        results["loss"] = nn.functional.mse_loss(model(x), y).item()
    results["adapter"] = {k: host(v) for k, v in lora_kernels.lora_state_dict(model).items()}
    return results


def save_adapter(model, kind, path, rank):
    """The adapter in PEFT's format: save_peft_adapter for ours, PEFT's save_pretrained given the
    gathered (unsharded) adapter for PEFT's (its own state dict would hold DTensors)."""
    if kind == "ours":
        lora_kernels.save_peft_adapter(model, path)
    else:
        model.save_pretrained(path, state_dict=lora_kernels.lora_state_dict(model), is_main_process=rank == 0)


def scenario_kind(scenario):
    return "peft" if scenario.startswith("peft") else "ours"


def worker(rank, world, init_file, scenario, backend, out_dir):
    device = init_process_group(world, rank, init_file)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from lora_kernels.parallel import ColwiseParallel, RowwiseParallel

    kind = scenario_kind(scenario)
    model = make_model(backend, dropout=0.25 if scenario.endswith("dropout") else 0.0, kind=kind, device=device)
    colwise, rowwise = PLANS[kind]
    plan = {colwise: ColwiseParallel(), rowwise: RowwiseParallel()}
    if scenario.endswith("2d"):  # TP inside, FSDP2 over the data-parallel dimension outside
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (2, world // 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], plan)
        for layer in (model.get_submodule(colwise), model.get_submodule(rowwise)):
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        world_dp, rank_dp = 2, mesh["dp"].get_local_rank()
    else:
        mesh = init_device_mesh(device.type, (world,))
        parallelize_module(model, mesh, plan)
        if kind == "peft":  # a later patch_peft (after adapters change, say) keeps the sharded layers fused
            assert lora_kernels.patch_peft(model, backend=backend) == 2
        world_dp, rank_dp = 1, 0
    x, y = data(device)
    results = step_results(model, x, y, world_dp, rank_dp)
    if not scenario.endswith("dropout"):  # (PEFT's format holds one dropout per adapter; the layers' differ)
        save_adapter(model, kind, os.path.join(out_dir, "adapter"), rank)
    results["explain"] = [(r.name, r.backend, r.fused) for r in lora_kernels.explain(model)]
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def single_process(backend, scenario, world, tmp_path=None):
    """The same model and steps in this process, on the first rank's device. PEFT's layers:
    unpatched PEFT, but with dropout patched on the same backend (the fused kernels' mask comes
    from a seed drawn as under TP)."""
    kind = scenario_kind(scenario)
    dropout = scenario.endswith("dropout")
    if kind == "peft" and not dropout:
        kind = "peft-unpatched"
    device = rank_device(world, 0)
    model = make_model(backend, dropout=0.25 if dropout else 0.0, kind=kind, device=device)
    x, y = data(device)
    if not scenario.endswith("2d"):
        results = step_results(model, x, y)
        if tmp_path is not None and not dropout:
            save_adapter(model, scenario_kind(scenario), str(tmp_path / "single-adapter"), 0)
        return results
    results = [
        step_results(make_model(backend, kind=kind, device=device), x, y, 2, k) for k in range(2)
    ]  # dX, outputs per dp shard
    full = step_results(model, x, y)  # gradients and the trained loss: the full batch, averaged over shards
    full["out"] = torch.cat([r["out"] for r in results])
    full["dx"] = torch.cat([r["dx"] for r in results])
    return full


def run_parallel(tmp_path, scenario, backend, world):
    if not on_gpus(world) and not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    spawn(worker, (world, str(tmp_path / "init"), scenario, backend, str(tmp_path)), nprocs=world)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=what)


@pytest.mark.parametrize("backend", backends(2))
@pytest.mark.parametrize("scenario", ["tp", "tp-dropout", "peft", "peft-dropout"])
def test_tensor_parallel_equals_one_process(backend, scenario, tmp_path):
    if scenario.startswith("peft"):
        pytest.importorskip("peft")
    ranks = run_parallel(tmp_path, scenario, backend, 2)
    single = single_process(backend, scenario, 2, tmp_path)
    if scenario.endswith("dropout") and backend == "reference":
        # the TP reference path draws the fused kernels' mask from the broadcast seed, one process
        # draws bernoulli: compare the ranks with each other (the same mask on both) only
        for name in ranks[0]["grads"]:
            close(ranks[1]["grads"][name], ranks[0]["grads"][name], name)
        close(ranks[1]["out"], ranks[0]["out"], "out")
        return
    for rank in ranks:
        close(rank["out"], single["out"], "out")
        close(rank["dx"], single["dx"], "dX")
        assert rank["grads"].keys() == single["grads"].keys() and len(single["grads"]) == 6
        for name in single["grads"]:
            close(rank["grads"][name], single["grads"][name], name)
        assert abs(rank["loss"] - single["loss"]) <= 1e-5 * single["loss"]
        for key in single["adapter"]:
            close(rank["adapter"][key], single["adapter"][key], key)
        assert [(b, fused) for _, b, fused in rank["explain"]] == [(backend, backend != "reference")] * 2
    if scenario.endswith("dropout"):
        return
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    want = load_file(tmp_path / "single-adapter" / "adapter_model.safetensors")
    assert saved.keys() == want.keys() and len(want) == 4
    for key in want:  # the full adapter, as one process writes it after the same steps
        close(saved[key], want[key], key)


@pytest.mark.parametrize("scenario", ["2d", "peft-2d"])
def test_fsdp2_over_tensor_parallel_trains_to_the_single_process_loss(scenario, tmp_path):
    if scenario.startswith("peft"):
        pytest.importorskip("peft")
    ranks = run_parallel(tmp_path, scenario, "reference", 4)
    single = single_process("reference", scenario, 4)
    for rank in ranks:
        assert abs(rank["loss"] - single["loss"]) <= 1e-5 * single["loss"], (rank["loss"], single["loss"])
        assert [b for _, b, _ in rank["explain"]] == ["reference"] * 2  # the op's path, not PEFT's own forward
        for key in single["adapter"]:
            close(rank["adapter"][key], single["adapter"][key], key)


def test_plain_layers_are_refused_with_torchs_styles_named():
    from lora_kernels.parallel import ColwiseParallel

    with pytest.raises(NotImplementedError, match="use torch's styles for plain layers"):
        ColwiseParallel()._apply(nn.Linear(4, 4), None)


def test_peft_layers_left_on_peft_s_path_are_refused_saying_why():
    pytest.importorskip("peft")
    from lora_kernels.parallel import ColwiseParallel, RowwiseParallel

    model = make_model("reference", kind="peft-unpatched")
    with pytest.raises(NotImplementedError, match="call patch_peft"):
        ColwiseParallel()._apply(model.base_model.model[0], None)
    model = make_model("reference", kind="peft")
    model.base_model.model[2].fan_in_fan_out = True
    with pytest.raises(NotImplementedError, match="Conv1D-style"):
        RowwiseParallel()._apply(model.base_model.model[2], None)


def test_an_adapter_added_after_sharding_is_refused_not_mixed_with_shards():
    """A sharded PEFT layer whose active adapter holds plain tensors (added or loaded after
    parallelize_module) raises, naming the cause, instead of mixing shards and whole tensors."""
    pytest.importorskip("peft")
    from lora_kernels.layers import TP_STYLE

    model = make_model("reference", kind="peft")
    model.base_model.model[0].__dict__[TP_STYLE] = "colwise"  # as the style marks it, but nothing sharded
    with pytest.raises(RuntimeError, match="added or loaded after parallelize_module"):
        model(torch.randn(2, 16))


MIXED_NAMES = ["default", "__base__", "other", "default", "other", "__base__", "default", "other"]


def peft_model_with_two_adapters(kind, device):
    import peft

    model = make_model("reference", kind="peft-unpatched")
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["0", "2"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.other" in name:
                p.normal_(0, 0.3)
    if kind == "peft":
        assert lora_kernels.patch_peft(model, backend="reference") == 2
    return model.to(device).eval()


def mixed_batch_worker(rank, world, init_file, out_dir):
    device = init_process_group(world, rank, init_file)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from lora_kernels.parallel import ColwiseParallel, RowwiseParallel

    model = peft_model_with_two_adapters("peft", device)
    colwise, rowwise = PLANS["peft"]
    plan = {colwise: ColwiseParallel(), rowwise: RowwiseParallel()}
    parallelize_module(model, init_device_mesh(device.type, (world,)), plan)
    x = data(device)[0].requires_grad_()
    out = model(x, adapter_names=MIXED_NAMES)
    out.square().sum().backward()
    results = {
        "out": host(out),
        "dx": host(x.grad),
        "explain": [r.backend for r in lora_kernels.explain(model)],
    }
    with torch.no_grad():  # PEFT's merge and unmerge (its own code on the DTensors)
        model.merge_adapter(["default"])
        results["merged"] = host(model(x))
        model.unmerge_adapter()
        results["unmerged"] = host(model(x))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_peft_mixed_batch_on_sharded_layers_equals_one_process(tmp_path):
    """PEFT's mixed batch (adapter_names=) on sharded layers: one fused multi-adapter call per rank
    on its shards, equal to unpatched PEFT on one process (PEFT's own loop cannot index DTensors);
    then PEFT's merge_adapter / unmerge_adapter on the shards."""
    pytest.importorskip("peft")
    spawn(mixed_batch_worker, (2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    device = rank_device(2, 0)
    model = peft_model_with_two_adapters("peft-unpatched", device)
    x = data(device)[0].requires_grad_()
    out = model(x, adapter_names=MIXED_NAMES)
    out.square().sum().backward()
    with torch.no_grad():
        default = host(model(x))  # the active adapter alone
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        close(got["out"], out.detach().cpu(), "out")
        close(got["dx"], x.grad.cpu(), "dX")
        assert got["explain"] == ["reference", "reference"]
        close(got["merged"], default, "merged")
        close(got["unmerged"], default, "unmerged")


def rowwise_dropout_worker(rank, world, init_file, backend, out_dir):
    device = init_process_group(world, rank, init_file)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from lora_kernels.parallel import RowwiseParallel

    layer, x = rowwise_dropout_problem(backend)
    layer, x = layer.to(device), x.to(device)
    parallelize_module(layer, init_device_mesh(device.type, (world,)), RowwiseParallel())
    shard = x.chunk(world, dim=-1)[rank].clone().requires_grad_()  # torch's rowwise input: this rank's columns
    torch.manual_seed(2)  # every rank's generator alike, the usual set-up
    out = layer(shard)
    out.square().sum().backward()
    grads = {"lora_A": layer.lora_A.weight.grad.to_local(), "lora_B": layer.lora_B.weight.grad.to_local()}
    results = {"out": host(out), "dx": host(shard.grad), **{k: host(v) for k, v in grads.items()}}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def rowwise_dropout_problem(backend):
    torch.manual_seed(0)
    layer = lora_kernels.LoRALinear(16, 8, bias=True, r=4, alpha=8, dropout=0.5, backend=backend)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.3)
    return layer, torch.randn(6, 16)


@pytest.mark.parametrize("backend", backends(2))
def test_rowwise_dropout_draws_each_shard_its_own_mask(backend, tmp_path):
    """A rowwise layer with dropout: rank k drops its columns of x by the mask of the seed its
    generator draws plus k (the fused kernels' draw, reference.dropout_keep), so ranks seeded alike
    do not drop every shard alike; forward and backward use that mask (against float64)."""
    spawn(rowwise_dropout_worker, (2, str(tmp_path / "init"), backend, str(tmp_path)), nprocs=2)
    layer, x = rowwise_dropout_problem(backend)
    torch.manual_seed(2)
    seed = int(draw_dropout_seed(rank_device(2, 0)).item())  # the draw of each rank's generator
    keep = torch.cat([lora_kernels.reference.dropout_keep(seed + k, 6, 8, 0.5) for k in range(2)], dim=1)
    assert not torch.equal(keep[:, :8], keep[:, 8:])
    w, b, a, bb = (
        t.detach().double().requires_grad_()
        for t in (layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight)
    )
    xd = x.double().requires_grad_()
    want = lora_kernels.lora_linear_reference(xd, w, b, a, bb, layer.scaling, keep.double() / 0.5)
    want.square().sum().backward()
    ranks = [torch.load(tmp_path / f"rank{k}.pt") for k in range(2)]
    for k, got in enumerate(ranks):  # fp32 against float64, as every backend is checked
        assert_close(got["out"], want.detach(), torch.float32, "out")
        assert_close(got["dx"], xd.grad.chunk(2, dim=-1)[k], torch.float32, "dX")
        assert_close(got["lora_A"], a.grad.chunk(2, dim=-1)[k], torch.float32, "dA")  # this rank's columns of A
        assert_close(got["lora_B"], bb.grad, torch.float32, "dB")  # replicated: summed over the ranks
