"""(Copied from shared/tools/gpu-vllm/make_model.py: the model of shared/BASELINES.md.) Random-weight Llama model of a given shape + a WordLevel tokenizer, built on the GPU machine (no hub).
python3 make_model.py OUT_DIR [3b|1b|8b]"""
import json, os, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers, decoders

out, shape = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "3b")
tok_only = "--tokenizer-only" in sys.argv
shapes = {  # layers, hidden, q heads, kv heads, head_dim, ffn, vocab
    "3b": (28, 3072, 24, 8, 128, 8192, 128256),
    "1b": (16, 2048, 32, 8, 64, 8192, 128256),
    "8b": (32, 4096, 32, 8, 128, 14336, 128256),
}
L, H, Q, KV, HD, F, V = shapes[shape]
cfg = LlamaConfig(num_hidden_layers=L, hidden_size=H, num_attention_heads=Q, num_key_value_heads=KV,
                  head_dim=HD, intermediate_size=F, vocab_size=V, max_position_embeddings=131072,
                  rope_theta=500000.0, tie_word_embeddings=(shape != "8b"), torch_dtype="bfloat16",
                  bos_token_id=0, eos_token_id=1)
if not tok_only:
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        m = LlamaForCausalLM(cfg)
    m.save_pretrained(out, safe_serialization=True)
    print("model", shape, sum(p.numel() for p in m.parameters()) / 1e9, "B params ->", out)
# 3-letter words: vLLM caps a prompt at ~6 characters per token of max_model_len
import itertools, string
vocab = {"[UNK]": 0, "[EOS]": 1}
for w in itertools.islice(itertools.product(string.ascii_lowercase, repeat=3), 17000):
    vocab["".join(w)] = len(vocab)
tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
tk.pre_tokenizer = pre_tokenizers.Whitespace()
tk.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[EOS]", bos_token="[UNK]",
                               chat_template="{% for m in messages %}{{ m['content'] }} {% endfor %}")
fast.save_pretrained(out)
print("tokenizer ->", out)
