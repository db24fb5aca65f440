"""Tiny random models of the architectures users bring, built offline from their configs and saved as
local folders (model + tokenizer) the way a downloaded checkpoint looks.

Each keeps what sets its family apart from the built-in GPT-2: RoPE and grouped-query attention
(Llama, Qwen2, Mistral, Phi-3, GPT-NeoX's partial rotary), tied or untied embeddings, a projection
after the decoder (OPT), a scaled embedding (Gemma), learned positions with an offset (OPT, BART), and
encoder-decoders (T5, BART). The tokenizer is the built-in one; where the real family pads with its
eos token (Llama 3, Qwen 2.5, Mistral, Phi-3, Pythia), so does the folder, and for the encoder-decoders
it closes every text with eos, as T5's and BART's tokenizers do (their classifiers pool that token).
"""

from pathlib import Path

import torch
from tokenizers.processors import TemplateProcessing
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BartConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    T5Config,
)

from rlhf_cli.models.loading import load_tokenizer

WIDTH = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
DECODER_ONLY = {
    # name: (config factory taking the special ids, pad == eos)
    "gpt2": (lambda s: GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=256, **s), False),
    "llama": (lambda s: LlamaConfig(**WIDTH, intermediate_size=64, num_key_value_heads=1,
                                    tie_word_embeddings=True, **s), True),
    "qwen2": (lambda s: Qwen2Config(**WIDTH, intermediate_size=64, num_key_value_heads=1,
                                    tie_word_embeddings=False, **s), True),
    "mistral": (lambda s: MistralConfig(**WIDTH, intermediate_size=64, num_key_value_heads=1, **s), True),
    "gemma": (lambda s: GemmaConfig(**WIDTH, intermediate_size=64, num_key_value_heads=1, head_dim=16, **s), False),
    "phi3": (lambda s: Phi3Config(**WIDTH, intermediate_size=64, num_key_value_heads=1, **s), True),
    "opt": (lambda s: OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                                word_embed_proj_dim=16, max_position_embeddings=256, **s), False),
    "gpt_neox": (lambda s: GPTNeoXConfig(**WIDTH, intermediate_size=64, rotary_pct=0.25,
                                         tie_word_embeddings=False, **s), True),
}
ENCODER_DECODER = {
    "t5": lambda s: T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                             decoder_start_token_id=s["pad_token_id"], **s),
    "bart": lambda s: BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                                 decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                 max_position_embeddings=256, decoder_start_token_id=s["eos_token_id"], **s),
}
ARCHITECTURES = [*DECODER_ONLY, *ENCODER_DECODER]


def build_tiny(name: str):
    """(model, tokenizer) of architecture `name` with random weights (seed 0), as `save_tiny` saves them."""
    tokenizer = load_tokenizer("builtin:tiny-gpt2")
    pad_is_eos = DECODER_ONLY[name][1] if name in DECODER_ONLY else False
    if pad_is_eos:
        tokenizer.pad_token = tokenizer.eos_token
    special = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
               "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id}
    if name in DECODER_ONLY:
        config, auto = DECODER_ONLY[name][0](special), AutoModelForCausalLM
    else:
        config, auto = ENCODER_DECODER[name](special), AutoModelForSeq2SeqLM
        eos = (tokenizer.eos_token, tokenizer.eos_token_id)
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"$A {eos[0]}", pair=f"$A {eos[0]} $B {eos[0]}", special_tokens=[eos])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return auto.from_config(config), tokenizer


def save_tiny(name: str, folder: Path) -> Path:
    """Build architecture `name` with random weights (seed 0) and save it with its tokenizer in `folder`."""
    model, tokenizer = build_tiny(name)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
