"""A model across torch.distributed ranks (gloo on loopback, spawned processes): the same
logits and the same generated tokens as one process, each rank reading only its own tensors,
and a failing rank taking every other rank down with its error in bounded time.

Each test spawns its ranks once and checks several things in them (a spawn costs seconds);
references come from one process (bigload.load, the same kernels: equal bit for bit).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from hf_models import BY_NAME
from ranks_harness import RANK_TIMEOUT_S, ok, run_ranks

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

PROMPT = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
BATCH = [[0, 0, 0, 5, 6, 7], [8, 9, 10, 11, 12, 13]]  # left padding (pad id 0)
BATCH_MASK = [[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]]


def _save(name: str, folder: Path, **overrides: Any) -> Path:
    spec = BY_NAME[name]
    torch.manual_seed(0)
    config = getattr(transformers, spec.config)(**{**spec.kwargs, **overrides})
    getattr(transformers, spec.model)(config).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """References run with one thread, as the ranks do: the same kernels, equal bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ranks")
    return {
        # tied embedding and head (tie_word_embeddings): they land on different ranks
        "llama": _save("llama", root / "llama", pad_token_id=0),
        "gpt_bigcode": _save("gpt_bigcode", root / "gpt_bigcode"),
        "t5": _save("t5", root / "t5"),
        "bert": _save("bert", root / "bert"),
        "bart": _save("bart", root / "bart"),
        "llama4": _save("llama", root / "llama4", num_hidden_layers=4),
        "mixtral": _save("mixtral", root / "mixtral", num_hidden_layers=3),
        "llama_wide": _save("llama", root / "llama_wide", num_hidden_layers=4, hidden_size=64),
    }


# --- what the ranks run --------------------------------------------------------------------------
def _load(folder: Path, **kwargs: Any) -> Any:
    import bigload

    return bigload.load(folder, world="auto", timeout=RANK_TIMEOUT_S, **kwargs)


def _held(model: Any, value: torch.Tensor) -> torch.Tensor | None:
    from bigload import distributed

    return value if distributed.is_held(model, value) else None


def _causal_checks(model: Any, eos: int | None) -> dict[str, Any]:
    """Forward, chunked prefill, greedy/sampled/batched generation, chunked-prefill generation."""
    from bigload import distributed

    ids = torch.tensor(PROMPT)
    out: dict[str, Any] = {"units": [(u.name, u.rank) for u in model.bigload_plan.units],
                           "loaded": list(model.bigload_report.loaded)}
    with torch.no_grad():
        full = model(ids)
        out["logits"] = _held(model, full.logits)
        out["logits_holders"] = distributed.holders(model, full.logits)
        out["gathered"] = distributed.gather(model, full).logits
        first = model(ids[:, :8], use_cache=True)
        second = model(ids[:, 8:], cache=first.cache, use_cache=True)
        out["chunked"] = _held(model, second.logits)
    out["greedy"] = model.generate(ids, max_new_tokens=6, do_sample=False)
    torch.manual_seed(7)
    out["sampled"] = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20)
    out["batch"] = model.generate(torch.tensor(BATCH), attention_mask=torch.tensor(BATCH_MASK),
                                  max_new_tokens=5, do_sample=False)
    out["chunked_generate"] = model.generate(ids, max_new_tokens=4, do_sample=False,
                                             prefill_chunk_size=5)
    if eos is not None:
        out["eos"] = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=eos)
    return out


def _reference_causal(folder: Path, eos: int | None) -> dict[str, Any]:
    import bigload

    model = bigload.load(folder)
    ids = torch.tensor(PROMPT)
    ref: dict[str, Any] = {}
    with torch.no_grad():
        ref["logits"] = model(ids).logits
        first = model(ids[:, :8], use_cache=True)
        ref["chunked"] = model(ids[:, 8:], cache=first.cache, use_cache=True).logits
    ref["greedy"] = model.generate(ids, max_new_tokens=6, do_sample=False)
    torch.manual_seed(7)
    ref["sampled"] = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20)
    ref["batch"] = model.generate(torch.tensor(BATCH), attention_mask=torch.tensor(BATCH_MASK),
                                  max_new_tokens=5, do_sample=False)
    ref["chunked_generate"] = model.generate(ids, max_new_tokens=4, do_sample=False,
                                             prefill_chunk_size=5)
    if eos is not None:
        ref["eos"] = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=eos)
    return ref


