"""One measurement in its own process: ``python -m benchmarks._worker SCENARIO TOOL CKPT [...]``.

Prints exactly one line starting with ``BENCH_JSON `` holding a JSON object; every other line is
noise from the libraries. A failure is reported as ``{"error": "..."}`` — never a made-up number.

Scenarios
  load_cpu   load everything to CPU RAM; then touch one byte per page of every tensor
  load_disk  load with about half the model bytes allowed in CPU RAM, the rest on disk
  generate   load (half on disk, or all in RAM for the ``-ram`` tools), one forward of the prompt,
             then greedy generation; in mode ``evicted`` the disk-tier bytes are dropped from the
             page cache before the forward and after every token
  h2d        (GPU) host-to-device copy bandwidth of a pinned and of a pageable buffer
  load_cuda  (GPU) load everything to cuda:0
  generate_cuda  (GPU) half the bytes on cuda:0 and the rest in CPU RAM (``-gpu`` tools: all on
             the GPU), then as ``generate``
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python benchmarks/_worker.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _common as C  # noqa: E402

NO_SPLIT = ["LlamaDecoderLayer"]
SCENARIOS = ["load_cpu", "load_disk", "generate", "h2d", "load_cuda", "generate_cuda"]
BIG = 1 << 40  # "as much as you like" for the tier below the one being limited


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * C.PAGE_BYTES


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark (VmHWM) so that the import peak does not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """VmHWM (reset after the imports when the kernel allows), else ru_maxrss of the process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def write_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("write_bytes:"))


# ---------------------------------------------------------------------------------------------
# loaders: (placement, folder, budget, offload dir) -> model


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def load_bigload(folder, placement, budget, offload_dir):
    import torch

    import bigload

    kwargs = {"dtype": torch.bfloat16} if _accepts(bigload.load, "dtype") else {}
    if placement in ("cpu", "cuda"):
        return bigload.load(str(folder), device_map=placement, **kwargs)
    if os.environ.get("BENCH_PREFETCH"):  # the runner's prefetch rows; else bigload's default
        kwargs["prefetch"] = int(os.environ["BENCH_PREFETCH"])
    if placement == "half_gpu":
        return bigload.load(str(folder), max_memory={0: budget, "cpu": BIG}, **kwargs)
    return bigload.load(
        str(folder),
        max_memory={"cpu": budget, "disk": "100GB"},
        offload_dir=str(offload_dir),
        **kwargs,
    )


def _offloaded(placement, budget, offload_dir) -> dict:
    """device_map="auto" arguments that put ``budget`` bytes on the fast tier, the rest below."""
    limit = {0: budget, "cpu": BIG} if placement == "half_gpu" else {"cpu": budget}
    return {"device_map": "auto", "max_memory": limit, "offload_folder": str(offload_dir)}


def load_accelerate(folder, placement, budget, offload_dir):
    import accelerate
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with accelerate.init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.tie_weights()
    if placement in ("cpu", "cuda"):  # accelerate accepts no plain "cpu"/"cuda" string here
        where = {"device_map": {"": 0 if placement == "cuda" else "cpu"}}
    else:
        where = _offloaded(placement, budget, offload_dir)
    return accelerate.load_checkpoint_and_dispatch(
        model, str(folder), no_split_module_classes=NO_SPLIT, dtype=torch.bfloat16, **where
    )


def load_transformers(folder, placement, budget, offload_dir):
    import torch
    from transformers import AutoModelForCausalLM

    if placement in ("cpu", "cuda"):
        where = {"device_map": placement}
    else:
        where = _offloaded(placement, budget, offload_dir)
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16, **where)


LOADERS = {
    "bigload": load_bigload,
    "accelerate": load_accelerate,
    "transformers": load_transformers,
}


def base_tool(tool: str) -> str:
    return tool.split("-")[0]


def placement_for(scenario: str, tool: str) -> str:
    """cpu | cuda: everything there; half_disk: half in CPU RAM, rest on disk; half_gpu: half on
    cuda:0, rest in CPU RAM."""
    if scenario == "load_cpu" or tool.endswith("-ram"):
        return "cpu"
    if scenario == "load_cuda" or tool.endswith("-gpu"):
        return "cuda"
    return "half_gpu" if scenario == "generate_cuda" else "half_disk"


def cuda_sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device on this machine")
    torch.cuda.init()
    torch.cuda.reset_peak_memory_stats()


def gpu_peak_bytes():
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated()
    return None


# ---------------------------------------------------------------------------------------------
# what a loaded model looks like


