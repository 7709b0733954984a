"""Adversarial fine-tuning (``alum-finetune``) and robustness evaluation (``alum-eval-robust``).

Methods (one module each under :mod:`.methods`): plain, smart/alum (ALUM's virtual adversarial term,
shared with pre-training through :mod:`alum_pretrain.adversarial`), freelb, pgd, freeat (the
embedding-space adversary of FreeLB), rift (information-theoretic robust fine-tuning with a frozen
pre-trained teacher and a synonym-substitution adversary).
"""
