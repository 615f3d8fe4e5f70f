"""Shared test helpers: device/backends under test, float64 comparison with per-dtype bounds, poisoning.

Without a GPU the Triton kernels run under the interpreter; that must be decided before triton is
first imported, so it happens here.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch._dynamo  # noqa: E402,F401  (loaded before the poison fixture ever patches torch.empty, see there)

import lora_kernels  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # make test's parallel workers share the cores, not oversubscribe them
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = lora_kernels.available_backends(DEVICE)
KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]

# ‖out − ref‖ / ‖ref‖ against float64. fp32 is IEEE fp32 (TF32 off); bf16/fp16 include the rounding
# of the output and of the (M, r) intermediate, as any unfused layer has.
REL_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out).all(), "non-finite values (an unwritten poisoned element?)"
    denom = ref.norm()
    return ((out - ref).norm() / (denom if denom > 0 else 1.0)).item()


def assert_close(out, ref, dtype, what="", magnitude=None):
    """‖out − ref‖ ≤ tol·‖ref‖, or, given ``magnitude`` (the same quantity computed from absolute
    values, i.e. the size of the terms summed), ≤ tol·‖magnitude‖: the standard bound for sums
    with cancellation, used where shapes are arbitrary (a single output can cancel to ~0)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = (
        rel_err(out, ref)
        if magnitude is None
        else rel_err(out, ref) * ref.norm().item() / max(magnitude.double().norm().item(), 1e-300)
    )
    assert err <= REL_TOL[dtype], f"{what}: relative error {err:.3e} > {REL_TOL[dtype]:.0e} ({dtype})"


def make_problem(M, K, N, r, dtype, bias=True, lead=(), device=DEVICE, scale=2.0):
    """Fresh random inputs sized so the LoRA term is as large as the base term."""
    x = torch.randn(*lead, M, K, dtype=dtype, device=device)
    w = torch.randn(N, K, dtype=dtype, device=device) / K**0.5
    b = torch.randn(N, dtype=dtype, device=device) if bias else None
    a = torch.randn(r, K, dtype=dtype, device=device) / K**0.5
    bb = torch.randn(N, r, dtype=dtype, device=device) / r**0.5
    return x, w, b, a, bb, scale


def backend_contract_vs_float64(
    ops, M, K, N, r, dtype, fuse_lora_dx=True, x_lora_given=False, strided_x=False, dropout_p=0.0, adapter_dtype=None
):
    """A backend module's forward and backward (the 2-D contract of lora_kernels.reference) against
    the same functions in float64, every output: y, xa, dX, dA, dB, g. ``strided_x``: x is a column
    slice of a wider tensor (row stride ≠ K, start not 16-byte aligned). ``dropout_p``: the
    backend's fused dropout from a fresh seed, against x_lora = x ⊙ reference.dropout_keep / (1 − p).
    ``adapter_dtype``: A and B stored in that dtype (fp32 adapters on a 16-bit base); dA and dB
    must come back in it."""
    x, w, b, a, bb, s = make_problem(M, K, N, r, dtype)
    adapter_dtype = adapter_dtype or dtype
    a, bb = a.to(adapter_dtype), bb.to(adapter_dtype)
    if strided_x:
        x = torch.randn(M, K + 8, dtype=dtype, device=x.device)[:, 3 : 3 + K]
    x_lora = x * (torch.rand_like(x) > 0.3).to(dtype) if x_lora_given else None
    dy = torch.randn(M, N, dtype=dtype, device=x.device)
    fused = {}
    if dropout_p:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        fused = {"dropout_p": dropout_p, "seed": torch.tensor([seed], dtype=torch.int64, device=x.device)}
    y, xa = ops.forward(x, w, b, a, bb, s, x_lora=x_lora, **fused)
    dx, da, db, g = ops.backward(
        dy, x if x_lora is None else x_lora, w, a, bb, xa, s, fuse_lora_dx=fuse_lora_dx, **fused
    )
    f64 = [t.double() if t is not None else None for t in (x, w, b, a, bb, dy)]
    xl64 = f64[0] if x_lora is None else x_lora.double()
    mask = 1.0
    if dropout_p:
        mask = lora_kernels.reference.dropout_keep(seed, M, K, dropout_p, device=x.device) / (1 - dropout_p)
        xl64 = xl64 * mask
    y_ref, xa_ref = lora_kernels.reference.forward(*f64[:5], s, x_lora=xl64)
    dx_ref, da_ref, db_ref, g_ref = lora_kernels.reference.backward(
        f64[5], xl64, f64[1], f64[3], f64[4], xa_ref, s, False
    )
    if fuse_lora_dx:  # the LoRA share of dX, through the dropout mask
        dx_ref += mask * (s * g_ref @ f64[3])
    for out, ref, what in (
        (y, y_ref, "y"),
        (xa, xa_ref, "xa"),
        (dx, dx_ref, "dx"),
        (da, da_ref, "dA"),
        (db, db_ref, "dB"),
        (g, g_ref, "g"),
    ):
        assert out.dtype == (adapter_dtype if what in ("dA", "dB") else dtype), (what, out.dtype)
        assert_close(out, ref, dtype, what)


