"""fairseq task ``alum_masked_lm``: data-bin shards -> MLM blocks or NSP pairs, masked per update.

Differences from fairseq's ``masked_lm`` (what this task is for):

* **Masking per update, not per dataset item.**  Batches leave the data loader *unmasked*;
  :meth:`AlumMaskedLMTask.train_step` masks them with :func:`alum_pretrain.masking.mask_batch` at the
  rate of the masking-rate curriculum for the current ``update_num`` (ALUM Sec. 2.3: 5 % -> 25 % in 5
  phases), through the same :class:`alum_pretrain.masking.TokenMasker` and randomness streams as the native
  engine.  The masking options are ``--masking-<field>`` for every ``masking.<field>`` of alum-train
  (:mod:`alum_pretrain.knobs`); the old ``--mask-*`` spellings still work for one release (with a warning).  Each sample's mask is a pure function of ``(seed, update_num, sample_id)``, so a
  resumed run masks every update exactly as an uninterrupted one, whatever the number of workers or
  the gradient-accumulation split.
* **Curriculum length is explicit.**  Progress = ``update_num / --masking-curriculum-steps``
  (``masking.curriculum_steps`` of alum-train; default: ``--max-update``).  Set it explicitly when you will
  resume with a larger ``--max-update``; otherwise the schedule would be stretched on resume.
* **The project's data-bin layout.**  ``DATA`` is the data-bin root (all ``shardK`` discovered from
  ``manifest.json``, one shard per epoch) or fairseq's colon list ``bin/shard0:bin/shard1``.
  ``dict.txt`` is read from the data-bin root (or the first path).  Sequences are framed with the
  tokenizer's own ``[CLS]``/``[SEP]`` and masked with its ``[MASK]`` (ids + ``id_offset``), so the
  exported HuggingFace model works with the data-bin's tokenizer unchanged.
* **Sentence pairs with NSP** (``--sample-mode pairs``), BERT-style (fairseq's ``legacy_masked_lm``
  is broken in this fork); the model gets a registered ``nsp`` classification head.

Like ``masked_lm`` the task appends ``<mask>`` to the dictionary, so checkpoints are interchangeable
between ``--task masked_lm`` and ``--task alum_masked_lm`` on the same data-bin (same embedding size);
this task does not use that symbol.
"""


import logging
import os
from dataclasses import dataclass, field, make_dataclass
from typing import Optional

import numpy as np
import torch
from omegaconf import II, MISSING

from fairseq import utils
from fairseq.data import (
    Dictionary,
    IdDataset,
    NestedDictionaryDataset,
    NumelDataset,
    NumSamplesDataset,
    PrependTokenDataset,
    RightPadDataset,
    SortDataset,
    TokenBlockDataset,
    data_utils,
)
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.tasks import FairseqTask, register_task

from alum_pretrain import knobs
from alum_pretrain.compat import bad_value, check_masking
from alum_pretrain.data import indexed
from alum_pretrain.data.databin import MANIFEST, DataBin
from alum_pretrain.data.tokens import build_token_tables
from alum_pretrain.masking import IGNORE_INDEX, STREAM_EVAL_MASK, STREAM_MASK, TokenMasker
from alum_pretrain.run_identity import data_identity, read_tokenizer_files

from .datasets import (FairseqIds, NSPPairDataset, NSPSampleDataset, SentenceChunkDataset,
                       load_doc_starts)
from .identity import IDENTITY_KEY, TOKENIZER_KEY
from .strict import SKIP_FLAG

logger = logging.getLogger(__name__)

NSP_HEAD = "nsp"

# --masking-<field> for every masking.<field> of the native config (+ the deprecated --mask-* spellings)
_MaskingOptions = make_dataclass("_MaskingOptions", knobs.dataclass_fields("masking", ChoiceEnum),
                                 bases=(FairseqDataclass,))


@dataclass
class AlumMaskedLMConfig(_MaskingOptions):
    data: str = field(default=MISSING, metadata={
        "help": "a data-bin written by alum-prep (all its shards, one per epoch) or a colon-separated list of "
                "shard folders (bin/shard0:bin/shard1), iterated one per epoch like fairseq's masked_lm"})
    sample_mode: ChoiceEnum(["blocks", "pairs"]) = field(default="blocks", metadata={
        "help": "blocks: RoBERTa-style MLM on [CLS]-prefixed blocks of whole sentences (document ends "
                "marked by [SEP]); pairs: BERT-style [CLS] A [SEP] B [SEP] with next-sentence labels "
                "(registers an 'nsp' classification head on the model)"})
    tokens_per_sample: int = field(default=512, metadata={
        "help": "max tokens per sample, including [CLS]/[SEP] (= the model's --max-positions)"})
    sample_break_mode: ChoiceEnum(["none", "complete"]) = field(default="complete", metadata={
        "help": "blocks mode: complete = blocks of whole sentences (RoBERTa FULL-SENTENCES; longer "
                "sentences are split, never dropped); none = fixed-size blocks ignoring sentence ends"})
    short_seq_prob: float = field(default=0.1, metadata={
        "help": "pairs mode: probability of a shorter random target length (BERT: 0.1)"})
    max_nonfinite: int = field(default=5, metadata={
        "help": "skip (no update) an update whose gradient norm is NaN/Inf and stop (exit 3) after this many in "
                "a row, like alum-train's --train.max_nonfinite (fp16/AMP overflows keep the loss scaler's handling)"})
    seed: int = II("common.seed")
    max_update: int = II("optimization.max_update")


