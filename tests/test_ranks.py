"""A model across torch.distributed ranks (gloo on loopback, spawned processes): the same
logits and the same generated tokens as one process, each rank reading only its own tensors,
and a failing rank taking every other rank down with its error in bounded time.

Each test spawns its ranks once and checks several things in them (a spawn costs seconds);
references come from one process (bigload.load, the same kernels: equal bit for bit).
"""

from __future__ import annotations

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
    return {"code_units": [(u.name, u.rank) for u in code.bigload_plan.units],
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


def test_three_ranks_gpt_bigcode_bert_match_one_process(folders: dict[str, Path],
                                                       tmp_path: Path) -> None:
    import bigload

    code = bigload.load(folders["gpt_bigcode"])
    bert = bigload.load(folders["bert"])
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        code_ref, bert_ref = code(ids).logits, bert(ids).logits
    code_greedy = code.generate(ids, max_new_tokens=6, do_sample=False)
    results = ok(run_ranks(three_rank_models, 3, tmp_path, folders))
    assert set(dict(results[0]["code_units"]).values()) >= {0, 1, 2}
    assert set(dict(results[0]["bert_units"]).values()) >= {0, 1, 2}
    assert _equal_where_held(results, lambda r: r["code_logits"], code_ref) == 1
    assert _equal_where_held(results, lambda r: r["bert_logits"], bert_ref) == 1
    for res in results:
        assert torch.equal(res["code_greedy"], code_greedy)
