"""Tiny random checkpoints (2 layers, hidden 64) for tests and quick experiments.

python -m tests.tiny OUT_DIR        # writes OUT_DIR/tiny-llama and OUT_DIR/tiny-phi3
"""

from __future__ import annotations

import sys
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Phi-3-mini's own template: eos is <|endoftext|>, the end of a turn is <|end|>.
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def tiny_tokenizer(out: Path, template: str, eos: str, pad: str):
    """The shipped test tokenizer with a given chat template and special tokens."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(ASSETS / "tokenizer.json"),
        eos_token=eos,
        pad_token=pad,
        unk_token="<|endoftext|>",
        chat_template=template,
        model_max_length=2048,
    )
    tok.save_pretrained(out)
    return tok


def _save(out: Path, config) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(out)
    return out


def build_tiny_llama(out: Path) -> Path:
    """A 2-layer Llama with a ChatML template and <|im_end|> as eos: the shape of SmolLM2."""
    from transformers import LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(out, CHATML_TEMPLATE, eos="<|im_end|>", pad="<|endoftext|>")
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    return _save(out, config)


def build_tiny_phi3(out: Path) -> Path:
    """A 2-layer Phi-3 (fused qkv_proj / gate_up_proj) with Phi-3's template; eos <|endoftext|>, end of turn <|end|>."""
    from transformers import Phi3Config

    out.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(out, PHI3_TEMPLATE, eos="<|endoftext|>", pad="<|endoftext|>")
    config = Phi3Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        # The genai builder needs these equal unless LongRoPE factors are given.
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    return _save(out, config)


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-models")
    print(build_tiny_llama(root / "tiny-llama"), build_tiny_phi3(root / "tiny-phi3"))
