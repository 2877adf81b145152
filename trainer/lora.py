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


@dataclass
class TrainingConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    # The defaults are the recipe measured in reports/consolidation/ (100 zsRE corrections).
    layers_from: float = 0.5  # adapt only layers from this fraction of the depth up (0: all layers)
    epochs: int = 3
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
    distill_weight: float = 1.0
    # The base distribution of each anchor token is computed once, before the loop, and kept as
    # its top-k log-probabilities plus the rest of the mass as one bucket (no reference forward
    # pass per step).
    distill_top_k: int = 64
    # Anchors (Example.distill) drawn per epoch, in turn from the whole set so that every one is
    # seen; 0: all of them every epoch.
    anchors_per_epoch: int = 0
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
) -> TrainingResult:
    """Train a LoRA adapter on `examples` and save it as a plain PEFT folder in `out_dir`;
    from `init_adapter`'s weights (continuing a previous version) or from zero."""
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
    started = time.monotonic()  # the time reported includes computing the anchors' reference
    if config.distill_weight:
        _reference(model, [x for x in data if x["distill"]], pad_id, config.distill_top_k, config.batch_size)
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

    # -- the loop ------------------------------------------------------------------------
    step, tokens, losses = 0, 0, []
    for epoch in range(epochs):
        order = others + [anchors[(epoch * per_epoch + j) % len(anchors)] for j in range(per_epoch)]
        random.shuffle(order)
        for b in range(batches_per_epoch):
            batch = [data[i] for i in order[b * config.batch_size : (b + 1) * config.batch_size]]
            input_ids, labels, attention, reference = _pad(batch, pad_id)  # dynamic padding: to this batch's longest
            lr = config.learning_rate * 0.5 * (1 + math.cos(math.pi * step / total))  # cosine decay
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = _loss(model, input_ids, labels, attention, reference, config.distill_weight)
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


def _reference(model, rows: list[dict], pad_id: int, top_k: int, batch_size: int) -> None:
    """The base model's next-token distribution on each anchor's answer tokens, computed once
    with the adapter switched off: `ref_ids`/`ref_logp` (answer tokens × top_k) on each row."""
    import torch

    model.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids, labels, attention, _ = _pad(chunk, pad_id)
        with torch.no_grad(), model.disable_adapter():
            logp = model(input_ids=ids, attention_mask=attention).logits[:, :-1].log_softmax(-1)
        answer = labels[:, 1:] != -100
        for i, x in enumerate(chunk):
            values, indices = logp[i][answer[i]].topk(min(top_k, logp.shape[-1]), dim=-1)
            x["ref_logp"], x["ref_ids"] = values, indices


def _loss(model, input_ids, labels, attention, reference, weight: float):
    """Cross-entropy on the answers of corrections; on the answers of anchors (`reference`: the
    rows that are anchors and their base distributions, or None), KL(base || adapted) per token
    over the base's top-k tokens and the rest of the mass as one bucket."""
    import torch
    import torch.nn.functional as F

    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
    targets = labels[:, 1:]
    answer = targets != -100
    distill = torch.zeros(len(input_ids), dtype=torch.bool) if reference is None or not weight else reference[0]
    ce = answer & ~distill[:, None]
    loss = F.cross_entropy(logits[ce], targets[ce]) if ce.any() else logits.sum() * 0.0
    if distill.any():
        _, ref_ids, ref_logp = reference
        logq = logits[distill][answer[distill]].log_softmax(-1).gather(-1, ref_ids)
        p = ref_logp.exp()
        p_rest = (1 - p.sum(-1)).clamp_min(1e-8)
        q_rest = (1 - logq.exp().sum(-1)).clamp_min(1e-8)
        kl = (p * (ref_logp - logq)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
        loss = loss + weight * kl.mean()
    return loss


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