def _find_root(path: str) -> Optional[str]:
    """The data-bin root holding manifest.json for a root or shard path (None if there is none)."""
    for cand in (path, os.path.dirname(os.path.normpath(path))):
        if cand and os.path.exists(os.path.join(cand, MANIFEST)):
            return cand
    return None


def resolve_data(data: str) -> tuple[str, list[str], DataBin]:
    """``(root, shard_dirs, data-bin)`` for ``--data`` (a data-bin root or a colon list of shard folders)."""
    paths = utils.split_paths(data)
    if not paths:
        raise ValueError("alum_masked_lm: empty DATA path")
    root = _find_root(paths[0])
    if root is None:
        raise ValueError(f"{paths[0]}: no {MANIFEST} here or in the parent folder - DATA must be a data-bin "
                         "written by alum-prep (or its shardK folders); run `alum-prep INPUT --out DIR` first")
    databin = DataBin(root)
    if len(paths) == 1 and os.path.normpath(paths[0]) == os.path.normpath(root):
        n = databin.num_shards
        shards = [os.path.join(root, f"shard{k}") for k in range(n)]
        if not shards or not all(os.path.isdir(s) for s in shards):
            raise ValueError(f"{root}/{MANIFEST}: lists {n} shards but shard0..shard{n - 1} are not all present")
    else:
        shards = list(paths)
        for s in shards:
            if _find_root(s) is None:
                raise ValueError(f"{s}: not a shard of an alum-prep data-bin (no {MANIFEST} in its parent)")
    return root, shards, databin


def shard_index(shard_dir: str) -> int:
    name = os.path.basename(os.path.normpath(shard_dir))
    if not (name.startswith("shard") and name[5:].isdigit()):
        raise ValueError(f"{shard_dir}: shard folders of an alum-prep data-bin are named shardK")
    return int(name[5:])


