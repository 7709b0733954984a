"""The masking-rate curriculum for ``transformers.Trainer`` users: a callback that drives the collator.

:class:`MaskingCurriculumCallback` sets ``collator.mlm_probability`` (``DataCollatorForLanguageModeling``,
or any collator with that attribute) from :meth:`alum_pretrain.masking.MaskingConfig.rate_at` - by default
ALUM's 5 % -> 25 % curriculum in five equal phases of ``max_steps``; ``MaskingConfig(schedule="constant")``
gives BERT's fixed rate.  The rate is a pure function of the optimizer step, so a run resumed from a
checkpoint masks at the rate an uninterrupted run would.

**When the rate changes.** Trainer's data loader collates a batch ahead of the step that trains on it
(the loader looks one batch ahead to detect the end of an epoch), so at the end of step ``s`` the callback
sets the rate of the batches collated next: with ``gradient_accumulation_steps == 1`` that is the batch of
step ``s + 2`` (the batch of step ``s + 1`` is already collated); ``lookahead`` says how many steps ahead
to set, default 1 (GA = 1) and 0 with accumulation, where one micro-batch per phase boundary is then
collated at the previous phase's rate.  Use ``num_workers=0`` data loaders (the default): worker
processes hold their own copy of the collator.
"""

from __future__ import annotations

from typing import Any, Optional

from transformers import TrainerCallback

from ..compat import check_masking
from ..masking import MaskingConfig

__all__ = ["MaskingCurriculumCallback"]


class MaskingCurriculumCallback(TrainerCallback):
    """Drive ``collator.mlm_probability`` along ``masking.rate_at(step, total_steps)`` (module docstring).

    ``collator``: the object whose ``mlm_probability`` is set (the Trainer's ``data_collator``).
    ``masking``: the schedule (default ``MaskingConfig()``: the 5 % -> 25 % curriculum).  ``total_steps``:
    the length the schedule is spread over (default: the Trainer's ``state.max_steps``).  ``lookahead``:
    optimizer steps between setting a rate and training on the batches collated with it (None: 1 without
    gradient accumulation, else 0; see the module docstring).
    """

    def __init__(self, collator: Any, masking: Optional[MaskingConfig] = None, total_steps: Optional[int] = None,
                 lookahead: Optional[int] = None):
        if not hasattr(collator, "mlm_probability"):
            raise ValueError(f"MaskingCurriculumCallback: {type(collator).__name__} has no mlm_probability; pass "
                             "the DataCollatorForLanguageModeling the Trainer uses")
        if masking is not None and not isinstance(masking, MaskingConfig):
            raise ValueError("MaskingCurriculumCallback: masking must be an alum_pretrain.masking.MaskingConfig")
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps <= 0):
            raise ValueError(f"MaskingCurriculumCallback: total_steps={total_steps!r} must be a positive integer")
        if lookahead is not None and (not isinstance(lookahead, int) or lookahead < 0):
            raise ValueError(f"MaskingCurriculumCallback: lookahead={lookahead!r} must be an integer >= 0")
        self.collator = collator
        self.masking = masking if masking is not None else MaskingConfig()
        # every scheduled rate > 0 (the collator does the 80/10/10 and Trainer's evaluation its own masking)
        check_masking(self.masking, validation=False, split=False)
        self.total_steps = total_steps
        self.lookahead = lookahead

    def total(self, state) -> int:
        """The number of steps the schedule spans (``total_steps`` or the Trainer's ``max_steps``)."""
        total = self.total_steps or int(getattr(state, "max_steps", 0) or 0)
        if total <= 0:
            raise ValueError("MaskingCurriculumCallback: the Trainer's max_steps is unknown; pass total_steps=")
        return total

    def rate(self, step: int, state) -> float:
        """The scheduled masking rate of optimizer step ``step`` (a pure function of the step)."""
        return self.masking.rate_at(max(0, int(step)), self.total(state))

    def _ahead(self, args) -> int:
        if self.lookahead is not None:
            return self.lookahead
        return 1 if int(getattr(args, "gradient_accumulation_steps", 1)) == 1 else 0

    def on_train_begin(self, args, state, control, **kwargs):
        # The first fetch collates the first step's batches: they get that step's rate.
        self.collator.mlm_probability = self.rate(state.global_step, state)

    def on_step_end(self, args, state, control, **kwargs):
        # state.global_step = steps done = the index of the next step to train.
        self.collator.mlm_probability = self.rate(state.global_step + self._ahead(args), state)
