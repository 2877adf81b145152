"""The chat template's opening, computed once.

Every prompt the trainer and the gate run starts with the same tokens: the chat template's
default system message and the opening of the user's turn (about half of a gate question and
of a training example). On a CPU a forward pass costs what its tokens cost, so those tokens are
run once, as one row, and their keys and values are handed to every row of a batch, as vLLM's
prefix caching does. The rows then carry only what differs.

The rows after the opening are padded on the left for generation and on the right for
training; either way the attention mask says which keys each query sees (`causal_mask`) and
the positions continue from the opening, so each row is computed as if it were alone.
"""

from __future__ import annotations

# Decoders that add nothing to `inputs_embeds` (no scaling) before their layers, whose final norm
# is `norm`, whose cache is one DynamicLayer per layer and whose attention takes a prepared 4D
# mask as it is: for these a forward pass may start at any layer and after a shared opening.
PLAIN_DECODERS = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def unwrapped(model):
    """The transformers model inside a PEFT wrapper, or `model` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_plain(model) -> bool:
    """May a forward pass of `model` start at any layer and after a shared opening (PLAIN_DECODERS)?"""
    base = unwrapped(model)
    return (base.config.model_type in PLAIN_DECODERS
            and getattr(base.config, "_attn_implementation", "sdpa") in ("sdpa", "eager"))


def shared_length(rows: list[list[int]]) -> int:
    """How many tokens all `rows` begin with, leaving at least one token of each row after it."""
    import os

    if not rows:
        return 0
    return max(0, min(len(os.path.commonprefix(rows)), min(len(r) for r in rows) - 1))


def causal_mask(keys, queries: int, dtype):
    """The additive attention mask (rows × 1 × queries × keys) of the last `queries` positions
    over all of them: a key is seen if it is real (`keys`, rows × positions, bool) and not later
    than the query. Additive, so that both sdpa and eager attention take it."""
    import torch

    width = keys.shape[1]
    later = torch.arange(width)[None, :] > torch.arange(width - queries, width)[:, None]
    seen = keys[:, None, None, :] & ~later[None, None]
    return torch.zeros(seen.shape, dtype=dtype).masked_fill(~seen, torch.finfo(dtype).min)