@register_task("alum_masked_lm", dataclass=AlumMaskedLMConfig)
class AlumMaskedLMTask(FairseqTask):
    """MLM (+NSP) on alum-prep data-bins with ALUM's masking-rate curriculum applied per update."""

    cfg: AlumMaskedLMConfig

    def __init__(self, cfg: AlumMaskedLMConfig, dictionary: Dictionary, root: str, shards: list[str],
                 databin: DataBin):
        super().__init__(cfg)
        self.dictionary = dictionary
        self.root, self.shards, self.manifest = root, shards, databin.manifest
        self.databin = databin
        # what every checkpoint records and a resume checks (.identity); read once, at the start
        self.identity = data_identity(databin, databin.tokenizer_dir)
        self.tokenizer_files = read_tokenizer_files(databin.tokenizer_dir)
        self.id_offset = databin.id_offset
        self.tokenizer_vocab_size = databin.vocab_size
        special = {k: v + self.id_offset for k, v in databin.special_ids.items()}
        for key in ("cls", "sep", "mask"):
            if key not in special:
                raise ValueError(f"{root}/{MANIFEST}: tokenizer.special_ids has no {key!r}; the task frames "
                                 "sequences with [CLS]/[SEP] and masks with [MASK]")
        self.cls_idx, self.sep_idx, self.mask_idx = special["cls"], special["sep"], special["mask"]
        if len(dictionary) < self.id_offset + self.tokenizer_vocab_size:
            raise ValueError(f"{root}/dict.txt: {len(dictionary) - dictionary.nspecial} symbols but the manifest's "
                             f"tokenizer has {self.tokenizer_vocab_size} (+ id_offset {self.id_offset}); the data-bin "
                             "is inconsistent")
        # Like masked_lm: append <mask> so the embedding size matches masked_lm checkpoints (unused here).
        self.fairseq_mask_idx = dictionary.add_symbol("<mask>")
        # The native engine's per-vocabulary tables (tokenizer specials, word continuations, random pool
        # without [unusedN] placeholders), shifted to fairseq ids: both engines mask the same way.
        self.tables = build_token_tables(databin)
        off = self.id_offset
        never = set(range(dictionary.nspecial)) | {self.fairseq_mask_idx}
        never |= {int(i) + off for i in torch.nonzero(self.tables.special).flatten().tolist()}
        never |= set(special.values())
        self.special_ids = torch.tensor(sorted(never), dtype=torch.long)
        self.masking = knobs.from_flat("masking", cfg)
        # every scheduled rate and the eval rate leave something to predict; some [MASK] in the 80/10/10
        check_masking(self.masking, section=lambda key: knobs.flag_of(f"masking.{key}"))
        self.masker = TokenMasker(self.masking, self.mask_idx, self.tables.random_pool + off, int(cfg.seed))
        self.continuation = None
        if self.masking.whole_word:
            if self.tables.kind == "none":
                raise ValueError(f"--masking-whole-word: cannot tell word-continuation pieces of the tokenizer in "
                                 f"{root}/tokenizer; drop --masking-whole-word")
            cont = torch.zeros(len(dictionary), dtype=torch.bool)  # (len(dict),) True = continues a word
            cont[off:off + self.tables.vocab_size] = self.tables.continuation
            self.continuation = cont
        if self.masking.schedule == "curriculum":
            self.curriculum_updates  # raises now (not at the first update) when the length is unknown

    @classmethod
    def setup_task(cls, cfg: AlumMaskedLMConfig, **kwargs):
        root, shards, databin = resolve_data(cfg.data)
        dict_path = os.path.join(root, "dict.txt")
        if not os.path.exists(dict_path):
            dict_path = os.path.join(shards[0], "dict.txt")
        if not os.path.exists(dict_path):
            raise ValueError(f"{root}/dict.txt: missing; the data-bin is incomplete (re-run alum-prep)")
        dictionary = Dictionary.load(dict_path)
        logger.info("dictionary: %d types from %s; %d shard(s): %s", len(dictionary), dict_path, len(shards),
                    ", ".join(shards))
        return cls(cfg, dictionary, root, shards, databin)

    # ---------------------------------------------------------------- curriculum

    @property
    def curriculum_updates(self) -> int:
        total = self.masking.curriculum_steps or (self.cfg.max_update or 0)
        if total <= 0 and self.masking.schedule == "curriculum":
            raise ValueError("--masking-schedule curriculum needs the training length: set --masking-curriculum-steps "
                             "(or --max-update)")
        return max(int(total), 1)

    def train_mask_rate(self, update_num: int) -> float:
        """The curriculum's masking rate at ``update_num`` (progress = update_num / curriculum_updates)."""
        if self.masking.schedule == "constant":
            return self.masking.constant_rate
        return self.masking.rate_at(int(update_num), self.curriculum_updates)

    # ---------------------------------------------------------------- data

    def has_sharded_data(self, split):
        return len(self.shards) > 1

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        shard = self.shards[(epoch - 1) % len(self.shards)]
        prefix = os.path.join(shard, split)
        missing = FileNotFoundError(f"{prefix}.idx/.bin: split {split!r} not found in shard {shard}")
        pad = self.source_dictionary.pad()
        if self.cfg.sample_mode == "pairs":  # read through the native sampler (NSPPairDataset)
            if not indexed.exists(prefix):
                raise missing
            pairs = NSPPairDataset(self.root, shard_index(shard), split, self.cfg.tokens_per_sample, self.tables,
                                   self.id_offset, short_seq_prob=self.cfg.short_seq_prob, seed=self.cfg.seed,
                                   epoch=epoch)
            dataset = NSPSampleDataset(pairs, pad)
            sizes = pairs.sizes
        else:
            if not indexed.exists(prefix):
                raise missing
            # the native reader: ids outside the vocabulary fail with the native engine's error
            base = FairseqIds(self.databin.split(shard_index(shard), split), self.id_offset)
            block = self.cfg.tokens_per_sample - 1  # one less for [CLS]
            chunks = SentenceChunkDataset(base, load_doc_starts(prefix, len(base)), block, self.sep_idx)
            blocks = TokenBlockDataset(chunks, chunks.sizes, block, pad=pad, eos=self.sep_idx,
                                       break_mode=self.cfg.sample_break_mode)
            src = PrependTokenDataset(blocks, self.cls_idx)
            dataset = NestedDictionaryDataset(
                {
                    "id": IdDataset(),
                    "net_input": {
                        "src_tokens": RightPadDataset(src, pad_idx=pad),  # (B, T) unmasked
                        "src_lengths": NumelDataset(src, reduce=False),
                    },
                    "nsentences": NumSamplesDataset(),
                    "ntokens": NumelDataset(src, reduce=True),
                },
                sizes=[src.sizes],
            )
            sizes = src.sizes
        logger.info("loaded %d %s samples from %s", len(dataset), self.cfg.sample_mode, prefix)
        with data_utils.numpy_seed(self.cfg.seed + epoch):
            shuffle = np.random.permutation(len(dataset))
        self.datasets[split] = SortDataset(dataset, sort_order=[shuffle, sizes])

    # ---------------------------------------------------------------- model

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        limit = model.max_positions() if hasattr(model, "max_positions") else None
        if isinstance(limit, int) and self.cfg.tokens_per_sample > limit:
            raise bad_value("--tokens-per-sample", self.cfg.tokens_per_sample,
                            f"the {type(model).__name__} model has positions for {limit} tokens per sequence "
                            "(--max-positions), so longer samples would index past its position table",
                            f"use --tokens-per-sample={limit} or less, or raise --max-positions for a new model")
        if self.cfg.sample_mode == "pairs":
            if not hasattr(model, "register_classification_head"):
                raise ValueError(f"--sample-mode pairs needs a model with classification heads (RoBERTa); "
                                 f"{type(model).__name__} has none")
            if NSP_HEAD not in getattr(model, "classification_heads", {}):
                model.register_classification_head(NSP_HEAD, num_classes=2)
        return model

    # ---------------------------------------------------------------- masking

    def _device_tables(self, device: torch.device) -> dict:
        """The special-id list and continuation flags on ``device`` (copied once per device)."""
        cache = self.__dict__.setdefault("_tables_on", {})
        if device not in cache:
            cache[device] = {
                "special_ids": self.special_ids.to(device),
                "continuation": self.continuation.to(device) if self.continuation is not None else None,
            }
        return cache[device]

    def mask_sample(self, sample: dict, rate: float, step: int, stream: int) -> dict:
        """Mask ``sample`` in place of its ``src_tokens``; adds ``target`` (pad off the masked positions)."""
        if not sample or "net_input" not in sample:
            return sample
        src = sample["net_input"]["src_tokens"]  # (B, T) unmasked
        # Masking runs where the batch lives (fairseq has already moved it to the GPU): no device->host copy
        # of the tokens, and every op is integer arithmetic, so CPU and GPU give the same masks.  Per-sample
        # randomness keyed by (seed, update, sample id): masks do not depend on batch composition, world
        # size or accumulation, so resume reproduces them exactly.
        tables = self._device_tables(src.device)
        special = torch.isin(src, tables["special_ids"])  # (B, T) True = never mask (specials + padding)
        cont = tables["continuation"][src] if self.continuation is not None else None  # (B, T)
        masked_t, labels_t = self.masker.mask(src, special, rate, step, sample["id"], stream, cont)  # (B, T)
        out = dict(sample)
        out["net_input"] = dict(sample["net_input"], src_tokens=masked_t)
        # fairseq convention: pad = not predicted
        out["target"] = labels_t.masked_fill(labels_t == IGNORE_INDEX, self.source_dictionary.pad())
        out["mask_rate"] = float(rate)
        out["n_maskable"] = (~special).sum()  # a device tensor: no host sync in the task
        out["update_num"] = int(step)
        return out

    def optimizer_step(self, optimizer, model, update_num):
        """``optimizer.step()``, or nothing for an update whose gradient norm was NaN/Inf
        (:mod:`alum_pretrain.fairseq_ext.strict` zeroed its gradients and flagged it)."""
        if getattr(optimizer, SKIP_FLAG, False):
            setattr(optimizer, SKIP_FLAG, False)
            return
        super().optimizer_step(optimizer, model, update_num)

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        rate = self.train_mask_rate(update_num)
        sample = self.mask_sample(sample, rate, update_num, STREAM_MASK)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def valid_step(self, sample, model, criterion):
        sample = self.mask_sample(sample, self.masking.eval_rate, 0, STREAM_EVAL_MASK)
        return super().valid_step(sample, model, criterion)

    # ---------------------------------------------------------------- misc

    def state_dict(self):
        """fairseq saves this as every checkpoint's ``task_state``: the data-bin and tokenizer fingerprint and
        the tokenizer files (:mod:`alum_pretrain.fairseq_ext.identity`)."""
        return {**super().state_dict(), IDENTITY_KEY: self.identity, TOKENIZER_KEY: dict(self.tokenizer_files)}

    @property
    def source_dictionary(self):
        return self.dictionary

    @property
    def target_dictionary(self):
        return self.dictionary

    def begin_epoch(self, epoch, model):
        model.set_epoch(epoch)

    def max_positions(self):
        return self.cfg.tokens_per_sample
