"""What ``bigload run`` does with a loaded model, by kind: greedy generation (tokens streamed to
stdout as they come), sentence embeddings and their similarities (the library's own
``encode``/``similarity``), cross-encoder scores of text pairs (``predict``), or mean-pooled
hidden states of any other model; and how each result reads."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

Kind = Literal["sentence", "cross", "generate", "encode"]

KIND_NAMES = {"sentence": "sentence embeddings", "cross": "cross-encoder scores of text pairs",
              "generate": "greedy generation", "encode": "encoder, mean-pooled hidden states"}
DEFAULT_TEXTS = (
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
)
DEFAULT_PROMPT = "Once upon a time"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


# --- what kind of model ------------------------------------------------------------------------
def model_kind(folder: Path, model_class: str | None = None) -> Kind:
    """A sentence-transformers folder → sentence (cross for a CrossEncoder); a causal or
    seq2seq LM architecture → generate; anything else → encode."""
    from bigload.hf import read_json, transformer_folder

    if (folder / "modules.json").is_file() and not _names_transformers_class(model_class):
        saved = folder / "config_sentence_transformers.json"
        name = model_class or (read_json(saved).get("model_type") if saved.is_file() else None)
        return "cross" if name == "CrossEncoder" else "sentence"
    from transformers.models.auto import modeling_auto

    config = read_json(transformer_folder(folder) / "config.json")
    names = [model_class] if model_class else list(config.get("architectures") or [])
    generators = {*modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values(),
                  *modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values()}
    if any(name.endswith("ForCausalLM") or name in generators for name in names):
        return "generate"
    return "encode"


def _names_transformers_class(model_class: str | None) -> bool:
    from bigload.sentence_transformers_compat import names_transformers_class

    return names_transformers_class(model_class)


def check_tokenizer(folder: Path) -> None:
    """Before a long load: refuse a folder with no tokenizer files at all."""
    from bigload.errors import ModelResolveError

    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelResolveError(
            f"'{folder}' has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); bigload run "
            "needs one to turn text into tokens. Save it next to the weights with "
            "tokenizer.save_pretrained(folder), or run a folder that has one."
        )


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    from bigload.errors import ModelResolveError

    check_tokenizer(folder)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ModelResolveError(
            f"'{folder}' has no usable tokenizer ({type(err).__name__}: {err}); bigload run "
            "needs one to turn text into tokens. Save it into the folder "
            "(tokenizer.save_pretrained(folder)) or run a folder that has one."
        ) from err


# --- running -----------------------------------------------------------------------------------
def run_model(model: Any, kind: Kind, tokenizer: Any, *, texts: Sequence[str] | None,
              prompt: str | None, max_new_tokens: int, stream: bool) -> dict[str, Any]:
    """Run ``model`` as its kind wants; ``stream``: print generated text as it comes."""
    import torch

    with torch.inference_mode():
        if kind == "generate":
            return generate(model, tokenizer, prompt or DEFAULT_PROMPT, max_new_tokens,
                            stream=stream)
        texts = list(texts or DEFAULT_TEXTS)
        if kind == "cross":
            return cross_scores(model, texts)
        if kind == "sentence":
            return sentence_embeddings(model, texts)
        embeddings = mean_pooled(model, tokenizer, texts)
        return {"texts": texts, "embeddings": embeddings.tolist(), "similarity_fn": "cosine",
                "similarity": cosine_similarities(embeddings).tolist()}


def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, *,
             stream: bool) -> dict[str, Any]:
    """Greedy generation; the new tokens are those after the prompt (after the decoder's start
    token for an encoder-decoder), as the streamer receives them."""
    inputs = tokenizer(prompt, return_tensors="pt").to(model.bigload_plan.main_device)
    streamer = token_streamer(tokenizer, echo=stream)
    if stream:
        _write(f"prompt: {prompt}\ngenerated: ")
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                            streamer=streamer)
    new = output[0, streamer.prompt_length:].tolist()
    return {"prompt": prompt, "generated": tokenizer.decode(new, skip_special_tokens=True),
            "new_tokens": len(new), "token_ids": new}


def token_streamer(tokenizer: Any, *, echo: bool) -> Any:
    """transformers' TextStreamer, writing to stdout only when ``echo``; it also records the
    length of what ``generate`` hands it first: the prompt (the decoder's start for an
    encoder-decoder), before each new token."""
    return _streamer_class()(tokenizer, echo)


@lru_cache(maxsize=1)
def _streamer_class() -> type:
    from transformers import TextStreamer

    class TokenStreamer(TextStreamer):
        def __init__(self, tokenizer: Any, echo: bool) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.echo = echo
            self.prompt_length: int | None = None

        def put(self, value: Any) -> None:
            if self.prompt_length is None:
                self.prompt_length = int(value.shape[-1])
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if self.echo:
                _write(text + ("\n" if stream_end else ""))

    return TokenStreamer


def sentence_embeddings(model: Any, texts: list[str]) -> dict[str, Any]:
    """The library's own encode and similarity (cosine, dot... as the model says); sparse
    embeddings (a SparseEncoder) as their non-zero entries."""
    embeddings = model.encode(texts, convert_to_tensor=True)
    similarity = model.similarity(embeddings, embeddings).float().cpu()
    out: dict[str, Any] = {"texts": texts, "dimensions": int(embeddings.shape[-1]),
                           "similarity_fn": str(model.similarity_fn_name),
                           "similarity": similarity.tolist()}
    if embeddings.is_sparse:
        rows = embeddings.coalesce().cpu().to_dense()
        out["sparse_embeddings"] = [
            {"indices": row.nonzero().flatten().tolist(), "values": row[row != 0].tolist()}
            for row in rows]
    else:
        out["embeddings"] = embeddings.float().cpu().tolist()
    return out


def cross_scores(model: Any, texts: list[str]) -> dict[str, Any]:
    """Every ordered pair of different texts scored with ``predict`` (one score, or one per
    label for a classifier)."""
    pairs = [(i, j) for i in range(len(texts)) for j in range(len(texts)) if i != j]
    scores = model.predict([(texts[i], texts[j]) for i, j in pairs], convert_to_tensor=True,
                           show_progress_bar=False)
    scores = scores.float().cpu()
    labels = _labels(model, scores)
    return {"texts": texts, "labels": labels,
            "pairs": [{"first": i + 1, "second": j + 1,
                       "score": score.tolist()} for (i, j), score in zip(pairs, scores)]}


def _labels(model: Any, scores: Any) -> list[str] | None:
    if scores.dim() < 2:
        return None
    config = getattr(getattr(model[0], "auto_model", None), "config", None)
    names = getattr(config, "id2label", None) or {}
    return [str(names.get(i, f"label {i}")) for i in range(scores.shape[-1])]


def mean_pooled(model: Any, tokenizer: Any, texts: Sequence[str]) -> Any:
    """Mean of the last hidden states over the real tokens (the attention mask)."""
    batch = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
    batch = batch.to(model.bigload_plan.main_device)
    out = model(**batch, output_hidden_states=True)
    if model.bigload_plan.world_size > 1:  # the hidden states are on the last stage's rank
        from bigload import distributed

        out = distributed.gather(model, out)
    tokens = getattr(out, "last_hidden_state", None)
    if tokens is None:
        tokens = out.hidden_states[-1]
    weights = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
    mean = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    return mean.float().cpu()


def cosine_similarities(embeddings: Any) -> Any:
    import torch

    unit = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    return unit @ unit.T


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# --- how results read --------------------------------------------------------------------------
def render_result(result: dict[str, Any], *, streamed: bool) -> list[str]:
    if "generated" in result:
        return _render_generated(result, streamed=streamed)
    if "pairs" in result:
        return _render_pairs(result)
    texts, sims = result["texts"], result["similarity"]
    dim = result.get("dimensions") or (len(result["embeddings"][0]) if texts else 0)
    sparse = result.get("sparse_embeddings")
    active = (f" (sparse: {sum(len(e['indices']) for e in sparse) / len(sparse):.0f} non-zero "
              "on average)" if sparse else "")
    lines = [f"embeddings: {len(texts)} × {dim}{active}"]
    lines += [f"  [{i}] {text}" for i, text in enumerate(texts, 1)]
    lines.append(f"{result['similarity_fn']} similarity:")
    lines += _matrix(len(texts), lambda i, j: f"{sims[i][j]:8.4f}")
    return lines


def _render_generated(result: dict[str, Any], *, streamed: bool) -> list[str]:
    n = result["new_tokens"]
    lines = [] if streamed else [f"prompt: {result['prompt']}",
                                 f"generated: {result['generated']}"]
    if not result["generated"].strip():
        lines.append(f"({_plural(n, 'new token')} that decode to no text; their ids: "
                     f"{result['token_ids']})")
    else:
        lines.append(f"({_plural(n, 'new token')}, greedy)")
    return lines


def _render_pairs(result: dict[str, Any]) -> list[str]:
    texts, labels = result["texts"], result["labels"]
    lines = [f"texts: {len(texts)}", *(f"  [{i}] {t}" for i, t in enumerate(texts, 1))]
    if labels is None:
        scores = {(p["first"] - 1, p["second"] - 1): p["score"] for p in result["pairs"]}
        lines.append("cross-encoder scores (row: first text, column: second):")
        return lines + _matrix(len(texts), lambda i, j: f"{scores[i, j]:8.4f}"
                               if (i, j) in scores else f"{'-':>8}")
    lines.append("cross-encoder scores per label:")
    for pair in result["pairs"]:
        parts = ", ".join(f"{name} {value:.4f}" for name, value in zip(labels, pair["score"]))
        lines.append(f"  [{pair['first']}] → [{pair['second']}]  {parts}")
    return lines


def _matrix(n: int, cell: Any) -> list[str]:
    lines = ["      " + "".join(f"{f'[{j}]':>8}" for j in range(1, n + 1))]
    lines += [f"  {f'[{i + 1}]':4}" + "".join(cell(i, j) for j in range(n)) for i in range(n)]
    return lines


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
