"""alum-pretrain: adversarial pre-training (ALUM) of BERT/RoBERTa-style masked language models.

Raw text -> sharded binarized corpora (``alum-prep``), MLM(+NSP) pre-training with ALUM's
virtual-adversarial term under a masking-rate curriculum (``alum-train``, or fairseq with
``--user-dir alum_pretrain/fairseq_ext``), export to HuggingFace (``alum-export``), SLURM launchers
(``alum-launch``) and adversarial fine-tuning (``alum-finetune``, ``alum-eval-robust``).
"""

__version__ = "0.1.0"
