"""16-bit attention sinks and recent window in the paged cache (torch serving path), the paper's semantics.

Every token's codes are written to its paged slot as always; the first ``sinks`` tokens and the last ``window``
tokens of each request are also kept in 16 bits in a per-request ring, and attention reads key j of query i from the
16-bit copy when ``j < sinks or i - j < window`` (``calibration.evaluate``'s cache semantics), from the codes
otherwise.  The ring never replaces the codes, so losing it costs quality, never correctness:

- ring row r belongs to batch row r (vLLM's persistent batch): columns [0, sinks) hold positions p < sinks, columns
  sinks + p % window the window.  Each entry is tagged with the paged slot its token was written to;
  a read of position j uses the entry only if the tag equals j's slot in this step's block table.
- vLLM moves requests between rows (finished or unscheduled requests are condensed away).  A row keeps its entries
  only if its request continues: the context now equals the row's length at the previous step and the block that
  held the previous step's last token is still in the same place of the block table.  Any other request passing that
  check shares every block of those positions with the previous occupant (prefix caching shares whole prefixes
  only), so the entries hold its own K/V.  Otherwise the row's tags are cleared.
- Window entries of this step's tokens are those with position >= new length - window (no two tokens of a step
  share a column); a query of a long prefill chunk reads in-chunk keys from the step's own key/value inputs.

Memory: rows x (sinks + window) x KV heads x head_dim x 2 (K, V) x 2 bytes per layer, allocated on first use (inside
vLLM's profiling run, so the KV-cache size accounts for it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class WindowStep:
    """This step's ring bookkeeping, shared by every layer."""

    rows: torch.Tensor  # [N] int64: ring row of each of the step's tokens (the scratch row if it stays out)
    cols: torch.Tensor  # [N] int64: its column
    tokens: torch.Tensor  # [N] int64: its index among the step's tokens