def two_rank_models(rank: int, world: int, folders: dict[str, Path], eos: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    llama = _causal_checks(_load(folders["llama"], max_memory={"cpu": "1GB"}), eos)
    t5 = _load(folders["t5"], max_memory={"cpu": "1GB"})
    enc, dec = torch.tensor([PROMPT[0][:8]]), torch.tensor([[0, 3, 4]])
    with torch.no_grad():
        t5_logits = _held(t5, t5(enc, decoder_input_ids=dec).logits)
    t5_out = {"units": [(u.name, u.rank) for u in t5.bigload_plan.units], "logits": t5_logits,
              "greedy": t5.generate(enc, max_new_tokens=5, do_sample=False)}
    bart = _load(folders["bart"], max_memory={"cpu": "1GB"})
    with torch.no_grad():
        bart_logits = _held(bart, bart(enc, decoder_input_ids=dec).logits)
    return {"llama": llama, "t5": t5_out, "bart": bart_logits}


def three_rank_models(rank: int, world: int, folders: dict[str, Path]) -> dict[str, Any]:
    torch.set_num_threads(1)
    code = _load(folders["gpt_bigcode"], max_memory={"cpu": "1GB"})
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        code_logits = _held(code, code(ids).logits)
    bert = _load(folders["bert"], max_memory={"cpu": "1GB"})
    with torch.no_grad():
        bert_logits = _held(bert, bert(ids).logits)
    moe = _load(folders["mixtral"], max_memory={"cpu": "1GB"})  # experts route by value
    with torch.no_grad():
        moe_logits = _held(moe, moe(ids).logits)
    return {"moe_logits": moe_logits, "moe_greedy": moe.generate(ids, max_new_tokens=4),
            "code_units": [(u.name, u.rank) for u in code.bigload_plan.units],
            "code_logits": code_logits,
            "code_greedy": code.generate(ids, max_new_tokens=6, do_sample=False),
            "bert_units": [(u.name, u.rank) for u in bert.bigload_plan.units],
            "bert_logits": bert_logits}


# --- the tests ---------------------------------------------------------------------------------
def _reference_seq2seq(folder: Path) -> dict[str, Any]:
    import bigload

    model = bigload.load(folder)
    enc, dec = torch.tensor([PROMPT[0][:8]]), torch.tensor([[0, 3, 4]])
    with torch.no_grad():
        logits = model(enc, decoder_input_ids=dec).logits
    return {"logits": logits, "greedy": model.generate(enc, max_new_tokens=5, do_sample=False)}


def _equal_where_held(results: list[Any], key: Any, reference: torch.Tensor) -> int:
    held = [key(r) for r in results if key(r) is not None]
    for value in held:
        assert torch.equal(value, reference), (value - reference).abs().max()
    return len(held)


def test_two_ranks_llama_t5_bart_match_one_process(folders: dict[str, Path],
                                                  tmp_path: Path) -> None:
    import bigload

    greedy = bigload.load(folders["llama"]).generate(torch.tensor(PROMPT), max_new_tokens=6,
                                                     do_sample=False)
    eos = int(greedy[0, len(PROMPT[0]) + 2])  # stops generation after 3 tokens
    ref = _reference_causal(folders["llama"], eos)
    results = ok(run_ranks(two_rank_models, 2, tmp_path, folders, eos))
    llama = [r["llama"] for r in results]
    units = dict(llama[0]["units"])
    # a stage per rank, and the tied embedding and head on different ranks
    assert set(units.values()) == {0, 1}
    assert units["model.embed_tokens"] != units["lm_head"]
    # each rank read only its own stage's tensors (and the tied embedding, read by both)
    for rank, res in enumerate(llama):
        mine = {n for n, r in units.items() if r == rank}
        assert all(any(f == n or f.startswith(n + ".") for n in mine) or f == "lm_head.weight"
                   or "embed_tokens" in f for f in res["loaded"]), res["loaded"]
    assert not any("layers.1." in f for f in llama[0]["loaded"])
    assert not any("layers.0." in f for f in llama[1]["loaded"])
    # logits stay on the rank that computes them, equal to one process; gather shares them
    assert _equal_where_held(llama, lambda r: r["logits"], ref["logits"]) == 1
    assert llama[0]["logits_holders"] == (units["lm_head"],)
    for res in llama:
        assert torch.equal(res["gathered"], ref["logits"])
    assert _equal_where_held(llama, lambda r: r["chunked"], ref["chunked"]) == 1
    # generate: the same tokens, on every rank
    for key in ("greedy", "sampled", "batch", "chunked_generate", "eos"):
        for res in llama:
            assert torch.equal(res[key], ref[key]), (key, res[key], ref[key])
    assert ref["eos"].shape[1] < len(PROMPT[0]) + 8
    t5_ref = _reference_seq2seq(folders["t5"])
    t5 = [r["t5"] for r in results]
    assert set(dict(t5[0]["units"]).values()) == {0, 1}
    assert _equal_where_held(t5, lambda r: r["logits"], t5_ref["logits"]) == 1
    for res in t5:
        assert torch.equal(res["greedy"], t5_ref["greedy"])
    bart_ref = _reference_seq2seq(folders["bart"])
    assert _equal_where_held(results, lambda r: r["bart"], bart_ref["logits"]) == 1


def test_three_ranks_gpt_bigcode_bert_mixtral_match_one_process(folders: dict[str, Path],
                                                               tmp_path: Path) -> None:
    import bigload

    code = bigload.load(folders["gpt_bigcode"])
    bert = bigload.load(folders["bert"])
    moe = bigload.load(folders["mixtral"])
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        code_ref, bert_ref, moe_ref = code(ids).logits, bert(ids).logits, moe(ids).logits
    code_greedy = code.generate(ids, max_new_tokens=6, do_sample=False)
    moe_greedy = moe.generate(ids, max_new_tokens=4)
    results = ok(run_ranks(three_rank_models, 3, tmp_path, folders))
    assert set(dict(results[0]["code_units"]).values()) >= {0, 1, 2}
    assert set(dict(results[0]["bert_units"]).values()) >= {0, 1, 2}
    assert _equal_where_held(results, lambda r: r["code_logits"], code_ref) == 1
    assert _equal_where_held(results, lambda r: r["bert_logits"], bert_ref) == 1
    assert _equal_where_held(results, lambda r: r["moe_logits"], moe_ref) == 1
    for res in results:
        assert torch.equal(res["code_greedy"], code_greedy)
        assert torch.equal(res["moe_greedy"], moe_greedy)


# --- tiers inside a rank, uneven stages ----------------------------------------------------------
def disk_and_uneven(rank: int, world: int, folders: dict[str, Path],
                    budgets: list[dict[str, str]]) -> dict[str, Any]:
    model = _load(folders["llama4"], max_memory=budgets)
    ids = torch.tensor(PROMPT)
    view = model.bigload_plan
    with torch.no_grad():
        logits = _held(model, model(ids).logits)
    return {"units": [(u.name, u.rank, u.placement) for u in view.units if u.rank == rank],
            "bytes": dict(model.bigload_report.bytes_per_device), "logits": logits,
            "greedy": model.generate(ids, max_new_tokens=5, do_sample=False)}


def test_uneven_budgets_and_disk_offload_inside_each_rank(folders: dict[str, Path],
                                                           tmp_path: Path) -> None:
    import bigload

    model = bigload.load(folders["llama4"])
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        ref = model(ids).logits
    greedy = model.generate(ids, max_new_tokens=5, do_sample=False)
    total = sum(u.size_bytes for u in model.bigload_plan.units)
    # together the ranks hold less than the model in memory: each sends part to its own disk,
    # and rank 0 (a third of rank 1's memory) gets the smaller stage
    budgets = [{"cpu": str(total // 6)}, {"cpu": str(total // 2)}]
    results = ok(run_ranks(disk_and_uneven, 2, tmp_path, folders, budgets))
    stage = [len({".".join(u[0].split(".")[:3]) for u in r["units"] if "layers" in u[0]})
             for r in results]  # layers (a layer may stream in pieces)
    assert stage[0] < stage[1], stage
    for r in results:
        assert any(p == "disk" for _, _, p in r["units"]), r["units"]
        assert r["bytes"].get("disk", 0) > 0
        assert torch.equal(r["greedy"], greedy)
    assert _equal_where_held(results, lambda r: r["logits"], ref) == 1


# --- faults --------------------------------------------------------------------------------------
def _first_unit_of(model: Any, rank: int) -> Any:
    name = next(u.name for u in model.bigload_plan.units
                if u.rank == rank and "layers" in u.name)
    return model.get_submodule(name)


def fails_mid_call(rank: int, world: int, folders: dict[str, Path], how: str,
                   bad: int) -> dict[str, Any]:
    from bigload.errors import RankFailedError

    model = _load(folders["llama4"], max_memory={"cpu": "1GB"})
    ids = torch.tensor(PROMPT)
    model.generate(ids, max_new_tokens=2, do_sample=False)  # a call that works, first

    def fail(*_: Any) -> None:
        if how == "raise":
            raise ValueError(f"boom on rank {rank}")
        os._exit(7)  # killed: no error reported, no cleanup

    if rank == bad:
        _first_unit_of(model, rank).register_forward_pre_hook(fail)
    start = time.monotonic()
    try:
        model.generate(ids, max_new_tokens=4, do_sample=False)
    except RankFailedError as err:
        return {"failed": err.rank, "message": err.message, "after": time.monotonic() - start}
    except ValueError as err:
        return {"raised": str(err), "after": time.monotonic() - start}
    return {"finished": True}


@pytest.mark.parametrize(("how", "bad"), [("raise", 1), ("kill", 2), ("kill", 0)])
def test_a_rank_that_raises_or_dies_mid_call_fails_every_rank(
        folders: dict[str, Path], tmp_path: Path, how: str, bad: int) -> None:
    results = run_ranks(fails_mid_call, 3, tmp_path, folders, how, bad, timeout=90)
    for rank, res in enumerate(results):
        if rank == bad:
            assert res is None if how == "kill" else res["ok"]["raised"] == "boom on rank 1"
            continue
        assert res is not None and "ok" in res, res and res.get("traceback")
        out = res["ok"]
        assert out.get("failed") == bad, out
        assert out["after"] < RANK_TIMEOUT_S  # at once, not at the timeout
        if how == "raise":
            assert "ValueError: boom on rank 1" in out["message"]
        elif bad == 0:
            assert "rendezvous store" in out["message"]
        else:
            assert "left without reporting an error" in out["message"]


# --- launched differently ------------------------------------------------------------------------
def mismatched(rank: int, world: int, folders: dict[str, Path]) -> dict[str, Any]:
    import bigload
    from bigload.distributed import agree
    from bigload.errors import DoesNotFitError, RankMismatchError

    found: dict[str, Any] = {}

    def attempt(key: str, **kwargs: Any) -> None:
        folder = kwargs.pop("folder", folders["llama4"])
        try:
            _load(folder, **kwargs)
            found[key] = "loaded"
        except (RankMismatchError, DoesNotFitError) as err:
            found[key] = (type(err).__name__, str(err), getattr(err, "ranks", None))

    # another checkpoint on rank 1
    attempt("checkpoint", max_memory={"cpu": "1GB"},
            folder=folders["llama_wide"] if rank == 1 else folders["llama4"])
    # another bigload version on rank 1
    version = bigload.__version__
    bigload.__version__ = "9.9.9" if rank == 1 else version
    attempt("versions", max_memory={"cpu": "1GB"})
    bigload.__version__ = version
    # other planning options on rank 1: another plan
    attempt("plan", max_memory={"cpu": "1GB"}, no_split_module_classes=["LlamaDecoderLayer"]
            if rank == 1 else [])
    # rank 1 is given more memory than its machine has
    real = agree.free_memory_bytes
    agree.free_memory_bytes = (lambda device: 1000) if rank == 1 else real
    attempt("memory", max_memory={"cpu": "1GB"})
    agree.free_memory_bytes = real
    # and then a good launch, called with another prompt on rank 1
    model = _load(folders["llama4"], max_memory={"cpu": "1GB"})
    prompt = [[5, 6, 7, 9]] if rank == 1 else [[5, 6, 7, 8]]
    try:
        model.generate(torch.tensor(prompt), max_new_tokens=2)
        found["inputs"] = "ran"
    except RankMismatchError as err:
        found["inputs"] = (type(err).__name__, str(err), err.ranks)
    found["after"] = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=2)
    return found


def test_mismatched_launches_fail_on_every_rank_before_reading(folders: dict[str, Path],
                                                               tmp_path: Path) -> None:
    results = ok(run_ranks(mismatched, 2, tmp_path, folders))
    for res in results:
        kind, text, ranks = res["checkpoint"]
        assert kind == "RankMismatchError" and ranks == [1] and "different checkpoint" in text
        kind, text, ranks = res["versions"]
        assert kind == "RankMismatchError" and "bigload 9.9.9" in text
        kind, text, ranks = res["plan"]
        assert kind == "RankMismatchError" and "another plan" in text
        kind, text, _ = res["memory"]
        assert kind == "DoesNotFitError" and "rank 1" in text and "rank 0" not in text
        kind, text, ranks = res["inputs"]
        assert kind == "RankMismatchError" and ranks == [1]
    # a mismatch leaves the group usable: the next call runs on every rank
    assert torch.equal(results[0]["after"], results[1]["after"])


# --- the command line ---------------------------------------------------------------------------
def cli_run(rank: int, world: int, folder: Path) -> dict[str, Any]:
    import contextlib
    import io
    import json

    from bigload.cli.main import main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["run", str(folder), "--world", "auto", "--max-memory", "cpu=1GB",
                     "--max-new-tokens", "4", "--json"])
    text = stdout.getvalue()
    return {"code": code, "out": json.loads(text) if text else None}


def test_cli_run_across_ranks_prints_once_with_each_ranks_figures(tmp_path: Path) -> None:
    import bigload
    from cli.cli_tools import WORDS
    from cli.cli_tools import word_tokenizer as _tokenizer

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=2, eos_token_id=3, pad_token_id=1)
    folder = tmp_path / "llama"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    results = ok(run_ranks(cli_run, 2, tmp_path, folder))
    assert [r["code"] for r in results] == [0, 0]
    assert results[1]["out"] is None  # rank 0 prints
    out = results[0]["out"]
    assert out["plan"]["world_size"] == 2 and len(out["ranks"]) == 2
    assert out["plan"]["rank"] == 0 and set(out["plan"]["devices"]) == {"cpu"}
    assert sum(r["loaded"] for r in out["ranks"]) >= 2 + 4 * 9  # each rank its own stage
    one = bigload.load(folder)
    tokenizer = _tokenizer()
    ids = tokenizer("Once upon a time", return_tensors="pt")
    expected = one.generate(**ids, max_new_tokens=4, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert out["result"]["generated"] == tokenizer.decode(expected, skip_special_tokens=True)


def test_cli_run_nproc_launches_torchrun_with_the_same_command(monkeypatch: Any) -> None:
    import subprocess

    from bigload.cli.main import main

    calls = []
    monkeypatch.setattr(subprocess, "call", lambda command: calls.append(command) or 0)
    assert main(["run", "some/folder", "--nproc", "3", "--max-memory", "cpu=1GB"]) == 0
    command = calls[0]
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node=3"]
    assert command[5:] == ["-m", "bigload", "run", "some/folder", "--max-memory", "cpu=1GB",
                           "--world", "auto"]
