"""Tiny encoder (BERT) and decoder (Llama) models with word-level tokenizers, built offline.

Both tokenizers are built from the language's fixed vocabulary (not from data), so token ids never
depend on a corpus draw. The encoder is saved as ``BertForPreTraining`` so that its checkpoint
holds a pooler: a fine-tuned ``BertForSequenceClassification`` then has a pre-trained value for
every parameter except its new classifier, as with bert-base-uncased.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (BertConfig, BertForPreTraining, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

from methods.zoo.language import vocabulary

ENCODER_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DECODER_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def _word_level(specials: list[str], unk: str) -> Tokenizer:
    vocab = {token: i for i, token in enumerate(specials + vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return tokenizer


def build_encoder_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    tokenizer = _word_level(ENCODER_SPECIALS, "[UNK]")
    cls, sep = ENCODER_SPECIALS.index("[CLS]"), ENCODER_SPECIALS.index("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def build_decoder_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    # No BOS is added on encode, so training and lm-eval (add_special_tokens=False) see the same ids.
    tokenizer = _word_level(DECODER_SPECIALS, "<unk>")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
        eos_token="</s>", model_max_length=max_length, padding_side="left")


def build_encoder(tokenizer: PreTrainedTokenizerFast, hidden_size: int, layers: int, heads: int,
                  intermediate_size: int, max_length: int, dropout: float = 0.1) -> BertForPreTraining:
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_length, type_vocab_size=2, pad_token_id=tokenizer.pad_token_id,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForPreTraining(config)


def build_decoder(tokenizer: PreTrainedTokenizerFast, hidden_size: int, layers: int, heads: int,
                  intermediate_size: int, max_length: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_length, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config)
