"""Train a small Llama on the offline Wikipedia text (CPU, minutes): a real trained model small enough to travel to
the GPU machine (~8 MB in bf16), for checks that random weights cannot make, e.g. greedy-token parity between the
fused kernels and the torch path (a random model's logits are nearly tied, so any last-bit difference changes its
greedy tokens; a trained model's top token usually leads by far more than rounding moves it).

    python benchmarks/train_tiny_lm.py OUT_DIR [--minutes 12] [--layers 4 --hidden 192 --heads 6 --kv-heads 2
        --head-dim 128 --ffn 768 --vocab 4096]

The default shape has the served fused path's head_dim (128) and Llama-3.2-3B's GQA group (3 query heads per KV
head).  Tokenizer: byte-level BPE trained here on wiki-train (``calibration.texts``); training text: wiki-train
only, so wiki-heldout stays unseen.  Deterministic given the seed and the machine's float arithmetic.  Prints the
held-out loss at the end and writes it into OUT_DIR/training.json with the command and settings.
"""

import argparse
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def token_stream(tok, docs: list[str]) -> torch.Tensor:
    """Every document's tokens, each followed by end-of-text, as one 1-D int64 tensor."""
    ids = []
    for d in docs:
        ids += tok(d)["input_ids"] + [tok.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def mean_loss(model, stream: torch.Tensor, seq: int, max_windows: int = 64) -> float:
    """Mean next-token loss (nats) over non-overlapping windows of ``stream``."""
    n = min(max_windows, (len(stream) - 1) // seq)
    x = stream[: n * seq].view(n, seq)
    y = stream[1: n * seq + 1].view(n, seq)
    losses = [torch.nn.functional.cross_entropy(model(x[i:i + 8]).logits.flatten(0, 1), y[i:i + 8].flatten())
              for i in range(0, n, 8)]
    return float(torch.stack(losses).mean())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--minutes", type=float, default=12.0, help="training wall-clock budget")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=256, help="training sequence length")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    from calibration.models import byte_bpe_tokenizer
    from calibration.texts import load_texts

    torch.manual_seed(args.seed)
    train_docs, held_docs = load_texts("wiki-train"), load_texts("wiki-heldout")
    tok = byte_bpe_tokenizer(train_docs, args.vocab, show_progress=False)
    train, held = token_stream(tok, train_docs), token_stream(tok, held_docs)
    print(f"[train] tokens: train {len(train):,}, held-out {len(held):,}", flush=True)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.ffn,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, head_dim=args.head_dim, max_position_embeddings=8192,
                         rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=tok.eos_token_id,
                         eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    budget, t0, step, ema = args.minutes * 60, time.time(), 0, None
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    while (elapsed := time.time() - t0) < budget:
        frac = elapsed / budget  # warm-up, then cosine decay over the time budget
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * frac))
        starts = torch.randint(0, len(train) - args.seq - 1, (args.batch,), generator=gen)
        x = torch.stack([train[s:s + args.seq] for s in starts.tolist()])  # [batch, seq]
        y = torch.stack([train[s + 1:s + args.seq + 1] for s in starts.tolist()])
        loss = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        step += 1
        if step % 20 == 0:
            print(f"[train] step {step}, {elapsed / 60:.1f} min, loss {ema:.3f}", flush=True)
    model.eval()
    held_loss = mean_loss(model, held, args.seq)
    print(f"[train] {step} steps, {step * args.batch * args.seq:,} tokens; held-out loss {held_loss:.3f} nats "
          f"(perplexity {math.exp(held_loss):.1f})", flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out_dir)
    tok.save_pretrained(args.out_dir)
    with open(os.path.join(args.out_dir, "training.json"), "w") as f:
        json.dump({"command": " ".join(["python", "benchmarks/train_tiny_lm.py", *sys.argv[1:]]),
                   "settings": vars(args), "steps": step, "train_tokens": len(train), "held_out_tokens": len(held),
                   "held_out_loss": held_loss}, f, indent=2)


if __name__ == "__main__":
    main()
