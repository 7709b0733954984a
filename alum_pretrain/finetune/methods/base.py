"""What every fine-tuning method shares: the training context, the forward from word embeddings, the
task loss, and plain fine-tuning.

A method is an object with ``train_step(ctx, batch) -> metrics``.  It owns the *whole* update of one
minibatch (forward, loss, backward, ``ctx.optimizer_step()``) because the adversarial methods differ
exactly there: FreeLB accumulates K backwards before one optimizer step, FreeAT takes K optimizer steps
per minibatch.  ``ctx.optimizer_step()`` is the one place that all-reduces gradients (multi-process),
clips, steps the optimizer and the LR schedule and zeroes the gradients.

Perturbations are applied to the output of the word-embedding lookup, *before* position/segment
embeddings and the embedding LayerNorm (FreeLB's placement; the HF ``inputs_embeds`` path), see
:func:`word_embeddings` and :func:`forward_from_embeds`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

Batch = dict[str, torch.Tensor]


def word_embeddings(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The word-embedding lookup ``E[x]`` (B, T, H), attached to the embedding matrix's graph."""
    return model.get_input_embeddings()(batch["input_ids"])


def forward_from_embeds(model: nn.Module, embeds: torch.Tensor, batch: Batch, *,
                        hidden: bool = False):
    """Logits (B, C) of the HF sequence classifier fed ``inputs_embeds=embeds`` (B, T, H).

    With ``hidden=True`` returns ``(logits, features)`` where ``features`` (B, H) is the last layer's
    first-token ([CLS]/<s>) hidden state - the sentence feature RIFT's mutual-information terms use.
    """
    kwargs = {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"]}
    if "token_type_ids" in batch and _uses_token_types(model):
        kwargs["token_type_ids"] = batch["token_type_ids"]
    out = model(**kwargs, output_hidden_states=hidden)
    if hidden:
        return out.logits, out.hidden_states[-1][:, 0]
    return out.logits


def _uses_token_types(model: nn.Module) -> bool:
    return int(getattr(model.config, "type_vocab_size", 0) or 0) > 1


def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """Cross-entropy (classification, logits (B, C), labels (B,)) or MSE (regression, logits (B, 1))."""
    if regression:
        return F.mse_loss(logits.float().squeeze(-1), labels.float())
    return F.cross_entropy(logits.float(), labels)


def mse_divergence(adv_logits: torch.Tensor, clean_logits: torch.Tensor) -> torch.Tensor:
    """Regression counterpart of SymKL (mt-dnn ``MseCriterion``): mean squared difference, float32,
    gradient into both arguments (the ascent passes the clean side detached)."""
    return F.mse_loss(adv_logits.float(), clean_logits.float())


@contextlib.contextmanager
def fixed_dropout(seed: Optional[int], device: torch.device) -> Iterator[None]:
    """Every forward run inside draws the same dropout masks for the same ``seed`` (FreeLB Sec. 3.3).

    Implemented by forking the RNG state and reseeding it: dropout masks are drawn from the global
    (CPU, or the CUDA device's) generator in forward order, so the same seed and the same shapes give
    identical masks in every ascent step, and the outer RNG stream is left untouched.  ``seed=None``:
    no-op (independent masks).
    """
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def sync_grads_fixed_order(params: list[torch.Tensor], world_size: int) -> None:
    """Average ``.grad`` over processes with ONE flat all-reduce laid out by the parameter order alone.

    Every rank must contribute a buffer of the same length in the same layout, whatever its minibatch
    touched: a parameter with ``grad=None`` here (e.g. RIFT's head of a class absent from this rank's
    minibatch) contributes zeros.  Building the buffer from only the parameters that have a gradient would
    give the ranks buffers of different lengths (a hang or a crash) or, with equal lengths, add up the
    gradients of different parameters.  One presence flag per parameter rides along in the same buffer:
    a parameter that some rank touched gets the average (sum / world size) on every rank; one that no rank
    touched keeps ``grad=None``, so the optimizer skips it exactly as a single process would.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    flat = torch.zeros(total + len(params), dtype=torch.float32, device=params[0].device)  # grads + flags
    offset = 0
    for i, p in enumerate(params):
        if p.grad is not None:
            flat[offset:offset + sizes[i]].copy_(p.grad.reshape(-1))
            flat[total + i] = 1.0
        offset += sizes[i]
    dist.all_reduce(flat)
    present = (flat[total:] > 0).tolist()  # one host read per optimizer step (the step is host-driven anyway)
    flat = flat[:total] / world_size
    offset = 0
    for i, p in enumerate(params):
        n = sizes[i]
        if present[i]:
            g = flat[offset:offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        offset += n


class NonFiniteError(RuntimeError):
    """Fine-tuning diverged: NaN/Inf gradients for ``--run.max_nonfinite`` consecutive updates."""


@dataclass
class TrainContext:
    """What a method needs to run one update (built once by the trainer)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Optional[object] = None
    grad_clip: float = 1.0
    regression: bool = False
    step_seed: int = 0            # set by the trainer before each batch: deterministic per (seed, step)
    extra_params: list = field(default_factory=list)   # method-owned trainable params (RIFT heads)
    optimizer_steps: int = 0      # incremented by optimizer_step()
    max_nonfinite: int = 5        # consecutive NaN/Inf-gradient steps before NonFiniteError
    nonfinite_skipped: int = 0    # updates skipped for a NaN/Inf gradient norm (loss NaN -> gradient NaN)
    nonfinite_run: int = 0
    scaler: Optional[object] = None   # torch.amp.GradScaler for fp16 autocast (None: fp32/bf16)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, through the GradScaler when there is one (fp16).  Input gradients read
        from ``.grad`` afterwards (FreeLB, FreeAT) carry the scale: normalise them, never use their size."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generator(self, stream: int) -> torch.Generator:
        """A CPU generator for ``(step_seed, stream)``: the random start of a perturbation is a pure
        function of the step, so a resumed run draws exactly what the uninterrupted run drew."""
        return torch.Generator().manual_seed((self.step_seed * 1_000_003 + stream) % (2**63 - 1))

    def dropout_seed(self, stream: int = 0) -> int:
        return (self.step_seed * 7_919 + 104_729 + stream) % (2**63 - 1)

    def params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad] + list(self.extra_params)

    def sync_grads(self) -> None:
        """Average gradients over processes (one flat all-reduce; a no-op in a single process).

        The trainer does not wrap the model in DDP: the adversarial methods run several forwards per
        backward, several backwards per step (FreeLB) or input-only backwards (PGD, SMART), which
        DDP's reducer does not support uniformly; an explicit all-reduce before each optimizer step
        is correct for all of them.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        sync_grads_fixed_order(self.params(), dist.get_world_size())

    def optimizer_step(self) -> torch.Tensor:
        """all-reduce -> clip -> optimizer step -> LR-schedule step -> zero grads; returns the grad norm.

        A NaN/Inf gradient norm (global after the all-reduce, so every process agrees) skips the update and
        the schedule step; ``max_nonfinite`` consecutive skips raise :class:`NonFiniteError`."""
        self.sync_grads()
        params = self.params()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)   # true gradients for clipping and the norm
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            norm = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        if not bool(torch.isfinite(norm)):  # one host sync per update
            if self.scaler is not None:  # fp16: the scaler skips the update and lowers its scale
                self.scaler.step(self.optimizer)
                self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_skipped += 1
            # fp16 overflows are routine while the loss scale adapts; they count towards max_nonfinite only
            # once the scale has collapsed below 1 (~17 overflows in a row from 2^16): NaN at any scale.
            if self.scaler is None or self.scaler.get_scale() < 1.0:
                self.nonfinite_run += 1
            if self.nonfinite_run >= self.max_nonfinite:
                raise NonFiniteError(
                    f"update {self.optimizer_steps + 1}: the gradient norm was NaN/Inf for {self.nonfinite_run} "
                    f"consecutive updates (--run.max_nonfinite={self.max_nonfinite}); they were skipped")
            return norm.detach()
        self.nonfinite_run = 0
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        return norm.detach()


class Method:
    """Base class: plain fine-tuning (no adversary).  Subclasses override :meth:`train_step`."""

    name = "plain"
    #: optimizer steps taken per minibatch (FreeAT: K) - the trainer sizes the LR schedule with it
    optimizer_steps_per_batch = 1

    def __init__(self, cfg=None, regression: bool = False):
        self.cfg = cfg
        self.regression = regression

    def modules(self) -> list[nn.Module]:
        """Trainable modules the method owns (added to the optimizer and the checkpoint)."""
        return []

    def setup(self, model: nn.Module) -> None:
        """Called once with the model before training (RIFT copies the frozen teacher here)."""

    def state_dict(self) -> dict:
        return {f"m{i}": m.state_dict() for i, m in enumerate(self.modules())}

    def load_state_dict(self, state: dict) -> None:
        for i, m in enumerate(self.modules()):
            m.load_state_dict(state[f"m{i}"])

    def loss_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return lambda logits, labels: task_loss(logits, labels, self.regression)

    def train_step(self, ctx: TrainContext, batch: Batch) -> dict[str, torch.Tensor]:
        embeds = word_embeddings(ctx.model, batch)                  # (B, T, H)
        logits = forward_from_embeds(ctx.model, embeds, batch)      # (B, C)
        loss = task_loss(logits, batch["labels"], self.regression)
        ctx.backward(loss)
        gnorm = ctx.optimizer_step()
        return {"loss": loss.detach(), "grad_norm": gnorm}


class Plain(Method):
    """Plain fine-tuning: task loss on clean inputs, one backward, one optimizer step."""

    name = "plain"
