"""The native pre-training engine behind ``alum-train`` (the loop itself is :mod:`alum_pretrain.train`).

* :mod:`.config`      typed config sections (data, model, optim, train; masking/alum come from the core)
* :mod:`.setup`       builds a run (model, DDP, optimizer, loaders, logger, stepper)
* :mod:`.step`        :class:`PretrainStep` - masking + clean pass + MLM/NSP loss + ALUM in ONE forward;
                      validation (:func:`evaluate`) and the non-finite guard (:func:`step_is_finite`)
* :mod:`.stepper`     the engine's half of an optimizer step and of a checkpoint (DDP or DeepSpeed)
* :mod:`.optim`       AdamW (fused on CUDA) and the linear warm-up / linear decay schedule
* :mod:`.checkpoint`  atomic, complete checkpoints; save and automatic resume of a run; keep-last-k
* :mod:`.metrics`     rank-0 logger: console, log.jsonl, TensorBoard; tokens/s and MFU; step-metric accumulation
* :mod:`.plot`        loss parts + mask rate vs step (plot.png)
* :mod:`.distributed` torchrun env -> process groups (NCCL/gloo) and small collectives
"""
