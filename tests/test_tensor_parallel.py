"""LoRA layers under tensor parallelism (lora_kernels.parallel), alone and with FSDP2 on a 2-D mesh:
outputs, dX, the adapters' gradients, a few optimizer steps and the saved adapter equal those of
the same model on one process (gloo, CPU processes)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from conftest import KERNEL_BACKENDS

import lora_kernels

BATCH, STEPS, LR = 8, 3, 0.5
BACKENDS = ["reference"] + [b for b in KERNEL_BACKENDS if b == "triton"]


def make_model(backend, dropout=0.0):
    """Linear(16→24) colwise, ReLU, Linear(24→16) rowwise; LoRA on both, LoRA and biases trainable,
    B non-zero; the same in every process. Dropout on the colwise layer only (its input is the
    replicated one)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16))
    model[0] = lora_kernels.LoRALinear.from_linear(model[0], r=4, alpha=8, dropout=dropout, backend=backend)
    model[2] = lora_kernels.LoRALinear.from_linear(model[2], r=4, alpha=8, backend=backend)
    lora_kernels.mark_only_lora_as_trainable(model)
    model[0].bias.requires_grad_(True)  # trainable biases: the colwise one sharded, the rowwise one replicated
    model[2].bias.requires_grad_(True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 16, generator=g), torch.randn(BATCH, 16, generator=g)


def step_results(model, x, y, world_dp=1, rank_dp=0):
    """One forward/backward on this process's share of the batch, then STEPS SGD steps; the
    values to compare, gathered whole."""
    from lora_kernels.layers import full_tensor

    shard = slice(rank_dp * BATCH // world_dp, (rank_dp + 1) * BATCH // world_dp)
    xs = x[shard].clone().requires_grad_()
    torch.manual_seed(2)  # the dropout seed's draw
    out = model(xs)
    nn.functional.mse_loss(out, y[shard]).backward()
    grads = {n: full_tensor(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}
    results = {"out": out.detach().clone(), "dx": xs.grad.clone(), "grads": grads}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(model(x[shard]), y[shard]).backward()
        opt.step()
    with torch.no_grad():
        results["loss"] = nn.functional.mse_loss(model(x), y).item()
    results["adapter"] = lora_kernels.lora_state_dict(model)
    return results


def worker(rank, world, init_file, scenario, backend, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import parallelize_module

        from lora_kernels.parallel import ColwiseParallel, RowwiseParallel

        model = make_model(backend, dropout=0.25 if scenario == "tp-dropout" else 0.0)
        plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
        if scenario == "2d":  # TP inside, FSDP2 over the data-parallel dimension outside
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
            parallelize_module(model, mesh["tp"], plan)
            for layer in (model[0], model[2]):
                fully_shard(layer, mesh=mesh["dp"])
            fully_shard(model, mesh=mesh["dp"])
            world_dp, rank_dp = 2, mesh["dp"].get_local_rank()
        else:
            mesh = init_device_mesh("cpu", (world,))
            parallelize_module(model, mesh, plan)
            world_dp, rank_dp = 1, 0
        x, y = data()
        results = step_results(model, x, y, world_dp, rank_dp)
        if scenario != "tp-dropout":  # (PEFT's format holds one dropout per adapter; the layers' differ)
            lora_kernels.save_peft_adapter(model, os.path.join(out_dir, "adapter"))
        results["explain"] = [(r.name, r.backend, r.fused) for r in lora_kernels.explain(model)]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def single_process(backend, scenario):
    model = make_model(backend, dropout=0.25 if scenario == "tp-dropout" else 0.0)
    x, y = data()
    if scenario != "2d":
        return step_results(model, x, y)
    results = [step_results(make_model(backend), x, y, 2, k) for k in range(2)]  # dX and outputs per dp shard
    full = step_results(model, x, y)  # gradients and the trained loss: the full batch, averaged over shards
    full["out"] = torch.cat([r["out"] for r in results])
    full["dx"] = torch.cat([r["dx"] for r in results])
    return full


def run_parallel(tmp_path, scenario, backend, world):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(worker, args=(world, str(tmp_path / "init"), scenario, backend, str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scenario", ["tp", "tp-dropout"])
def test_tensor_parallel_equals_one_process(backend, scenario, tmp_path):
    ranks = run_parallel(tmp_path, scenario, backend, 2)
    single = single_process(backend, scenario)
    if scenario == "tp-dropout" and backend == "reference":
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
        assert all(b == backend for _, b, _ in rank["explain"])
    if scenario == "tp-dropout":
        return
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {k.removeprefix("base_model.model."): v.shape for k, v in saved.items()} == {
        k: v.shape for k, v in single["adapter"].items()
    }


def test_fsdp2_over_tensor_parallel_trains_to_the_single_process_loss(tmp_path):
    ranks = run_parallel(tmp_path, "2d", "reference", 4)
    single = single_process("reference", "2d")
    for rank in ranks:
        assert abs(rank["loss"] - single["loss"]) <= 1e-5 * single["loss"], (rank["loss"], single["loss"])
        for key in single["adapter"]:
            close(rank["adapter"][key], single["adapter"][key], key)


def test_plain_layers_are_refused_with_torchs_styles_named():
    from lora_kernels.parallel import ColwiseParallel

    with pytest.raises(NotImplementedError, match="use torch's styles for plain layers"):
        ColwiseParallel()._apply(nn.Linear(4, 4), None)
