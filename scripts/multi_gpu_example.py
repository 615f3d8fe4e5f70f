"""A LoRA MLP trained with DDP, FSDP2, tensor parallelism or both (2-D), the README's multi-GPU
section as a program. On GPUs with NCCL, on CPUs with gloo:

    torchrun --nproc-per-node 2 scripts/multi_gpu_example.py --mode ddp      # or fsdp2, tp
    torchrun --nproc-per-node 4 scripts/multi_gpu_example.py --mode 2d       # dp × tp = 2 × 2

Every mode prints the loss after each step on the first rank; all of them train the same model
on the same global batch, so their losses agree with one another (and with --nproc-per-node 1).
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn as nn

import lora_kernels


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ddp", "fsdp2", "tp", "2d"], default="tp")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same model on every rank
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).to(device)
    lora_kernels.inject_lora(model, ["0", "2"], r=8, alpha=16)
    lora_kernels.mark_only_lora_as_trainable(model)

    from torch.distributed.device_mesh import init_device_mesh

    dp_rank, dp_size = rank, world
    if args.mode == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    elif args.mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        from torch.distributed.tensor.parallel import parallelize_module

        from lora_kernels.parallel import ColwiseParallel, RowwiseParallel

        plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
        if args.mode == "tp":
            parallelize_module(model, init_device_mesh(device.type, (world,)), plan)
            dp_rank, dp_size = 0, 1  # every rank sees the whole batch
        else:
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (2, world // 2), mesh_dim_names=("dp", "tp"))
            parallelize_module(model, mesh["tp"], plan)
            for layer in (model[0], model[2]):
                fully_shard(layer, mesh=mesh["dp"])
            fully_shard(model, mesh=mesh["dp"])
            dp_rank, dp_size = mesh["dp"].get_local_rank(), 2

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 64, generator=g).to(device), torch.randn(32, 64, generator=g).to(device)
    shard = slice(dp_rank * 32 // dp_size, (dp_rank + 1) * 32 // dp_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(args.steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x[shard]), y[shard])
        loss.backward()
        opt.step()
        loss = loss.detach()
        dist.all_reduce(loss)  # the mean over the data-parallel shards (TP ranks hold the same loss)
        if rank == 0:
            print(f"{args.mode} step {step}: loss {loss.item() / world:.6f}")
    adapter = lora_kernels.lora_state_dict(model)  # whole tensors, on every rank
    if rank == 0:
        print("adapter:", {k: tuple(v.shape) for k, v in adapter.items()})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
