"""The native pre-training engine behind ``alum-train`` (the loop itself is :mod:`alum_pretrain.train`).

* :mod:`.config`      typed config sections (data, model, optim, train; masking/alum come from the core)
* :mod:`.setup`       builds a run (model, DDP, optimizer, loaders, logger); resume, save, evaluate
* :mod:`.step`        :class:`PretrainStep` - masking + clean pass + MLM/NSP loss + ALUM in ONE forward
* :mod:`.optim`       AdamW (fused on CUDA) and the linear warm-up / linear decay schedule
* :mod:`.checkpoint`  atomic, complete checkpoints; automatic resume; keep-last-k
* :mod:`.metrics`     rank-0 logger: console, log.jsonl, TensorBoard; tokens/s and MFU
* :mod:`.plot`        loss parts + mask rate vs step (plot.png)
* :mod:`.distributed` torchrun env -> process groups (NCCL/gloo) and small collectives
"""
