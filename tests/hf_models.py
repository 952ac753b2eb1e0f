"""Tiny transformers models for the conformance test: one row per architecture.

Each row names its config and model classes (strings: this module imports without
transformers), the ``AutoModelFor*`` class that loads the reference, the kind of inputs it
takes, and the config overrides that make it tiny (hidden 32, 2 layers, vocab 128). Token ids
that configs default to beyond the tiny vocabulary (pad/bos/eos/decoder start) are set small.
``fast`` rows run by default; the rest are ``@pytest.mark.slow``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

VOCAB = 128
HIDDEN = 32
HEADS = 4
FFN = 64
LAYERS = 2
POSITIONS = 64

# kinds of inputs (see test_conformance.make_inputs)
CAUSAL = "causal"  # input_ids -> logits; greedy generate compared too
ENCODER = "encoder"  # input_ids -> logits (masked LM head)
SEQ2SEQ = "seq2seq"  # input_ids + decoder_input_ids -> logits
VISION = "vision"  # pixel_values (1, 3, 32, 32) -> logits
WHISPER = "whisper"  # input_features (1, mel bins, 2 * max_source_positions) + decoder ids
AUDIO = "audio"  # input_values (1, samples) -> CTC logits


@dataclass(frozen=True)
class HFModel:
    name: str  # transformers model_type (the test id)
    config: str  # config class
    model: str  # model class (saved as config.architectures[0])
    auto: str  # Auto class that loads the reference
    kind: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    tied: bool = False  # the model ties its input embeddings to its output head
    fast: bool = False  # in the default (fast) subset
    cpu_fraction: float = 0.5  # CPU budget, as a fraction of the model's bytes
    absent: tuple[str, ...] = ()  # tensors the model never saves (initialised on load)
    derived: bool = False  # the checkpoint stores some tensors split (built on load)

    def __str__(self) -> str:
        return self.name


def _decoder(**extra: Any) -> dict[str, Any]:
    """Llama-style decoder-only config names."""
    return {**dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                   intermediate_size=FFN, vocab_size=VOCAB, max_position_embeddings=POSITIONS),
            **extra}


def _bart(**extra: Any) -> dict[str, Any]:
    """BART-style encoder-decoder config names."""
    return {**dict(d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                   encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
                   encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, vocab_size=VOCAB,
                   max_position_embeddings=POSITIONS), **extra}


def _bert(**extra: Any) -> dict[str, Any]:
    """BERT-style encoder config names."""
    return _decoder(**extra)


_SMALL_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

MODELS: tuple[HFModel, ...] = (
    # --- decoder-only -------------------------------------------------------------------------
    HFModel("gpt2", "GPT2Config", "GPT2LMHeadModel", "AutoModelForCausalLM", CAUSAL,
            dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS,
                 vocab_size=VOCAB, bos_token_id=1, eos_token_id=2),
            tied=True, fast=True),
    HFModel("gpt_bigcode", "GPTBigCodeConfig", "GPTBigCodeForCausalLM", "AutoModelForCausalLM",
            CAUSAL, dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS,
                         vocab_size=VOCAB, multi_query=True, bos_token_id=1, eos_token_id=2),
            tied=True),
    HFModel("llama", "LlamaConfig", "LlamaForCausalLM", "AutoModelForCausalLM", CAUSAL,
            _decoder(num_key_value_heads=2, tie_word_embeddings=True), tied=True, fast=True),
    HFModel("mistral", "MistralConfig", "MistralForCausalLM", "AutoModelForCausalLM", CAUSAL,
            _decoder(num_key_value_heads=2, sliding_window=16)),
    HFModel("mixtral", "MixtralConfig", "MixtralForCausalLM", "AutoModelForCausalLM", CAUSAL,
            _decoder(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
            fast=True, derived=True),  # v5: per-expert w1/w2/w3 in the checkpoint, fused in model
    HFModel("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", "AutoModelForCausalLM",
            CAUSAL, _decoder(num_key_value_heads=2, head_dim=8, moe_intermediate_size=16,
                             num_experts=4, num_experts_per_tok=2, bos_token_id=1,
                             eos_token_id=2),
            derived=True),  # v5: per-expert gate/up/down_proj in the checkpoint, fused in the model
    HFModel("qwen2", "Qwen2Config", "Qwen2ForCausalLM", "AutoModelForCausalLM", CAUSAL,
            _decoder(num_key_value_heads=2, tie_word_embeddings=True), tied=True),
    HFModel("qwen3", "Qwen3Config", "Qwen3ForCausalLM", "AutoModelForCausalLM", CAUSAL,
            _decoder(num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)),
    HFModel("gemma", "GemmaConfig", "GemmaForCausalLM", "AutoModelForCausalLM", CAUSAL,
            _decoder(num_key_value_heads=1, head_dim=8, **_SMALL_IDS), tied=True),
    HFModel("gemma2", "Gemma2Config", "Gemma2ForCausalLM", "AutoModelForCausalLM", CAUSAL,
            _decoder(num_key_value_heads=2, head_dim=8, sliding_window=16, **_SMALL_IDS),
            tied=True),
    HFModel("phi", "PhiConfig", "PhiForCausalLM", "AutoModelForCausalLM", CAUSAL,
            _decoder(partial_rotary_factor=0.5, bos_token_id=1, eos_token_id=2)),
    HFModel("phi3", "Phi3Config", "Phi3ForCausalLM", "AutoModelForCausalLM", CAUSAL,
            _decoder(num_key_value_heads=2, **_SMALL_IDS)),
    HFModel("starcoder2", "Starcoder2Config", "Starcoder2ForCausalLM", "AutoModelForCausalLM",
            CAUSAL, _decoder(num_key_value_heads=2, bos_token_id=1, eos_token_id=2), tied=True),
    HFModel("falcon", "FalconConfig", "FalconForCausalLM", "AutoModelForCausalLM", CAUSAL,
            dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                 vocab_size=VOCAB, bos_token_id=1, eos_token_id=2), tied=True),
    HFModel("bloom", "BloomConfig", "BloomForCausalLM", "AutoModelForCausalLM", CAUSAL,
            dict(hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB,
                 **_SMALL_IDS), tied=True),
    HFModel("opt", "OPTConfig", "OPTForCausalLM", "AutoModelForCausalLM", CAUSAL,
            dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                 ffn_dim=FFN, word_embed_proj_dim=HIDDEN, vocab_size=VOCAB,
                 max_position_embeddings=POSITIONS, pad_token_id=1, bos_token_id=2,
                 eos_token_id=2), tied=True),
    HFModel("gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", "AutoModelForCausalLM", CAUSAL,
            _decoder(bos_token_id=1, eos_token_id=2)),
    # --- encoder-only -------------------------------------------------------------------------
    HFModel("bert", "BertConfig", "BertForMaskedLM", "AutoModelForMaskedLM", ENCODER,
            _bert(), tied=True, fast=True),
    HFModel("roberta", "RobertaConfig", "RobertaForMaskedLM", "AutoModelForMaskedLM", ENCODER,
            _bert(pad_token_id=1, bos_token_id=0, eos_token_id=2), tied=True),
    HFModel("deberta-v2", "DebertaV2Config", "DebertaV2ForMaskedLM", "AutoModelForMaskedLM",
            ENCODER, _bert(relative_attention=True, position_buckets=16,
                           pos_att_type=["p2c", "c2p"]), tied=True),
    HFModel("distilbert", "DistilBertConfig", "DistilBertForMaskedLM", "AutoModelForMaskedLM",
            ENCODER, dict(dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN,
                          vocab_size=VOCAB, max_position_embeddings=POSITIONS), tied=True),
    HFModel("electra", "ElectraConfig", "ElectraForMaskedLM", "AutoModelForMaskedLM", ENCODER,
            _bert(embedding_size=16), tied=True),
    HFModel("albert", "AlbertConfig", "AlbertForMaskedLM", "AutoModelForMaskedLM", ENCODER,
            _bert(embedding_size=16, **_SMALL_IDS), tied=True),
    # --- encoder-decoder ----------------------------------------------------------------------
    HFModel("t5", "T5Config", "T5ForConditionalGeneration", "AutoModelForSeq2SeqLM", SEQ2SEQ,
            dict(d_model=HIDDEN, d_kv=8, d_ff=FFN, num_layers=LAYERS, num_heads=HEADS,
                 vocab_size=VOCAB, decoder_start_token_id=0), tied=True, fast=True),
    HFModel("bart", "BartConfig", "BartForConditionalGeneration", "AutoModelForSeq2SeqLM",
            SEQ2SEQ, _bart(), tied=True),
    HFModel("mbart", "MBartConfig", "MBartForConditionalGeneration", "AutoModelForSeq2SeqLM",
            SEQ2SEQ, _bart(), tied=True),
    HFModel("marian", "MarianConfig", "MarianMTModel", "AutoModelForSeq2SeqLM", SEQ2SEQ,
            _bart(pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
                  decoder_vocab_size=VOCAB), tied=True,
            absent=("model.encoder.embed_positions.weight",  # sinusoidal, not saved
                    "model.decoder.embed_positions.weight")),
    # --- vision -------------------------------------------------------------------------------
    HFModel("vit", "ViTConfig", "ViTForImageClassification", "AutoModelForImageClassification",
            VISION, dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         intermediate_size=FFN, image_size=32, patch_size=8, num_labels=5),
            fast=True),  # v5: checkpoint keeps encoder.layer.N.attention.attention.query names
    HFModel("swin", "SwinConfig", "SwinForImageClassification",
            "AutoModelForImageClassification", VISION,
            dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                 window_size=4, num_labels=5)),
    HFModel("convnext", "ConvNextConfig", "ConvNextForImageClassification",
            "AutoModelForImageClassification", VISION,
            dict(image_size=32, patch_size=4, hidden_sizes=[16, 32], depths=[1, 1],
                 num_stages=2, num_labels=5)),
    HFModel("dinov2", "Dinov2Config", "Dinov2Model", "AutoModel", VISION,
            dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                 image_size=32, patch_size=8, use_swiglu_ffn=True),
            derived=True),  # v5: one fused weights_in in the checkpoint, chunked to gate/up
    # --- speech -------------------------------------------------------------------------------
    HFModel("whisper", "WhisperConfig", "WhisperForConditionalGeneration",
            "AutoModelForSpeechSeq2Seq", WHISPER,
            dict(d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                 encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
                 encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, vocab_size=VOCAB, num_mel_bins=16,
                 max_source_positions=16, max_target_positions=32, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                 suppress_tokens=None, begin_suppress_tokens=None), tied=True),
    HFModel("wav2vec2", "Wav2Vec2Config", "Wav2Vec2ForCTC", "AutoModelForCTC", AUDIO,
            _bert(vocab_size=32, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                  num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                  pad_token_id=0)),  # weight-normed pos conv: weight_g/weight_v in checkpoints
)

BY_NAME = {m.name: m for m in MODELS}


# --- tiny BERT folders for the sentence-transformers and Hub tests -----------------------------
BERT_VOCAB = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz",
              "the", "a", "cat", "dog", "sat", "on", "mat", "##s")


def save_tiny_bert(folder: Any, cls: str = "BertModel", **config: Any) -> Any:
    """A tiny BERT of class ``cls`` (hidden 32, 2 layers, seeded) and a WordPiece tokenizer,
    written by ``save_pretrained`` into ``folder`` (a Path); returns ``folder``."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(BERT_VOCAB))
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(BERT_VOCAB), hidden_size=HIDDEN,
                                  num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                  intermediate_size=FFN, max_position_embeddings=POSITIONS,
                                  **config)
    getattr(transformers, cls)(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