def touch_tensors(model) -> int:
    """Read one element per page of every RAM-resident tensor (faults in mmap-backed weights).

    Tensors the model's ``hf_device_map`` places on disk are left alone: touching them would
    page the disk tier into memory, which is what offloading avoids (other tools keep them on
    meta, bigload as file views whose pages it maps only while their block runs)."""
    import torch

    disk = [k for k, v in (getattr(model, "hf_device_map", None) or {}).items() if str(v) == "disk"]
    touched = 0
    with torch.no_grad():
        named = list(model.named_parameters()) + list(model.named_buffers())
        for name, t in named:
            if t.device.type == "meta" or t.numel() == 0 or _covered(name, disk):
                continue
            flat = t.detach().reshape(-1)
            flat[:: max(1, C.PAGE_BYTES // t.element_size())].float().sum().item()
            touched += t.numel() * t.element_size()
    return touched


def _covered(name: str, prefixes: list[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def device_map_of(model) -> dict | None:
    dm = getattr(model, "hf_device_map", None)
    return {k: str(v) for k, v in dm.items()} if isinstance(dm, dict) else None


def meta_tensor_count(model) -> int:
    return sum(
        1 for t in list(model.parameters()) + list(model.buffers()) if t.device.type == "meta"
    )


# ---------------------------------------------------------------------------------------------
# scenarios


def run_floor(scenario, tool, folder, result):
    files = C.checkpoint_files(folder)
    base = rss_bytes()
    t0 = time.perf_counter()
    if tool == "raw":
        result["bytes_read"] = C.raw_read(files)
        keep = None
    else:
        from safetensors.torch import load_file

        device = "cuda:0" if scenario == "load_cuda" else "cpu"
        keep = [load_file(str(f), device=device) for f in files]
        cuda_sync()
    result["load_s"] = time.perf_counter() - t0
    if keep is not None:
        result["touch_bytes"] = sum(touch_tensors_dict(d) for d in keep)
    result["load_touch_s"] = time.perf_counter() - t0
    result["base_rss_bytes"] = base


def touch_tensors_dict(tensors: dict) -> int:
    import torch

    n = 0
    with torch.no_grad():
        for t in tensors.values():
            flat = t.reshape(-1)
            flat[:: max(1, C.PAGE_BYTES // t.element_size())].float().sum().item()
            n += t.numel() * t.element_size()
    return n


def run_load(scenario, tool, folder, budget, offload_dir, result):
    loader = LOADERS[base_tool(tool)]
    base, written0 = rss_bytes(), write_bytes()
    t0 = time.perf_counter()
    model = loader(folder, placement_for(scenario, tool), budget, offload_dir)
    cuda_sync()
    result["load_s"] = time.perf_counter() - t0
    result["bytes_written"] = write_bytes() - written0
    result["touch_bytes"] = touch_tensors(model)
    result["load_touch_s"] = time.perf_counter() - t0
    result["base_rss_bytes"] = base
    result["offload_dir_bytes"] = C.total_bytes(C.tree_files(offload_dir))
    result["meta_tensors"] = meta_tensor_count(model)
    dm = device_map_of(model)
    result["device_map_known"] = dm is not None
    result["disk_bytes"] = (
        sum(n for rs in C.disk_ranges(folder, dm).values() for _, n in rs) if dm else None
    )
    return model, dm


def run_h2d(folder, result, repeats: int = 5):
    """Host-to-device floor: copy the checkpoint's byte count from pinned and pageable memory."""
    import torch

    n = C.total_bytes(C.checkpoint_files(folder))
    dst = torch.empty(n, dtype=torch.uint8, device="cuda:0")
    for kind in ("pinned", "pageable"):
        src = torch.ones(n, dtype=torch.uint8, pin_memory=kind == "pinned")
        times = []
        for _ in range(repeats + 1):  # the first copy warms up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=kind == "pinned")
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        result[f"{kind}_s"] = statistics.median(times[1:])
        result[f"{kind}_gbps"] = n / result[f"{kind}_s"] / 1e9
        del src
    result["bytes_copied"] = n
    result["load_s"] = result["pinned_s"]


class TokenClock:
    """A StoppingCriteria that timestamps every generated token and evicts the disk tier after it.

    The time spent evicting is measured and taken out of the decode-step figures.
    """

    def __init__(self, evict_fn=None):
        self.evict_fn = evict_fn
        self.stamps: list[float] = []  # token produced (before eviction)
        self.resumed: list[float] = []  # eviction done, generation continues

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        cuda_sync()
        self.stamps.append(time.perf_counter())
        if self.evict_fn is not None:
            self.evict_fn()
        self.resumed.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def decode_steps(self) -> list[float]:
        return [b - a for a, b in zip(self.resumed[:-1], self.stamps[1:])]

    def evict_seconds(self) -> float:
        return sum(r - s for s, r in zip(self.stamps, self.resumed))


def eviction_for(folder, offload_dir, device_map):
    """A function that drops the disk tier from the page cache, and the ranges it covers."""

    def ranges():
        out = C.disk_ranges(folder, device_map)  # whole checkpoint files if the map is unknown
        out.update(C.whole(C.tree_files(offload_dir)))
        return out

    return (lambda: C.evict(ranges(), own_mappings=True)), ranges


def input_device(model):
    weight = model.get_input_embeddings().weight
    return "cuda:0" if weight.device.type == "meta" else weight.device


def run_generate(scenario, tool, folder, budget, offload_dir, mode, args, result):
    import torch
    from transformers import StoppingCriteriaList

    model, dm = run_load(scenario, tool, folder, budget, offload_dir, result)
    if scenario == "generate" and "-ram" not in tool:
        evict_fn, ranges = eviction_for(folder, offload_dir, dm)
        result["evicted_scope"] = (
            "disk-tier tensors" if dm else "whole checkpoint files (no device map)"
        )
    else:
        evict_fn, ranges = (lambda: None), None
    if mode != "evicted":
        evict_fn = None
    vocab = model.config.vocab_size
    input_ids = torch.randint(
        0, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0)
    ).to(input_device(model))
    with torch.inference_mode():
        if evict_fn:
            evict_fn()
            result["resident_after_evict"] = C.resident_fraction(ranges())
        t0 = time.perf_counter()
        model(input_ids)
        cuda_sync()
        result["forward_s"] = time.perf_counter() - t0
        if evict_fn:
            evict_fn()
        clock = TokenClock(evict_fn)
        t0 = time.perf_counter()
        out = model.generate(
            input_ids,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            pad_token_id=0,
            stopping_criteria=StoppingCriteriaList([clock]),
        )
        gen_s = time.perf_counter() - t0 - clock.evict_seconds()
    new = out[0, args.prompt_len :].tolist()
    result.update(
        generate_s=gen_s,
        new_tokens=len(new),
        tokens_per_s=len(new) / gen_s,
        tokens=new,
        decode_step_s=statistics.median(clock.decode_steps()) if len(clock.stamps) > 1 else None,
        evict_s=clock.evict_seconds(),
    )


def prepare(tool: str) -> None:
    """Imports and one-off start-up work before the clock and the RSS baseline, so that neither
    counts a library's import (every tool would pay it once per program, not per load)."""
    import importlib

    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401

    torch.ones(64, 64) @ torch.ones(64, 64)  # start the intra-op thread pool
    extra = {"accelerate": "accelerate", "bigload": "bigload.hf"}.get(base_tool(tool))
    if extra:
        importlib.import_module(extra)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("scenario", choices=SCENARIOS)
    p.add_argument("tool")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--mode", default="warm", choices=["warm", "cold", "evicted"])
    p.add_argument(
        "--budget", type=int, default=0, help="bytes allowed on the fast tier (cpu, or cuda:0)"
    )
    p.add_argument("--offload-dir", type=Path, default=None)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args(argv)
    result: dict = {"scenario": args.scenario, "tool": args.tool, "mode": args.mode}
    load_at_start = os.getloadavg()[0]  # the machine may be shared: record how busy it was
    t0 = time.perf_counter()
    try:
        prepare(args.tool)
        result["import_s"] = time.perf_counter() - t0
        result["peak_rss_reset"] = reset_peak_rss()
        if args.scenario in ("h2d", "load_cuda", "generate_cuda"):
            require_cuda()
        if args.scenario == "h2d":
            run_h2d(args.checkpoint, result)
        elif args.tool in ("raw", "safetensors"):
            run_floor(args.scenario, args.tool, args.checkpoint, result)
        elif args.scenario.startswith("generate"):
            run_generate(
                args.scenario,
                args.tool,
                args.checkpoint,
                args.budget,
                args.offload_dir,
                args.mode,
                args,
                result,
            )
        else:
            run_load(
                args.scenario, args.tool, args.checkpoint, args.budget, args.offload_dir, result
            )
    except BaseException as err:  # noqa: BLE001  report any failure as data, never as a number
        result["error"] = f"{type(err).__name__}: {err}".strip()[:500]
        result["traceback"] = traceback.format_exc()[-3000:]
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["gpu_peak_bytes"] = gpu_peak_bytes() if "torch" in sys.modules else None
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_s"] = usage.ru_utime + usage.ru_stime
    result["wall_s"] = time.perf_counter() - t0
    result["loadavg_1m"] = [load_at_start, os.getloadavg()[0]]
    if "base_rss_bytes" in result:
        result["peak_rss_over_base_bytes"] = result["peak_rss_bytes"] - result["base_rss_bytes"]
    print(C.RESULT_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
