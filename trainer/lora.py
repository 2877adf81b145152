"""LoRA training, as a loop one can read top to bottom (after karpathy/nanoGPT): the
configuration, the model and data, then one loop of batch → forward → loss → step."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from trainer.base_model import building, load_causal_lm
from trainer.dataset import Example, encode
from trainer.fastforward import FastForward, answer_targets


@dataclass
class TrainingConfig:
    """How an adapter is trained; the defaults are the recipe of reports/consolidation/report.md."""

    r: int = 16  # LoRA rank
    alpha: int = 32  # LoRA scaling numerator (the update is scaled by alpha / r)
    dropout: float = 0.0  # LoRA dropout
    target_modules: str | list[str] = "all-linear"  # the linear layers that get an adapter
    layers_from: float = 0.75  # adapt only layers from this fraction of the depth up (0: all layers)
    epochs: int = 4  # passes over the corrections
    # At least this many optimizer steps (more epochs when the set is small), so that one recipe
    # serves cycles of one correction and of a hundred.
    min_steps: int = 56
    learning_rate: float = 2e-3  # peak learning rate, decayed along a cosine
    batch_size: int = 8
    max_len: int = 128  # tokens of an example kept (prompt and answer)
    seed: int = 0
    # Anchors (Example.distill) are trained towards the base model's next-token distribution (KL)
    # with this weight; 0 trains them on the base's greedy text with cross-entropy.
    distill_weight: float = 3.0
    # The base distribution of an anchor token is kept as its top-k log-probabilities and the rest
    # of the mass as one bucket.
    distill_top_k: int = 64
    # Anchors drawn per epoch, in turn from the whole set so that every one is seen; 0: all of
    # them every epoch. Bounds a cycle's cost when a deployment supplies thousands of anchors.
    anchors_per_epoch: int = 256
    # Passes over the replayed earlier corrections (Example.replayed) in one training, drawn in
    # turn across the epochs; None: every one every epoch, like the new corrections. One pass
    # forgot a quarter of them (reports/zsre-report-n1000-k100-2026-12-06e/notes.md).
    replay_passes: int | None = None
    grad_clip: float = 1.0  # clip the gradients' norm at this value; 0 disables clipping
    # Compute the frozen layers' output once per example (trainer.fastforward); costs the
    # states' memory (examples × tokens × hidden size).
    cache_frozen_layers: bool = True
    share_opening: bool = True  # run the chat template's opening once per step (trainer.fastforward)
    threads: int | None = None  # torch threads; None: torch's default (all cores)

    def __post_init__(self):
        for name in ("r", "epochs", "batch_size", "max_len", "distill_top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (got {getattr(self, name)})")
        for name in ("min_steps", "distill_weight", "anchors_per_epoch", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative (got {getattr(self, name)})")
        if not 0 <= self.layers_from < 1:
            raise ValueError(f"layers_from must be in [0, 1) (got {self.layers_from}): 1.0 and above adapt no layer")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1) (got {self.dropout}): 1 would drop every input")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive (got {self.alpha}): the adapter's update is scaled by alpha / r")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive (got {self.learning_rate}): nothing would be learned")
        if self.replay_passes is not None and not 1 <= self.replay_passes <= self.epochs:
            raise ValueError(f"replay_passes must be between 1 and epochs ({self.epochs}), or None for every "
                             f"epoch (got {self.replay_passes})")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, or None for torch's default (got {self.threads})")


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

    if not examples:
        raise ValueError("no training examples")
    if config.threads:
        torch.set_num_threads(config.threads)
    random.seed(config.seed)
    torch.manual_seed(config.seed)

    # -- model and data ------------------------------------------------------------------
    tokenizer, model = load_model(base_model, config, init_adapter)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = [encode(tokenizer, ex, config.max_len) for ex in examples]
    started = time.monotonic()  # the time reported includes the precomputations
    fast = FastForward(model, data, pad_id, cache_frozen_layers=config.cache_frozen_layers,
                       share_opening=config.share_opening, batch_size=config.batch_size,
                       states_cache=states_cache, cache_key=base_model)
    if config.distill_weight:
        fast.reference([x for x in data if x["distill"]], config.distill_top_k, cache=reference_cache)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    # rows drawn in turn, a share each epoch (general anchors; replayed corrections with
    # replay_passes), and the others, trained every epoch
    anchors = [i for i, x in enumerate(data) if x["distill"] and not x.get("pinned")]
    replayed = [i for i, x in enumerate(data) if x.get("replayed") and not x["distill"] and config.replay_passes]
    drawn = set(anchors) | set(replayed)
    others = [i for i in range(len(data)) if i not in drawn]
    random.shuffle(anchors)
    random.shuffle(replayed)
    per_epoch = min(config.anchors_per_epoch or len(anchors), len(anchors))
    replay_per_epoch = math.ceil(len(replayed) * (config.replay_passes or 0) / config.epochs)
    batches_per_epoch = math.ceil((len(others) + per_epoch + replay_per_epoch) / config.batch_size)
    epochs = max(config.epochs, math.ceil(config.min_steps / batches_per_epoch))
    total = epochs * batches_per_epoch
    lengths = [len(x["input_ids"]) for x in data]

    def in_turn(rows: list[int], n: int, epoch: int) -> list[int]:
        return [rows[(epoch * n + j) % len(rows)] for j in range(n)] if rows else []

    # -- the loop ------------------------------------------------------------------------
    step, tokens, losses = 0, 0, []
    for epoch in range(epochs):
        order = others + in_turn(anchors, per_epoch, epoch) + in_turn(replayed, replay_per_epoch, epoch)
        for batch_ids in length_grouped(order, lengths, config.batch_size):
            batch = [data[i] for i in batch_ids]
            lr = config.learning_rate * 0.5 * (1 + math.cos(math.pi * step / total))  # cosine decay
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits = fast.forward(batch)
            loss = answer_loss(logits, batch, config.distill_weight)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += sum(lengths[i] for i in batch_ids)
            losses.append(loss.item())
            if progress:
                progress(step, total, losses[-1])

    # -- the artifact --------------------------------------------------------------------
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    (out_dir / "training_config.json").write_text(json.dumps(asdict(config), indent=2))
    return TrainingResult(step, time.monotonic() - started, tokens, losses[-1], losses)


def load_model(base_model: str, config: TrainingConfig, init_adapter: str | Path | None = None):
    """(tokenizer, PEFT model to train): `init_adapter`'s weights, or a new adapter as `config`
    says on the layers from `layers_from` of the depth up."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    with building():
        model = load_causal_lm(base_model)
        if init_adapter is not None:
            return tokenizer, PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
        return tokenizer, get_peft_model(model, _lora_config(model, config))


