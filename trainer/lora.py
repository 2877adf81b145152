"""LoRA training, as a loop one can read top to bottom (after karpathy/nanoGPT)."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from trainer.dataset import Example, encode
from trainer.prefix import causal_mask, is_plain, shared_length, unwrapped


@dataclass
class TrainingConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    # The defaults are the recipe measured in reports/consolidation/ (100 zsRE corrections): in a
    # server cycle of 100 on distinct subjects, 3 epochs answered 0.86 of them, 4 epochs 0.98; the
    # upper quarter of the layers is as good as the upper half there and 70 s cheaper.
    layers_from: float = 0.75  # adapt only layers from this fraction of the depth up (0: all layers)
    epochs: int = 4
    # At least this many optimizer steps: more epochs when the set is small (one correction and
    # the anchors fill a few batches), so one recipe serves cycles of 1 and of 100 corrections.
    min_steps: int = 56
    learning_rate: float = 2e-3
    batch_size: int = 8
    max_len: int = 128
    seed: int = 0
    # Anchors (Example.distill) are trained towards the base model's whole next-token distribution
    # (KL divergence, the adapter switched off for the reference) with this weight; 0 trains them
    # on the base's greedy text with cross-entropy, as corrections are.
    distill_weight: float = 3.0
    # The base distribution of each anchor token is computed once, before the loop, and kept as
    # its top-k log-probabilities plus the rest of the mass as one bucket (no reference forward
    # pass per step).
    distill_top_k: int = 64
    # Anchors (Example.distill) drawn per epoch, in turn from the whole set so that every one is
    # seen; 0: all of them every epoch. Measured on server cycles of 100 corrections
    # (reports/consolidation/, 2026-12-01 (5)-(6)): all 198 every epoch 244/268 s and 231/233 s a
    # cycle, paraphrase 0.88/0.82, token locality 0.909/0.888; 120 of them 220-236 s and 218-261 s,
    # paraphrase 0.91/0.80, token locality 0.896/0.880. All of them: cycle 2's paraphrases clear
    # the 0.80 bar with a margin. The cap bounds a cycle's cost when a deployment supplies
    # thousands of anchor prompts (RATCHET_ANCHOR_PROMPTS); the 198 of the measurements fit in it.
    anchors_per_epoch: int = 256
    # The layers below the first adapted one never change: their output for each example is
    # computed once and the steps run the layers above it only (architectures whose decoder
    # takes that output back as `inputs_embeds`: trainer.prefix.PLAIN_DECODERS). Costs the states'
    # memory (examples × tokens × hidden size, 70 MB for a 100-correction cycle on SmolLM2).
    cache_frozen_layers: bool = True
    # The tokens every example begins with (the chat template's opening: trainer.prefix) run once
    # per step, as one row whose keys and values every row of the batch attends to.
    share_opening: bool = True
    threads: int | None = None  # torch threads; None: torch's default (all cores)


@dataclass
class TrainingResult:
    steps: int
    seconds: float
    tokens: int
    final_loss: float
    losses: list[float] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def train_lora(
    base_model: str,
    examples: list[Example],
    out_dir: str | Path,
    config: TrainingConfig,
    progress: Callable[[int, int, float], None] | None = None,
    init_adapter: str | Path | None = None,
    reference_cache: str | Path | None = None,
    states_cache: str | Path | None = None,
) -> TrainingResult:
    """Train a LoRA adapter on `examples` and save it as a plain PEFT folder in `out_dir`;
    from `init_adapter`'s weights (continuing a previous version) or from zero. The anchors'
    base distributions are kept in `reference_cache` (a file) for the next training, if given,
    and the frozen layers' states of this training's examples in `states_cache`: the anchors
    and the replayed corrections come back in the next cycle."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not examples:
        raise ValueError("no training examples")
    if config.threads:
        torch.set_num_threads(config.threads)
    random.seed(config.seed)
    torch.manual_seed(config.seed)

    # -- model and data ------------------------------------------------------------------
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    if init_adapter is not None:
        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    else:
        n_layers = model.config.num_hidden_layers
        first = int(n_layers * config.layers_from)
        targets = config.target_modules
        if first and targets == "all-linear":  # PEFT takes layers_to_transform only with named modules
            targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                              if isinstance(m, torch.nn.Linear) and "lm_head" not in name})
        lora = LoraConfig(
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=targets,
            layers_to_transform=list(range(first, n_layers)) if first else None,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    data = [encode(tokenizer, ex, config.max_len) for ex in examples]
    started = time.monotonic()  # the time reported includes the precomputations
    depth = _frozen_depth(model) if config.cache_frozen_layers else 0
    n = _opening_length(data) if config.share_opening and is_plain(model) else 0
    embedded, opening = _opening(model, data[0]["input_ids"][:n], depth) if n else (None, None)
    if depth:
        _frozen_states(model, data, pad_id, depth, config.batch_size, embedded,
                       _RowCache(states_cache, f"{base_model}|{depth}|{n}"))
    if config.distill_weight:
        rows = [x for x in data if x["distill"]]
        _reference(model, rows, pad_id, config.distill_top_k, config.batch_size,
                   _RowCache(reference_cache, f"{base_model}|{config.distill_top_k}"), depth, opening)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    anchors = [i for i, x in enumerate(data) if x["distill"]]
    others = [i for i, x in enumerate(data) if not x["distill"]]
    random.shuffle(anchors)
    per_epoch = min(config.anchors_per_epoch or len(anchors), len(anchors))
    batches_per_epoch = math.ceil((len(others) + per_epoch) / config.batch_size)
    epochs = max(config.epochs, math.ceil(config.min_steps / batches_per_epoch))
    total = epochs * batches_per_epoch
    lengths = [len(x["input_ids"]) for x in data]

    # -- the loop ------------------------------------------------------------------------
    step, tokens, losses = 0, 0, []
    for epoch in range(epochs):
        order = others + [anchors[(epoch * per_epoch + j) % len(anchors)] for j in range(per_epoch)]
        for batch_ids in _length_grouped(order, lengths, config.batch_size):
            batch = [data[i] for i in batch_ids]
            input_ids, labels, attention, reference = _pad(batch, pad_id)  # dynamic padding: to this batch's longest
            lr = config.learning_rate * 0.5 * (1 + math.cos(math.pi * step / total))  # cosine decay
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = _loss(model, input_ids, labels, attention, reference, config.distill_weight, _frozen(batch, depth),
                         opening)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += int(attention.sum())
            losses.append(loss.item())
            if progress:
                progress(step, total, losses[-1])

    # -- the artifact --------------------------------------------------------------------
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    (out_dir / "training_config.json").write_text(json.dumps(asdict(config), indent=2))
    return TrainingResult(step, time.monotonic() - started, tokens, losses[-1], losses)


class _RowCache:
    """Results per example row kept in a file from one training to the next (`path` None:
    nothing kept), found by `key` (what they depend on besides the row) and the row's tokens."""

    def __init__(self, path: str | Path | None, key: str):
        import torch

        self.path, self.key = (Path(path) if path else None), key
        self.stored = torch.load(self.path, weights_only=True) if self.path and self.path.exists() else {}

    def _key(self, x: dict) -> str:
        import hashlib

        return hashlib.sha1(json.dumps([self.key, x["input_ids"], x["labels"]]).encode()).hexdigest()

    def get(self, x: dict):
        return self.stored.get(self._key(x))

    def missing(self, rows: list[dict], put: Callable[[dict, object], None]) -> list[dict]:
        """`put(x, value)` for each row kept before; the rows not kept, to be computed."""
        todo = []
        for x in rows:
            found = self.get(x)
            if found is None:
                todo.append(x)
            else:
                put(x, found)
        return todo

    def save(self, rows: list[dict], value: Callable[[dict], object], keep_others: bool = True) -> None:
        """Keep `value(x)` of each of `rows` (and, with keep_others, what was kept before)."""
        import os

        import torch

        if self.path is None:
            return
        self.stored = {**(self.stored if keep_others else {}), **{self._key(x): value(x) for x in rows}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.stored, self.path.with_suffix(".tmp"))
        os.replace(self.path.with_suffix(".tmp"), self.path)  # a crash leaves the old file whole


def _reference(model, rows: list[dict], pad_id: int, top_k: int, batch_size: int,
               cache: _RowCache | None = None, depth: int = 0, opening=None) -> None:
    """The base model's next-token distribution on each anchor's answer tokens, computed once
    with the adapter switched off: `ref_ids`/`ref_logp` (answer tokens × top_k) on each row.
    With `cache` (its key: base model and k), rows computed before are read from it and the
    new ones added: anchors repeat from cycle to cycle."""
    import torch

    def put(x: dict, found) -> None:
        x["ref_ids"], x["ref_logp"] = found

    todo = cache.missing(rows, put) if cache else list(rows)
    todo.sort(key=lambda x: len(x["input_ids"]))  # little padding
    model.eval()
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        ids, labels, attention, _ = _pad(chunk, pad_id)
        answer = labels[:, 1:] != -100
        with torch.no_grad(), model.disable_adapter():
            logp = _answer_logits(model, ids, attention, answer, _frozen(chunk, depth), opening).log_softmax(-1)
        values, indices = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
        per_row = answer.sum(-1).tolist()
        for x, v, i in zip(chunk, values.split(per_row), indices.split(per_row)):
            x["ref_logp"], x["ref_ids"] = v.clone(), i.clone()
    if cache and todo:
        cache.save(todo, lambda x: (x["ref_ids"], x["ref_logp"]))


def _loss(model, input_ids, labels, attention, reference, weight: float, frozen=None, opening=None):
    """Cross-entropy on the answers of corrections; on the answers of anchors (`reference`: the
    rows that are anchors and their base distributions, or None), KL(base || adapted) per token
    over the base's top-k tokens and the rest of the mass as one bucket. `frozen`, `opening`: see
    `_answer_logits`."""
    import torch
    import torch.nn.functional as F

    targets = labels[:, 1:]
    answer = targets != -100
    logits = _answer_logits(model, input_ids, attention, answer, frozen, opening)  # a row per answer token, row-major
    distill = torch.zeros(len(input_ids), dtype=torch.bool) if reference is None or not weight else reference[0]
    anchor_token = distill[:, None].expand_as(answer)[answer]
    ce = ~anchor_token
    loss = F.cross_entropy(logits[ce], targets[answer][ce]) if ce.any() else logits.sum() * 0.0
    if distill.any():
        _, ref_ids, ref_logp = reference
        logq = logits[anchor_token].log_softmax(-1).gather(-1, ref_ids)
        p = ref_logp.exp()
        p_rest = (1 - p.sum(-1)).clamp_min(1e-8)
        q_rest = (1 - logq.exp().sum(-1)).clamp_min(1e-8)
        kl = (p * (ref_logp - logq)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
        loss = loss + weight * kl.mean()
    return loss


def _answer_logits(model, input_ids, attention, answer, frozen=None, opening=None):
    """The logits that predict the answer tokens (`answer`: their positions, shifted by one),
    a row per answer token in row-major order. The output head runs on those positions alone:
    on SmolLM2 it costs a quarter of a forward pass when run on every position, and answers are
    a sixth of the tokens. Models whose head is more than a linear layer (logit scaling,
    soft-capping) get the whole forward pass. `frozen`: (depth, the batch's states at the input
    of layer `depth`) — only the layers from `depth` up are run. `opening`: the states (1 × n ×
    hidden) at the input of that layer of the n tokens every row begins with (`_opening`); they
    run once, and `frozen` then holds the states of the tokens after them."""
    base = unwrapped(model)
    if any(getattr(base.config, k, None) not in (None, 1, 1.0)
           for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return model(input_ids=input_ids, attention_mask=attention).logits[:, :-1][answer]
    n = 0 if opening is None else opening.shape[1]
    depth, states = frozen if frozen is not None else (0, input_ids[:, n:])
    hidden = _forward(base.get_decoder(), slice(depth, None), states, attention[:, n:], opening)
    return base.get_output_embeddings()(hidden[:, :-1][answer[:, n:]])


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


def _opening(model, ids: list[int], depth: int):
    """The opening's token embeddings and its states at the input of layer `depth` (each
    1 × n × hidden); no adapter is below that layer, so both are computed once."""
    import torch

    decoder = unwrapped(model).get_decoder()
    with torch.no_grad():
        embedded = decoder.get_input_embeddings()(torch.tensor([ids]))
        states = _forward(decoder, slice(0, depth), embedded, torch.ones((1, len(ids)), dtype=torch.long), norm=False)
    return embedded, states


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


def _frozen_states(model, rows: list[dict], pad_id: int, depth: int, batch_size: int, opening=None,
                   cache: _RowCache | None = None) -> None:
    """Each row's hidden states at the input of layer `depth` (`frozen`: tokens × hidden size),
    computed once: the layers below it have no adapter. With `opening` (the embeddings of the n
    tokens every row begins with), of the tokens after those. With `cache` (its key: base model,
    depth and n), rows of the training before are read from it, and this training's rows kept."""
    import torch

    decoder = unwrapped(model).get_decoder()
    n = 0 if opening is None else opening.shape[1]
    todo = cache.missing(rows, lambda x, found: x.update(frozen=found)) if cache else list(rows)
    todo.sort(key=lambda x: len(x["input_ids"]))
    model.eval()
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        ids, _, attention, _ = _pad(chunk, pad_id)
        with torch.no_grad():
            states = _forward(decoder, slice(0, depth), ids[:, n:], attention[:, n:], opening, norm=False)
        for x, row in zip(chunk, states):
            x["frozen"] = row[: len(x["input_ids"]) - n].clone()
    if cache and todo:
        cache.save(rows, lambda x: x["frozen"], keep_others=False)  # one training's rows: the file stays small


def _frozen(batch: list[dict], depth: int):
    """The batch's frozen states, padded as `_pad` pads it, with their depth (None: none)."""
    import torch

    if not depth:
        return None
    width = max(len(x["frozen"]) for x in batch)
    first = batch[0]["frozen"]
    states = torch.zeros((len(batch), width, first.shape[-1]), dtype=first.dtype)
    for i, x in enumerate(batch):
        states[i, : len(x["frozen"])] = x["frozen"]
    return depth, states


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


def _length_grouped(order: list[int], lengths: list[int], batch_size: int, group: int = 8) -> list[list[int]]:
    """`order` cut into shuffled batches of rows of similar length, as transformers'
    group_by_length: the rows shuffled, taken `group` batches at a time, sorted by length
    within them, and the batches shuffled. On a 100-correction cycle (memory examples are twice
    as long as the rest) an epoch pads to 32k tokens instead of 48k, for 30k real ones."""
    order = list(order)
    random.shuffle(order)
    span = batch_size * group
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    random.shuffle(batches)
    return batches


def _pad(batch: list[dict], pad_id: int):
    """Tensors of a batch, padded to its longest row; `reference` is None, or the anchor rows
    (a mask) and their base distributions (`_reference`) in the order of their answer tokens."""
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
    mask = [bool(x.get("distill")) and "ref_ids" in x for x in batch]
    anchors = [x for x, m in zip(batch, mask) if m]
    reference = None
    if anchors:
        reference = (torch.tensor(mask), torch.cat([x["ref_ids"] for x in anchors]),
                     torch.cat([x["ref_logp"] for x in anchors]))
    return ids, labels, attention, reference
