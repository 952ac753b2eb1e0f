"""Run a function on N forked ranks (gloo on loopback) and collect what each returned.

``run_ranks(fn, world, tmp_path, *args)`` starts ``world`` processes; each initialises
torch.distributed from the environment (as torchrun would), calls ``fn(rank, world, *args)``
and saves its result (or its exception, as text) to ``tmp_path``. Every process is killed at
``timeout``; ``fn`` must be a module-level function of an importable module.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any

import torch

RANK_TIMEOUT_S = 20.0  # what the ranks give each other (bigload.load(timeout=...))
# Ranks fork from a server that imported these once (importing transformers' model code costs
# seconds per process; the server has run no torch op, so forking it is safe).
PRELOAD = ["torch", "transformers", "transformers.generation.utils",
           "transformers.models.llama.modeling_llama", "transformers.models.t5.modeling_t5",
           "transformers.models.bart.modeling_bart", "transformers.models.bert.modeling_bert",
           "transformers.models.gpt_bigcode.modeling_gpt_bigcode", "bigload.distributed.load",
           "bigload.hf", "bigload.cli.main"]
_CONTEXT: Any = None


def _context() -> Any:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn: Any, rank: int, world: int, port: int, out: str, args: tuple,
               env: dict[str, str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      **env)
    torch.set_num_threads(1)
    started = time.monotonic()
    try:
        result: Any = {"ok": fn(rank, world, *args)}
    except BaseException as err:  # the test looks at it
        result = {"error": f"{type(err).__name__}: {err}", "type": type(err).__name__,
                  "traceback": traceback.format_exc(), "rank_attr": getattr(err, "rank", None)}
    result["seconds"] = time.monotonic() - started
    torch.save(result, Path(out) / f"rank{rank}.pt")
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass


def run_ranks(fn: Any, world: int, tmp_path: Path, *args: Any, timeout: float = 120.0,
              env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Each rank's ``{"ok": result}`` or ``{"error": text, "type": name, ...}`` (``None`` for a
    rank that saved nothing: it died), with ``"seconds"`` it ran."""
    out = tmp_path / f"ranks-{fn.__name__}"
    out.mkdir(exist_ok=True)
    for old in out.glob("rank*.pt"):
        old.unlink()
    ctx = _context()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, str(out), args, env or {}),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    results = []
    for r in range(world):
        path = out / f"rank{r}.pt"
        results.append(torch.load(path, weights_only=False) if path.exists() else None)
    return results


def ok(results: list[dict[str, Any] | None]) -> list[Any]:
    """The results, or an AssertionError showing every rank's error."""
    problems = [f"rank {r}: " + ("no result (died or timed out)" if res is None
                                 else res["traceback"])
                for r, res in enumerate(results) if res is None or "error" in res]
    assert not problems, "\n".join(problems)
    return [res["ok"] for res in results]  # type: ignore[index]
