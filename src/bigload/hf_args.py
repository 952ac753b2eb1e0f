"""``from_pretrained``'s arguments as ``bigload.load`` takes them, translated once at the edge:
old names, arguments that change nothing here, arguments refused with the reason, and the model
class given as a class, a class name, an Auto class or a task name."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .errors import ModelResolveError, UnsupportedArgumentError

logger = logging.getLogger(__name__)

# old name -> the name bigload.load takes
ALIASES = {"torch_dtype": "dtype", "offload_folder": "offload_dir"}

# accepted and without effect here, for the values the predicate accepts
NO_OPS: dict[str, Callable[[Any], bool]] = {
    "low_cpu_mem_usage": lambda v: True,  # bigload always streams tensors straight to their place
    "offload_state_dict": lambda v: True,  # ditto: nothing is staged in memory
    "_from_auto": lambda v: True,  # set by transformers' Auto classes on their way to the class
    "weights_only": lambda v: v is True,  # torch pickles are only read with weights_only=True
    "use_safetensors": lambda v: v in (True, None),  # preferred when a folder has both
    # transformers' Auto classes pass their hub arguments here; an adapter found sets the path
    "adapter_kwargs": lambda v: not v or "_adapter_model_path" not in v,
}

REFUSED = {
    "quantization_config": "bigload loads unquantised weights; load quantised models with "
                           "transformers itself",
    "state_dict": "bigload reads the weights from the checkpoint folder; for tensors in memory "
                  "build the model and use bigload.load_checkpoint_and_dispatch",
    "output_loading_info": "the load report is model.bigload_report (loaded, initialised, "
                           "unexpected, cast)",
    "tp_plan": "tensor parallelism is not supported; device_map splits the model by layers",
    "tp_size": "tensor parallelism is not supported; device_map splits the model by layers",
    "device_mesh": "tensor parallelism is not supported; device_map splits the model by layers",
    "gguf_file": "GGUF checkpoints are not supported; load the safetensors checkpoint",
    "from_tf": "only PyTorch checkpoints (safetensors, .bin) load",
    "from_flax": "only PyTorch checkpoints (safetensors, .bin) load",
    "proxies": "set HTTPS_PROXY in the environment instead (huggingface_hub honours it)",
    "weights_only": "torch pickles are only ever read with weights_only=True",
    "use_safetensors": "bigload prefers safetensors and reads .bin only when a folder has no "
                       "safetensors",
    "adapter_kwargs": "PEFT adapters are not applied by bigload.load; load the base model, "
                      "then apply the adapter with peft",
}

# task names (transformers' pipeline names and the *-lm names) -> Auto class
TASKS = {
    "feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "multiple-choice": "AutoModelForMultipleChoice",
    "fill-mask": "AutoModelForMaskedLM",
    "masked-lm": "AutoModelForMaskedLM",
    "text-generation": "AutoModelForCausalLM",
    "causal-lm": "AutoModelForCausalLM",
    "text2text-generation": "AutoModelForSeq2SeqLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "translation": "AutoModelForSeq2SeqLM",
    "summarization": "AutoModelForSeq2SeqLM",
    "image-classification": "AutoModelForImageClassification",
    "image-text-to-text": "AutoModelForImageTextToText",
    "speech-seq2seq": "AutoModelForSpeechSeq2Seq",
    "ctc": "AutoModelForCTC",
}


def translate_kwargs(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(renamed, rest)``: old names under their new ones, no-ops dropped, the others in ``rest``
    (config attributes, or unknown). Raises UnsupportedArgumentError for a refused argument."""
    renamed: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name in NO_OPS and NO_OPS[name](value):
            logger.debug("%s=%r changes nothing in bigload.load", name, value)
        elif name in REFUSED:
            raise UnsupportedArgumentError(
                f"bigload.load does not take {name}={value!r}: {REFUSED[name]}.")
        elif name in ALIASES:
            renamed[ALIASES[name]] = value
        else:
            rest[name] = value
    return renamed, rest


def pick(name: str, given: Any, old: Any) -> Any:
    """The value of ``name``, given under its name or under its old one (not both)."""
    if old is None:
        return given
    old_name = next(k for k, v in ALIASES.items() if v == name)
    if given is not None:
        raise UnsupportedArgumentError(
            f"bigload.load got both {name}={given!r} and {old_name}={old!r}: pass {name} only.")
    if name == "dtype":  # transformers' own deprecation notice, said the same way
        logger.warning("`torch_dtype` is deprecated! Use `dtype` instead!")
    return old


def refuse_unknown(names: Iterable[str], accepted: Iterable[str], what: str) -> None:
    """An UnsupportedArgumentError listing ``names`` (unknown) and every accepted name."""
    unknown = sorted(names)
    if not unknown:
        return
    listed = ", ".join(sorted(set(accepted)))
    raise UnsupportedArgumentError(
        f"bigload.load got unknown argument(s) {', '.join(unknown)}: not {what}. It takes: "
        f"{listed}; from_pretrained's old names {', '.join(sorted(ALIASES))}; and any attribute "
        "of the model's config (num_labels=2, ...) as an override.")


# --- the model class ---------------------------------------------------------------------------
def model_class_from(model_class: Any, transformers: Any) -> Any:
    """A transformers class (model or Auto) from a class, a class name or a task name."""
    if not isinstance(model_class, str):
        return model_class
    found = getattr(transformers, model_class, None) or getattr(
        transformers, TASKS.get(model_class.lower().replace("_", "-"), ""), None)
    if found is None:
        raise ModelResolveError(
            f"model_class={model_class!r} is neither a transformers class (e.g. "
            "'LlamaForCausalLM', 'AutoModelForSequenceClassification') nor a task name: "
            f"{', '.join(sorted(TASKS))}.")
    return found


def remote_auto_class(config: Any, transformers: Any) -> Any:
    """The Auto class whose ``auto_map`` entry builds ``config.architectures[0]`` (remote code),
    else the first AutoModel* entry of the map, else None."""
    auto_map = getattr(config, "auto_map", None) or {}
    names = [k for k in auto_map if k.startswith("AutoModel")]
    wanted = (getattr(config, "architectures", None) or [None])[0]
    for name in names:
        ref = auto_map[name][0] if isinstance(auto_map[name], (list, tuple)) else auto_map[name]
        if wanted and str(ref).rsplit(".", 1)[-1] == wanted:
            return getattr(transformers, name)
    return getattr(transformers, names[0]) if names else None
