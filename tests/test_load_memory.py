"""Peak memory of a load, measured in a fresh process: a ~200 MB fp32 checkpoint onto CPU costs
about its own bytes (zero-copy file views), and a cast to bf16 costs about the bf16 bytes, never a
second full copy.

The peak is the process's VmHWM, reset to the current RSS just before the load (``clear_refs``).
``ru_maxrss`` alone is not usable here: Linux carries it across ``execve`` from the forked (or
vforked) parent, so a child of a big pytest process starts with the parent's peak and a load below
it measures as 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

MB = 1024 * 1024

WRITE = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(12)])
    save_file(model.state_dict(), sys.argv[1])
""")

LOAD = textwrap.dedent("""
    import gc, json, resource, sys, torch
    from torch import nn
    from safetensors import safe_open
    import bigload

    path, dtype = sys.argv[1], getattr(torch, sys.argv[2])
    def build():
        return nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(12)])
    with bigload.init_empty_weights():
        model = build()
    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) restarts from the current RSS
    before = status("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = bigload.load_checkpoint_in_model(model, path, dtype=dtype)
    after = status("VmHWM")
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # the eager reference, after the measurement: the same tensors, read plainly
    same = True
    with safe_open(path, "pt") as f:
        for name, param in model.named_parameters():
            same &= param.dtype == dtype and torch.equal(param, f.get_tensor(name).to(dtype))
    x = torch.randn(2, 2048)
    eager = build()
    with safe_open(path, "pt") as f:
        eager.load_state_dict({k: f.get_tensor(k) for k in f.keys()})
    eager = eager.to(dtype)
    with torch.no_grad():
        same &= torch.equal(model(x.to(dtype)), eager(x.to(dtype)))
    print(json.dumps({"delta": after - before, "model_bytes": model_bytes,
                      "maxrss_delta": maxrss_after - maxrss_before,
                      "zero_copy": report.zero_copy, "cast": len(report.cast),
                      "tensors": len(report.loaded), "same": bool(same),
                      "seconds": report.seconds}))
""")


pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                                reason="needs Linux /proc/self/clear_refs to reset the RSS peak")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("memory") / "model.safetensors"
    subprocess.run([sys.executable, "-c", WRITE, str(path)], check=True, timeout=120)
    assert path.stat().st_size > 190 * MB
    return path


def measure(checkpoint: Path, dtype: str) -> dict:
    result = subprocess.run([sys.executable, "-c", LOAD, str(checkpoint), dtype],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\n{dtype}: peak RSS delta {figures['delta'] / MB:.1f} MiB for "
          f"{figures['model_bytes'] / MB:.1f} MiB of weights ({figures['seconds']:.2f} s; "
          f"ru_maxrss delta {figures['maxrss_delta'] / MB:.1f} MiB)")
    return figures


def test_fp32_load_onto_cpu_peaks_near_the_model_bytes(checkpoint):
    figures = measure(checkpoint, "float32")
    assert figures["same"]
    assert figures["zero_copy"] == 24 and figures["tensors"] == 24  # the file's pages, mapped
    assert figures["delta"] <= figures["model_bytes"] * 1.25 + 50 * MB, figures


def test_bf16_cast_load_never_holds_a_second_full_copy(checkpoint):
    figures = measure(checkpoint, "bfloat16")
    fp32_bytes = 2 * figures["model_bytes"]
    assert figures["same"]
    assert figures["cast"] == 24 and figures["zero_copy"] == 0
    assert figures["delta"] <= fp32_bytes, figures
