"""The training forward pass, made cheap: `FastForward.forward(batch)` gives the logits that
predict a batch's answer tokens, computed as the whole model would compute them.

The speed-ups, all behind that one call:
- the layers below the first adapted one never change, so their output for each row is computed
  once (and kept in a file for the next training, whose rows come back);
- the tokens every row begins with (the chat template's opening: trainer.prefix) run once per
  batch, as one row whose keys and values every row of the batch attends to;
- the output head runs on the positions that predict answer tokens only;
- `reference(rows, top_k)` computes the base model's distribution on anchors' answers once (and
  keeps it in a file: anchors repeat from cycle to cycle).
Models that are not plain decoders (trainer.prefix.PLAIN_DECODERS) get the whole forward pass.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from trainer.prefix import causal_mask, is_plain, shared_length, unwrapped


class FastForward:
    """The forward pass of `model` (a PEFT model) on batches of `rows` (encoded examples:
    trainer.dataset.encode), with what never changes during training computed once here."""

    def __init__(self, model, rows: list[dict], pad_id: int, *, cache_frozen_layers: bool = True,
                 share_opening: bool = True, batch_size: int = 8, states_cache: str | Path | None = None,
                 cache_key: str = ""):
        """`states_cache`: a file keeping the frozen layers' states of `rows` for the next
        training; `cache_key`: what cached results depend on besides the rows (the base model)."""
        import torch

        self.model, self.pad_id, self.batch_size, self.cache_key = model, pad_id, batch_size, cache_key
        self.depth = _frozen_depth(model) if cache_frozen_layers else 0  # layers run once, before training
        self.opening_length = _opening_length(rows) if share_opening and is_plain(model) else 0
        self.states_computed = 0  # rows whose frozen states were computed (the rest read from the cache)
        embedded, self.opening = None, None
        if self.opening_length:
            ids = rows[0]["input_ids"][: self.opening_length]
            decoder = unwrapped(model).get_decoder()
            with torch.no_grad():
                embedded = decoder.get_input_embeddings()(torch.tensor([ids]))
                self.opening = _forward(decoder, slice(0, self.depth), embedded,
                                        torch.ones((1, len(ids)), dtype=torch.long), norm=False)
        if self.depth:
            cache = _RowCache(states_cache, f"{cache_key}|{self.depth}|{self.opening_length}")
            self.states_computed = self._frozen_states(rows, embedded, cache)

    def forward(self, batch: list[dict]):
        """The logits that predict the batch's answer tokens, a row per answer token in
        row-major order (the order of `answer_targets`)."""
        ids, labels, attention = pad(batch, self.pad_id)
        return self._answer_logits(ids, attention, labels[:, 1:] != -100, self._frozen(batch))

    def reference(self, rows: list[dict], top_k: int, cache: str | Path | None = None) -> int:
        """The base model's next-token distribution on each of `rows`' answer tokens, with the
        adapter switched off: `ref_ids`/`ref_logp` (answer tokens × top_k) on each row. With
        `cache` (a file), rows computed before are read from it and the new ones added. Returns
        how many rows were computed."""
        import torch

        def put(x: dict, found) -> None:
            x["ref_ids"], x["ref_logp"] = found

        kept = _RowCache(cache, f"{self.cache_key}|{top_k}") if cache else None
        todo = kept.missing(rows, put) if kept else list(rows)
        todo.sort(key=lambda x: len(x["input_ids"]))  # little padding
        self.model.eval()
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            ids, labels, attention = pad(chunk, self.pad_id)
            answer = labels[:, 1:] != -100
            with torch.no_grad(), self.model.disable_adapter():
                logp = self._answer_logits(ids, attention, answer, self._frozen(chunk)).log_softmax(-1)
            values, indices = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
            per_row = answer.sum(-1).tolist()
            for x, v, i in zip(chunk, values.split(per_row), indices.split(per_row)):
                x["ref_logp"], x["ref_ids"] = v.clone(), i.clone()
        if kept and todo:
            kept.save(todo, lambda x: (x["ref_ids"], x["ref_logp"]))
        return len(todo)

    def _answer_logits(self, input_ids, attention, answer, frozen=None):
        """The output head on the positions that predict answer tokens (`answer`: those
        positions, shifted by one) alone: answers are a small share of the tokens. Models whose
        head is more than a linear layer (logit scaling, soft-capping) get the whole forward
        pass. `frozen`: the batch's states at the input of layer `depth` (the tokens after the
        opening), so that only the layers from there up run."""
        base = unwrapped(self.model)
        if any(getattr(base.config, k, None) not in (None, 1, 1.0)
               for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
            return self.model(input_ids=input_ids, attention_mask=attention).logits[:, :-1][answer]
        n = self.opening_length
        states = frozen if frozen is not None else input_ids[:, n:]
        hidden = _forward(base.get_decoder(), slice(self.depth, None), states, attention[:, n:], self.opening)
        return base.get_output_embeddings()(hidden[:, :-1][answer[:, n:]])

    def _frozen_states(self, rows: list[dict], embedded, cache: _RowCache) -> int:
        """Each row's states at the input of layer `depth` (`frozen`: tokens after the opening ×
        hidden size); rows of the training before are read from `cache`, and this training's
        rows kept in it. Returns how many rows were computed."""
        import torch

        decoder = unwrapped(self.model).get_decoder()
        n = self.opening_length
        todo = cache.missing(rows, lambda x, found: x.update(frozen=found))
        todo.sort(key=lambda x: len(x["input_ids"]))
        self.model.eval()
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            ids, _, attention = pad(chunk, self.pad_id)
            with torch.no_grad():
                states = _forward(decoder, slice(0, self.depth), ids[:, n:], attention[:, n:], embedded, norm=False)
            for x, row in zip(chunk, states):
                x["frozen"] = row[: len(x["input_ids"]) - n].clone()
        if todo:
            cache.save(rows, lambda x: x["frozen"], keep_others=False)  # one training's rows: the file stays small
        return len(todo)

    def _frozen(self, batch: list[dict]):
        """The batch's frozen states, padded as `pad` pads it (None: no frozen layers)."""
        import torch

        if not self.depth:
            return None
        width = max(len(x["frozen"]) for x in batch)
        first = batch[0]["frozen"]
        states = torch.zeros((len(batch), width, first.shape[-1]), dtype=first.dtype)
        for i, x in enumerate(batch):
            states[i, : len(x["frozen"])] = x["frozen"]
        return states


