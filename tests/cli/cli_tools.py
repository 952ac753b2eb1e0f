"""What the ``bigload`` command's tests share besides fixtures: ``run_cli`` (the command run
in-process), the word-level tokenizer of the tiny models, and budgets that split them."""

from __future__ import annotations

import pytest

from bigload.cli.main import main

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ("[UNK] [PAD] <s> </s> the a cat dog sat on mat ran fast slow big small red blue green "
         "house tree").split()
PROMPT = "the cat sat on"
# with no unit fetched ahead (the default on the CPU) this budget splits the tiny llama (78 KiB
# in float32; its two blocks are half the model: holding one ahead would leave nothing to save)
DISK_BUDGET = ["--max-memory", "cpu=60KB,disk=1GB", "--prefetch", "0"]


def run_cli(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def word_tokenizer():
    vocab = {word: i for i, word in enumerate(WORDS)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
        eos_token="</s>")