def _lora_config(model, config: TrainingConfig):
    """The LoraConfig of a new adapter: `config`'s, on the layers from `layers_from` of the depth up."""
    import torch
    from peft import LoraConfig

    n_layers = model.config.num_hidden_layers
    first = int(n_layers * config.layers_from)
    targets = config.target_modules
    if first and targets == "all-linear":  # PEFT takes layers_to_transform only with named modules
        targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and "lm_head" not in name})
    return LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        layers_to_transform=list(range(first, n_layers)) if first else None,
        task_type="CAUSAL_LM",
    )


def answer_loss(logits, batch: list[dict], distill_weight: float):
    """The loss of a batch given its answer logits (FastForward.forward): cross-entropy on the
    answers of corrections; on the answers of anchors that have a reference (FastForward.reference),
    `distill_weight` × KL(base || adapted) per token over the base's top-k tokens and the rest of
    the mass as one bucket (weight 0: cross-entropy on the anchors' text too)."""
    import torch
    import torch.nn.functional as F

    targets = answer_targets(batch)
    distill = [bool(distill_weight) and bool(x.get("distill")) and "ref_ids" in x for x in batch]
    anchor_token = torch.tensor([d for x, d in zip(batch, distill) for t in x["labels"][1:] if t != -100],
                                dtype=torch.bool)
    ce = ~anchor_token
    loss = F.cross_entropy(logits[ce], targets[ce]) if ce.any() else logits.sum() * 0.0
    if any(distill) and anchor_token.any():  # (an anchor cut off before its first token has none)
        anchors = [x for x, d in zip(batch, distill) if d]
        ref_ids, ref_logp = torch.cat([x["ref_ids"] for x in anchors]), torch.cat([x["ref_logp"] for x in anchors])
        logq = logits[anchor_token].log_softmax(-1).gather(-1, ref_ids)
        p = ref_logp.exp()
        p_rest = (1 - p.sum(-1)).clamp_min(1e-8)
        q_rest = (1 - logq.exp().sum(-1)).clamp_min(1e-8)
        kl = (p * (ref_logp - logq)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
        loss = loss + distill_weight * kl.mean()
    return loss


def length_grouped(order: list[int], lengths: list[int], batch_size: int, group: int = 8) -> list[list[int]]:
    """`order` cut into shuffled batches of rows of similar length, as transformers'
    group_by_length: the rows shuffled, taken `group` batches at a time, sorted by length
    within them, and the batches shuffled, so that little of a batch is padding."""
    order = list(order)
    random.shuffle(order)
    span = batch_size * group
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    random.shuffle(batches)
    return batches
