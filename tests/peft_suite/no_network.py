"""pytest plugin: no network, failing at once. PEFT's suite downloads models from the hub in many
tests; on a machine without access each attempt waited ~45 s in huggingface_hub's retries. Loaded
in both runs (unpatched and patched), so the tests that need the hub fail the same way in both."""

import functools
import socket


def _refuse(*args, **kwargs):
    raise ConnectionRefusedError("lora_kernels' PEFT-suite run has no network")


def pytest_configure(config):
    socket.socket.connect = _refuse
    socket.create_connection = _refuse
    try:
        from huggingface_hub.utils import _http
    except ImportError:
        return
    backoff = _http._http_backoff_base

    @functools.wraps(backoff)
    def no_retries(*args, **kwargs):
        kwargs["max_retries"] = 0
        return backoff(*args, **kwargs)

    _http._http_backoff_base = no_retries