def pad(batch: list[dict], pad_id: int):
    """A batch's (input ids, labels, attention mask) as tensors, padded to its longest row."""
    import torch

    width = max(len(x["input_ids"]) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for i, x in enumerate(batch):
        n = len(x["input_ids"])
        ids[i, :n] = torch.tensor(x["input_ids"])
        labels[i, :n] = torch.tensor(x["labels"])
        attention[i, :n] = 1
    return ids, labels, attention


def answer_targets(batch: list[dict]):
    """The batch's answer tokens, in the order of `FastForward.forward`'s logits."""
    import torch

    return torch.tensor([t for x in batch for t in x["labels"][1:] if t != -100], dtype=torch.long)


def _forward(decoder, part: slice, x, attention, opening=None, norm: bool = True):
    """The decoder's layers `part` on `x` (token ids, or states at the input of layer
    part.start; rows × tokens, `attention` masks padding): the last hidden states of x. With
    `opening` (1 × n states at the input of layer part.start), every row of x continues it: the
    opening runs once, as one row whose keys and values every row attends to."""
    import torch
    from transformers import DynamicCache

    given = {"input_ids": x} if x.dtype == torch.long else {"inputs_embeds": x}
    if opening is None and part == slice(0, None) and norm:  # the whole decoder, as any architecture runs it
        return decoder(**given, attention_mask=attention, use_cache=False).last_hidden_state
    with _only_layers(decoder, part, norm):
        if opening is None:
            return decoder(**given, attention_mask=attention, use_cache=False).last_hidden_state
        (n, rows, width), dtype = (opening.shape[1], *x.shape[:2]), opening.dtype
        cache = DynamicCache(config=decoder.config)
        decoder(inputs_embeds=opening, attention_mask=causal_mask(torch.ones((1, n), dtype=torch.bool), n, dtype),
                position_ids=torch.arange(n)[None], past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(rows)
        keys = torch.cat([torch.ones((rows, n), dtype=torch.bool), attention.bool()], dim=1)
        return decoder(**given, attention_mask=causal_mask(keys, width, dtype), position_ids=torch.arange(n, n + width)[None],
                       past_key_values=cache, use_cache=True).last_hidden_state


def _opening_length(rows: list[dict]) -> int:
    """How many tokens every row begins with, before the position that predicts its first
    answer token."""
    first_answer = min(next((i for i, t in enumerate(x["labels"]) if t != -100), len(x["labels"])) for x in rows)
    return max(0, min(shared_length([x["input_ids"] for x in rows]), first_answer - 1))


def _frozen_depth(model) -> int:
    """How many decoder layers from the bottom have nothing to train (0: none, or not a plain
    decoder)."""
    base = unwrapped(model)
    if not is_plain(base):
        return 0
    for i, layer in enumerate(base.get_decoder().layers):
        if any(p.requires_grad for p in layer.parameters()):
            return i
    return 0


class _only_layers:
    """Within it, `decoder` runs the layers of `part` only (and, with norm=False, ends without
    its final norm: its output is then the input of the next layer)."""

    def __init__(self, decoder, part: slice, norm: bool = True):
        self.decoder, self.part, self.norm = decoder, part, norm

    def __enter__(self):
        import torch

        self.layers, self.final_norm = self.decoder.layers, self.decoder.norm
        self.decoder.layers = self.layers[self.part]
        if not self.norm:
            self.decoder.norm = torch.nn.Identity()

    def __exit__(self, *exc):
        self.decoder.layers, self.decoder.norm = self.layers, self.final_norm


class _RowCache:
    """Results per row kept in a file from one training to the next (`path` None: nothing
    kept), found by `key` (what they depend on besides the row) and the row's tokens."""

    def __init__(self, path: str | Path | None, key: str):
        import torch

        self.path, self.key = (Path(path) if path else None), key
        self.stored = torch.load(self.path, weights_only=True) if self.path and self.path.exists() else {}

    def _key(self, x: dict) -> str:
        return hashlib.sha1(json.dumps([self.key, x["input_ids"], x["labels"]]).encode()).hexdigest()

    def missing(self, rows: list[dict], put: Callable[[dict, object], None]) -> list[dict]:
        """`put(x, value)` for each row kept before; the rows not kept, to be computed."""
        todo = []
        for x in rows:
            found = self.stored.get(self._key(x))
            if found is None:
                todo.append(x)
            else:
                put(x, found)
        return todo

    def save(self, rows: list[dict], value: Callable[[dict], object], keep_others: bool = True) -> None:
        """Keep `value(x)` of each of `rows` (and, with keep_others, what was kept before)."""
        import torch

        if self.path is None:
            return
        self.stored = {**(self.stored if keep_others else {}), **{self._key(x): value(x) for x in rows}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.stored, self.path.with_suffix(".tmp"))
        os.replace(self.path.with_suffix(".tmp"), self.path)  # a crash leaves the old file whole