def reference_grads(x, w, b, a, bb, scale, dy, mask=None, magnitude=False):
    """Forward and gradients (x, A, B, bias) of the float64 reference under autograd.

    ``magnitude=True`` evaluates it on absolute values (and |dY|): every output is a sum of
    products, so this gives the size of the terms each output sums (see assert_close)."""
    f = (lambda t: t.detach().double().abs()) if magnitude else (lambda t: t.detach().double())
    x64, a64, b64 = (f(t).requires_grad_() for t in (x, a, bb))
    bias64 = None if b is None else f(b).requires_grad_()
    y = lora_kernels.lora_linear_reference(
        x64, f(w), bias64, a64, b64, abs(scale) if magnitude else scale, None if mask is None else f(mask)
    )
    y.backward(f(dy))
    return y, x64.grad, a64.grad, b64.grad, None if b is None else bias64.grad


def tiny_hf_model(kind="llama", dtype=torch.float32, **llama_config):
    """A 2-layer, 64-wide Hugging Face model of random weights (seed 0) on DEVICE, in eval mode (GPT-2
    has dropout of its own): "gpt2" (projections are Conv1D, weight stored (in, out)) or "llama"
    (``llama_config`` added to its config)."""
    import transformers

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=32,
            **llama_config,
        )
        model = transformers.LlamaForCausalLM(cfg)
    return model.to(device=DEVICE, dtype=dtype).eval()


def lora_mlp(sizes=(32, 48, 32), backend="auto", dropout=0.0, device=DEVICE):
    """Linear-GELU-Linear with LoRA on both linears, only LoRA trainable, B non-zero (as if trained),
    the same on every call (and in every process)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(sizes[0], sizes[1]), torch.nn.GELU(), torch.nn.Linear(sizes[1], sizes[2])
    ).to(device)
    lora_kernels.inject_lora(model, ["0", "2"], r=4, alpha=8, dropout=dropout, backend=backend)
    lora_kernels.mark_only_lora_as_trainable(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def spawn(worker, args, nprocs):
    """torch.multiprocessing.spawn(worker, args, nprocs), each process leaving through
    ``_run_and_leave``: its process group destroyed and the process ended without interpreter
    finalization. A gloo worker thread that drops the last reference to a finished collective's
    tensors after the main thread has begun finalizing takes the GIL, is unwound, and aborts the
    process (SIGABRT, "terminate called without an active exception"; torch's gloo backend,
    pytorch/pytorch#190489; 5 of 70 runs of a TP test here). destroy_process_group alone does not join
    those threads while a DeviceMesh still refers to the group."""
    mp.spawn(_run_and_leave, args=(worker, *args), nprocs=nprocs, join=True)


def _run_and_leave(rank, worker, *args):
    try:
        worker(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # an exception above propagates instead: spawn reports its traceback


@pytest.fixture
def poison(monkeypatch):
    """Make every fresh output buffer NaN, so an element a kernel forgets to write fails the test.

    Python-side allocations (the Triton wrappers) go through a patched torch.empty; on a GPU the
    caching allocator is also handed back blocks filled with NaN, which poisons C++-side outputs.
    torch._dynamo is imported at the top of this file so that it never records the patched function
    as torch.empty (it did when first loaded inside a poisoned test, breaking later compile tests).
    """
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        for size in (1 << 16, 1 << 20, 1 << 24):
            real_empty(size, device="cuda").fill_(float("nan"))  # freed at once: cached blocks now hold NaN
    yield


def pytest_collection_finish(session):
    """The sm_90/sm_80 compiles of tests/triton/test_gpu_compile.py (minutes of both cores, in
    subprocesses) start once that test is selected, so that they run beside the tests before it
    rather than after them. Not in pytest-xdist workers: each would start its own."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    for item in session.items:
        start = getattr(getattr(item, "module", None), "start_compiles", None)
        if start is not None:
            start()  # once per session, however many of the module's tests are selected
