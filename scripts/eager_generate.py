"""Tokens per second of HF ``generate()`` run eagerly, unpatched PEFT against patch_peft, in one run.

A random-initialised LLaMA (no hub downloads): 4096 hidden, 11008 intermediate, 2 layers by
default, bf16, LoRA r = 16 on every projection (PEFT's default fp32 adapters). Greedy decoding of
--new-tokens tokens after an 8-token prompt, at each --batch; the median of --trials runs per cell.
With LORA_KERNELS_DIRECT_LAUNCH=1 in the environment the patched model uses the direct Triton
launch path (the switch is read at import). Prints one markdown table; --json writes the cells.

    python scripts/eager_generate.py                       # on a GPU
    python scripts/eager_generate.py --tiny --device cpu   # dry run of the script itself
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build(args):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    size = (
        dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, vocab_size=256)
        if args.tiny
        else dict(
            hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000
        )
    )
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=args.layers, max_position_embeddings=512, **size)
    base = LlamaForCausalLM(config).to(device=args.device, dtype=torch.bfloat16).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    for name, p in model.named_parameters():  # B = 0 at init would make the LoRA term vanish
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def tokens_per_second(model, batch, args) -> float:
    prompt = torch.randint(0, model.config.vocab_size, (batch, 8), device=args.device)
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    with torch.no_grad():
        model.generate(prompt, **kwargs)  # warm-up: compiles the Triton kernels, fills caches
        times = []
        for _ in range(args.trials):
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(prompt, **kwargs)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return batch * args.new_tokens / statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a tiny model (a dry run of the script)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import lora_kernels

    model = build(args)
    cells = []
    for batch in [int(b) for b in args.batch.split(",")]:
        unpatched = tokens_per_second(model, batch, args)
        switched = lora_kernels.patch_peft(model)
        patched = tokens_per_second(model, batch, args)
        backends = sorted({report.backend for report in lora_kernels.explain(model)})  # of the last calls
        lora_kernels.unpatch_peft(model)
        cells.append(
            dict(
                batch=batch,
                unpatched_tok_s=unpatched,
                patched_tok_s=patched,
                layers_switched=switched,
                backends=backends,
            )
        )
    print(
        f"generate(), {args.layers}-layer LLaMA ({'tiny' if args.tiny else '4096 hidden'}), bf16, LoRA r=16, "
        f"{args.new_tokens} new tokens, torch {torch.__version__}"
    )
    print("| batch | unpatched PEFT tok/s | patched tok/s | patched / unpatched | backends |")
    print("|---:|---:|---:|---:|---|")
    for c in cells:
        print(
            f"| {c['batch']} | {c['unpatched_tok_s']:.1f} | {c['patched_tok_s']:.1f} | "
            f"{c['patched_tok_s'] / c['unpatched_tok_s']:.2f}× | {', '.join(c['backends'])} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(cells, f, indent=1)


if __name__ == "__main__":
    main()