class ExactTokens:
    """The per-request 16-bit ring of sink and window tokens for every layer (row ``max_rows`` is a scratch row that
    takes the writes of tokens outside the ring, so no step needs a host sync)."""

    def __init__(self, sinks: int, window: int, max_rows: int, num_layers: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, dtype: torch.dtype | None = None, device=None):
        self.sinks, self.window, self.max_rows = sinks, window, max_rows
        self.width = sinks + window
        self.k: list[torch.Tensor | None] = [None] * num_layers  # [rows + 1, width, H, h] per layer
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.tags: torch.Tensor | None = None  # [rows + 1, width] int64 slot of each entry, -1 empty
        self.length: torch.Tensor | None = None  # [rows] int64 each row's context length after the previous step
        self.last_block: torch.Tensor | None = None  # [rows] int64 block id of that step's last token, -1 none
        # begin_step in one Triton launch (kernels/window_step.py) instead of ~50 small torch kernels; off here,
        # the runtime turns it on on CUDA (``aquakv_fused_ring_step``)
        self.fused_begin = False
        if head_dim is not None:  # allocate now (before vLLM measures free memory for the KV cache)
            self._allocate(device)
            for layer in range(num_layers):
                self._allocate_layer(layer, (num_kv_heads, head_dim), dtype, device)

    @property
    def nbytes(self) -> int:
        """Bytes of the 16-bit K/V rows of every allocated layer: the ring's memory outside the paged cache."""
        return sum(x.numel() * x.element_size() for x in self.k + self.v if x is not None)

    def _allocate(self, device) -> None:
        self.tags = torch.full((self.max_rows + 1, self.width), -1, dtype=torch.int64, device=device)
        self.length = torch.zeros(self.max_rows, dtype=torch.int64, device=device)
        self.last_block = torch.full((self.max_rows,), -1, dtype=torch.int64, device=device)

    def _allocate_layer(self, layer: int, shape: tuple, dtype, device) -> None:
        self.k[layer] = torch.zeros((self.max_rows + 1, self.width, *shape), dtype=dtype, device=device)
        self.v[layer] = torch.zeros_like(self.k[layer])

    def column(self, pos: torch.Tensor) -> torch.Tensor:
        """Ring column of positions pos: its sink column below ``sinks``, else its window column (the last column
        when there is no window: never read, only sinks are read 16-bit then)."""
        return ring_column(pos, self.sinks, self.window)

    def begin_step(self, block_table: torch.Tensor, seq_lens, query_start_loc, num_tokens: int,
                   slot_mapping: torch.Tensor, block_size: int) -> WindowStep:
        """Check which rows still hold their request (clear the others), tag this step's sink and window tokens.
        seq_lens [num_reqs] and query_start_loc [num_reqs + 1]: lists or device tensors (then no host sync, and the
        step can be captured in a CUDA graph: every shape here follows num_reqs and num_tokens only)."""
        device = slot_mapping.device
        qsl = torch.as_tensor(query_start_loc, device=device)
        num_reqs, n = qsl.shape[0] - 1, num_tokens
        if num_reqs > self.max_rows:
            raise RuntimeError(f"aquakv window ring has {self.max_rows} rows, the step has {num_reqs} requests")
        if self.tags is None:
            self._allocate(device)
        if self.fused_begin:
            from .kernels.window_step import begin_step_fused

            return begin_step_fused(self, block_table, torch.as_tensor(seq_lens, device=device), qsl, n, slot_mapping,
                                    block_size)
        qsl = qsl.long()
        lens = torch.as_tensor(seq_lens, device=device).long()
        counts = qsl[1:] - qsl[:-1]
        context = lens - counts
        table = block_table[:num_reqs].long()
        prev = self.length[:num_reqs]
        idx = ((prev - 1).clamp(min=0) // block_size).clamp(max=table.shape[1] - 1)
        held = table.gather(1, idx[:, None])[:, 0]
        keep = (context == prev) & (prev > 0) & (held == self.last_block[:num_reqs])
        self.tags[:num_reqs] = torch.where(keep[:, None], self.tags[:num_reqs], -1)
        self.tags[num_reqs:] = -1
        self.length[num_reqs:] = 0
        self.last_block[num_reqs:] = -1
        self.length[:num_reqs] = lens
        self.last_block[:num_reqs] = table.gather(1, ((lens - 1).clamp(min=0) // block_size)[:, None])[:, 0]
        # each token's ring entry: its sink column, its window column if in the new last window, else scratch.
        # Tokens past qsl[-1] are padding (CUDA-graph batches: padded requests have no tokens and length 0)
        tok = torch.arange(n, device=device)
        row = torch.searchsorted(qsl[1:], tok, right=True).clamp(max=num_reqs - 1)
        pos = context[row] + tok - qsl[:-1][row]
        in_sinks = pos < self.sinks
        in_ring = in_sinks | ((pos >= lens[row] - self.window) if self.window else in_sinks)
        in_ring &= (tok < qsl[-1]) & (pos >= 0)
        rows = torch.where(in_ring, row, self.max_rows)
        cols = torch.where(in_ring, self.column(pos), 0)
        self.tags[rows, cols] = torch.where(in_ring, slot_mapping[:n].long(), -1)
        return WindowStep(rows, cols, torch.arange(n, device=device))

    def write_step(self, layer: int, step, key: torch.Tensor, value: torch.Tensor, block_table: torch.Tensor,
                   seq_lens, query_start_loc, slot_mapping: torch.Tensor, block_size: int) -> None:
        """Store this step's sink/window tokens of ``layer`` (key/value [N, H, h]); the step's first layer also runs
        ``begin_step``, whose result every layer then shares through ``step.window`` (``serving.StepState``)."""
        _, _, window_step = self.prepare_write(layer, step, key, block_table, seq_lens, query_start_loc, slot_mapping,
                                               block_size)
        self.write(layer, window_step, key, value)

    def prepare_write(self, layer: int, step, key: torch.Tensor, block_table: torch.Tensor, seq_lens,
                      query_start_loc, slot_mapping: torch.Tensor, block_size: int) -> tuple:
        """(ring K, ring V of ``layer``, the step's ``WindowStep``) for a writer of this step's tokens: ``write``, or
        the fused cache write that stores them in the same launch (``kernels/cache_write.write_fused``).  The step's
        first layer runs ``begin_step``."""
        if step.window is None:
            step.window = self.begin_step(block_table, seq_lens, query_start_loc, key.shape[0], slot_mapping,
                                          block_size)
        if self.k[layer] is None:
            self._allocate_layer(layer, key.shape[1:], key.dtype, key.device)
        return self.k[layer], self.v[layer], step.window

    def write(self, layer: int, step: WindowStep, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store this step's sink/window tokens of ``layer`` (key post-RoPE, value [N, H, h]; the ring allocated by
        ``prepare_write``)."""
        self.k[layer][step.rows, step.cols] = key[step.tokens].to(self.k[layer].dtype)
        self.v[layer][step.rows, step.cols] = value[step.tokens].to(self.v[layer].dtype)


def ring_column(pos: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """Ring column of positions pos (``ExactTokens.column``)."""
    return torch.where(pos < sinks, pos, sinks + pos % max(window, 1)).clamp(max=sinks + window - 1)
