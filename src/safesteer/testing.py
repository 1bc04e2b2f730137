"""Tiny random backbones for tests, benchmarks and demos (nothing is downloaded).

A word-level tokenizer over a small safety-flavoured vocabulary, and 3-block RoBERTa / Llama
models of width 32 built from configs with a fixed seed.
"""

from __future__ import annotations

# Loaded with the module, not inside the builders: a test run that forks a process per test
# (``make mutants``) imports these ~1.3 s of model code once, in the parent, instead of in every child.
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForMaskedLM,
)

from safesteer.models import Backbone

WORDS = (
    "the a an is are was were be to of and in that it for on with as at by this from or not but "
    "you he she they we i my your his her their our man woman people person group women men "
    "good bad kind cruel hate love help harm kill steal make build bomb weapon drug safe unsafe "
    "toxic nice stupid idiot friend enemy doctor nurse engineer teacher poor rich black white "
    "young old happy sad angry afraid calm yes no please how what why when where who can should "
    "would will do does did have has had go going went say said tell told ask asked answer question "
    "dog cat house car city country world day night time year work school money food water book"
).split()


def tiny_tokenizer():
    """Word-level fast tokenizer: <pad>=0, <s>=1, </s>=2, <unk>=3, <mask>=4, then WORDS and punctuation."""
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(WORDS)) + list(".,?!'"))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=64,
    )


def make_tiny_roberta(seed: int = 0):
    """A random 3-block RoBERTa masked LM (d=32) as a :class:`~safesteer.models.Backbone`."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = RobertaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=66,
        pad_token_id=tok.pad_token_id,
        bos_token_id=1,
        eos_token_id=2,
        type_vocab_size=1,
    )
    return Backbone(RobertaForMaskedLM(cfg), tok, name="tiny-roberta")


def make_tiny_llama(seed: int = 0):
    """A random 3-block Llama causal LM (d=32, GQA 4/2 heads) as a :class:`~safesteer.models.Backbone`."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        bos_token_id=1,
        eos_token_id=2,
    )
    return Backbone(LlamaForCausalLM(cfg), tok, name="tiny-llama")
