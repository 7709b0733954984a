"""ALUM, SMART, FreeLB, PGD and FreeAT for ``transformers.Trainer`` users (the project's core, no second copy).

* :class:`AlumTrainer` - masked-LM (continual) pre-training with ALUM's ``alpha * R`` added to the MLM loss
  (:mod:`alum_pretrain.hf.mlm`);
* :class:`MaskingCurriculumCallback` - ALUM's 5 % -> 25 % masking-rate curriculum driving
  ``DataCollatorForLanguageModeling`` (:mod:`alum_pretrain.hf.curriculum`);
* :class:`AdversarialTrainer` - sequence-classification fine-tuning with the ``alum-finetune`` methods
  (:mod:`alum_pretrain.hf.finetune`).

Needs ``transformers`` and ``accelerate`` (a core dependency); never imports fairseq or DeepSpeed.
See ``docs/trainer.md``.
"""

from __future__ import annotations

try:
    import accelerate  # noqa: F401  (transformers.Trainer needs it)
except ImportError as e:  # pragma: no cover - accelerate is a core dependency
    raise ImportError("alum_pretrain.hf needs accelerate (transformers.Trainer uses it): "
                      "pip install 'accelerate>=1.1' or bash scripts/setup.sh") from e

from .curriculum import MaskingCurriculumCallback
from .finetune import AdversarialTrainer
from .mlm import AlumTrainer

__all__ = ["AlumTrainer", "MaskingCurriculumCallback", "AdversarialTrainer"]
