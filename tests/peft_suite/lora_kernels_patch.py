"""pytest plugin: run PEFT's own test suite with every PEFT model switched to lora_kernels.

Loaded with ``-p lora_kernels_patch`` (this folder on PYTHONPATH) by scripts/peft_suite.py. After
every way PEFT's tests create or change a model (BaseTuner.inject_adapter, which get_peft_model,
PeftModel.from_pretrained, add_adapter, load_adapter and inject_adapter_in_model all reach;
set_adapter; add_weighted_adapter), ``lora_kernels.patch_peft`` runs on the model, so the tests
exercise the fused layers wherever they can be used.

With LORA_KERNELS_PEFT_CHECK=1 every fused forward call is also run through PEFT's own forward
(where that is deterministic: no dropout in training) and the two must agree to the dtype's
tolerance; the number of calls checked and the largest differences are written to
LORA_KERNELS_PEFT_REPORT (a JSON file) at the end. LORA_KERNELS_PEFT_BACKEND picks the backend
(default "reference"; "triton" needs a GPU or TRITON_INTERPRET=1).
"""

import functools
import json
import logging
import os

import torch

BACKEND = os.environ.get("LORA_KERNELS_PEFT_BACKEND", "reference")
CHECK = os.environ.get("LORA_KERNELS_PEFT_CHECK") == "1"
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
STATS = {"patch_calls": 0, "fused_calls": 0, "checked_calls": 0, "max_rel_diff": 0.0, "calls_by_reason": {}}


def _patch_after(fn, model_of):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        import lora_kernels

        model = model_of(args, out)
        if isinstance(model, torch.nn.Module):
            STATS["patch_calls"] += 1
            lora_kernels.patch_peft(model, backend=BACKEND)
        return out

    return wrapper


def _checked(fused_forward):
    """The fused forward, compared with PEFT's own forward on the same input."""

    @functools.wraps(fused_forward)
    def forward(self, x, *args, **kwargs):
        out = fused_forward(self, x, *args, **kwargs)
        dispatch = self.__dict__.get("_lora_kernels_dispatch")
        if dispatch is not None:
            key = f"{dispatch.backend}: {dispatch.key}"
            STATS["calls_by_reason"][key] = STATS["calls_by_reason"].get(key, 0) + 1
        if dispatch is None or dispatch.backend == "peft" or not isinstance(out, torch.Tensor):
            return out
        STATS["fused_calls"] += 1
        dropout = [m for m in self.lora_dropout.values() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        if CHECK and not (self.training and dropout):
            with torch.no_grad():
                want = super(type(self), self).forward(x, *args, **kwargs)
            diff = (out.detach().double() - want.double()).norm().item()
            rel = diff / max(want.double().norm().item(), 1e-30)
            STATS["checked_calls"] += 1
            STATS["max_rel_diff"] = max(STATS["max_rel_diff"], rel)
            assert out.dtype == want.dtype and out.shape == want.shape, (out.dtype, want.dtype, out.shape, want.shape)
            assert rel <= TOLERANCE.get(want.dtype, 1e-4), f"fused forward differs from PEFT's: {rel:.3e}"
        return out

    return forward


def pytest_configure(config):
    import peft
    from peft.peft_model import PeftModel
    from peft.tuners.lora import LoraModel
    from peft.tuners.tuners_utils import BaseTuner

    import lora_kernels.peft_patch as compat

    logging.getLogger("lora_kernels").setLevel(logging.ERROR)  # one line per layer and model: too many here
    compat._fused_peft_forward = _checked(compat._fused_peft_forward)  # before any fused class exists
    BaseTuner.inject_adapter = _patch_after(BaseTuner.inject_adapter, lambda args, out: args[1])
    BaseTuner.set_adapter = _patch_after(BaseTuner.set_adapter, lambda args, out: args[0].model)
    LoraModel.add_weighted_adapter = _patch_after(LoraModel.add_weighted_adapter, lambda args, out: args[0].model)
    PeftModel.set_adapter = _patch_after(PeftModel.set_adapter, lambda args, out: args[0])
    config.stash_lora_kernels = peft.__version__


def pytest_unconfigure(config):
    report = os.environ.get("LORA_KERNELS_PEFT_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump({"backend": BACKEND, "check": CHECK, **STATS}, f, indent=1)
