"""A model with LoRALinear layers trains under DDP and FSDP2 (2 processes, gloo, CPU) to the same
loss as one process on the same global batch."""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from conftest import lora_mlp, spawn

import lora_kernels

STEPS, LR, BATCH = 4, 0.5, 16


def make_model():
    return lora_mlp(sizes=(24, 40, 8), device="cpu")


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 24, generator=g), torch.randn(BATCH, 8, generator=g)


def train(model, x, y, loss_of_full_batch, autocast=False):
    """``autocast``: the single-process counterpart of FSDP2's bf16 MixedPrecisionPolicy."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        nn.functional.mse_loss(out.float(), y).backward()
        opt.step()
    with torch.no_grad():
        return loss_of_full_batch(model).item()


def full_batch_loss(x, y):
    return lambda m: nn.functional.mse_loss(m(x).float(), y)


def worker(rank, world, init_file, mode, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = make_model()
    if mode == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh("cpu", (world,))
        policy = {}
        if mode == "fsdp2-bf16":  # bf16 compute (W₀, A, B, x cast by FSDP2), fp32 gradient reduction
            policy = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}
        for layer in model:
            if isinstance(layer, lora_kernels.LoRALinear):
                fully_shard(layer, mesh=mesh, **policy)
        fully_shard(model, mesh=mesh, **policy)
    x, y = data()
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    loss = train(model, x[shard], y[shard], full_batch_loss(x, y))
    if rank == 0:
        with open(out_file, "w") as f:
            f.write(repr(loss))


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "fsdp2-bf16"])
def test_distributed_training_matches_single_process(mode, tmp_path):
    """fsdp2-bf16: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) against one process
    under bf16 autocast (the same roundings of x, W₀, A and B), to bf16 accuracy."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    x, y = data()
    model = make_model()
    single = train(model, x, y, full_batch_loss(x, y), autocast=mode == "fsdp2-bf16")
    out = tmp_path / "loss"
    spawn(worker, (2, str(tmp_path / "init"), mode, str(out)), nprocs=2)
    distributed = float(out.read_text())
    start = full_batch_loss(x, y)(make_model()).item()
    assert distributed < start  # it trained
    tol = 2e-3 if mode == "fsdp2-bf16" else 1e-5
    assert abs(distributed - single) <= tol * abs(single), (mode, distributed, single)
