"""fairseq task ``alum_masked_lm``: data-bin shards -> MLM blocks or NSP pairs, masked per update.

Differences from fairseq's ``masked_lm`` (what this task is for):

* **Masking per update, not per dataset item.**  Batches leave the data loader *unmasked*;
  :meth:`AlumMaskedLMTask.train_step` masks them with :func:`alum_pretrain.masking.mask_batch` at the
  rate of the masking-rate curriculum for the current ``update_num`` (ALUM Sec. 2.3: 5 % -> 25 % in 5
  phases).  Each sample's mask is a pure function of ``(seed, update_num, sample_id)``, so a
  resumed run masks every update exactly as an uninterrupted one, whatever the number of workers or
  the gradient-accumulation split.
* **Curriculum length is explicit.**  Progress = ``update_num / --mask-curriculum-updates``
  (default: ``--max-update``).  Set it explicitly when you will resume with a larger ``--max-update``;
  otherwise the schedule would be stretched on resume.
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
from dataclasses import dataclass, field
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

from alum_pretrain.data import indexed
from alum_pretrain.data.databin import MANIFEST, DataBin
from alum_pretrain.data.tokens import build_token_tables
from alum_pretrain.masking import IGNORE_INDEX, MaskingConfig, mask_batch

from .datasets import NSPPairDataset, NSPSampleDataset, SentenceChunkDataset, load_doc_starts

logger = logging.getLogger(__name__)

# randomness streams (as in the native engine): one consumer per stream so draws never collide.
STREAM_MASK = 0
STREAM_ALUM = 1
STREAM_VALID_MASK = 2
NSP_HEAD = "nsp"


@dataclass
class AlumMaskedLMConfig(FairseqDataclass):
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
    mask_schedule: ChoiceEnum(["curriculum", "constant"]) = field(default="curriculum", metadata={
        "help": "masking rate: curriculum (ALUM: --mask-start-rate -> --mask-end-rate in --mask-num-phases "
                "equal phases of --mask-curriculum-updates) or constant (--mask-constant-rate)"})
    mask_start_rate: float = field(default=0.05, metadata={"help": "curriculum: rate of the first phase"})
    mask_end_rate: float = field(default=0.25, metadata={"help": "curriculum: rate of the last phase"})
    mask_num_phases: int = field(default=5, metadata={"help": "curriculum: number of equal phases"})
    mask_constant_rate: float = field(default=0.15, metadata={"help": "constant schedule: the rate (BERT 0.15)"})
    mask_curriculum_updates: int = field(default=0, metadata={
        "help": "updates over which the curriculum runs (progress = update / this); 0 = --max-update. "
                "Set it explicitly when a run is resumed with a larger --max-update"})
    valid_mask_rate: float = field(default=0.15, metadata={
        "help": "masking rate for validation (fixed, with fixed masks, so valid losses compare across updates)"})
    mask_replace_prob: float = field(default=0.8, metadata={
        "help": "fraction of selected tokens replaced by [MASK] (BERT 80/10/10)"})
    mask_random_prob: float = field(default=0.1, metadata={
        "help": "fraction of selected tokens replaced by a random non-special token"})
    mask_whole_words: bool = field(default=False, metadata={
        "help": "select whole words (word-piece continuation rules of the data-bin's tokenizer)"})
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
        self.random_pool = self.tables.random_pool + off
        self.masking = MaskingConfig(
            schedule=cfg.mask_schedule, start_rate=cfg.mask_start_rate, end_rate=cfg.mask_end_rate,
            num_phases=cfg.mask_num_phases, constant_rate=cfg.mask_constant_rate,
            mask_prob=cfg.mask_replace_prob, random_prob=cfg.mask_random_prob, whole_word=cfg.mask_whole_words)
        self.continuation = None
        if cfg.mask_whole_words:
            if self.tables.kind == "none":
                raise ValueError(f"--mask-whole-words: cannot tell word-continuation pieces of the tokenizer in "
                                 f"{root}/tokenizer; drop --mask-whole-words")
            cont = torch.zeros(len(dictionary), dtype=torch.bool)  # (len(dict),) True = continues a word
            cont[off:off + self.tables.vocab_size] = self.tables.continuation
            self.continuation = cont
        if not 0.0 <= cfg.valid_mask_rate <= 1.0:
            raise ValueError(f"--valid-mask-rate {cfg.valid_mask_rate}: must be in [0, 1]")
        if cfg.mask_curriculum_updates < 0:
            raise ValueError(f"--mask-curriculum-updates {cfg.mask_curriculum_updates}: must be >= 0")
        if cfg.mask_schedule == "curriculum":
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
        total = self.cfg.mask_curriculum_updates or (self.cfg.max_update or 0)
        if total <= 0 and self.cfg.mask_schedule == "curriculum":
            raise ValueError("--mask-schedule curriculum needs the training length: set --mask-curriculum-updates "
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
            base = data_utils.load_indexed_dataset(prefix, self.source_dictionary, combine=False)
            if base is None:
                raise missing
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
        if self.cfg.sample_mode == "pairs":
            if not hasattr(model, "register_classification_head"):
                raise ValueError(f"--sample-mode pairs needs a model with classification heads (RoBERTa); "
                                 f"{type(model).__name__} has none")
            if NSP_HEAD not in getattr(model, "classification_heads", {}):
                model.register_classification_head(NSP_HEAD, num_classes=2)
        return model

    # ---------------------------------------------------------------- masking

    def _device_tables(self, device: torch.device) -> dict:
        """The special-id list, continuation flags and random pool on ``device`` (copied once per device)."""
        cache = self.__dict__.setdefault("_tables_on", {})
        if device not in cache:
            cache[device] = {
                "special_ids": self.special_ids.to(device),
                "continuation": self.continuation.to(device) if self.continuation is not None else None,
                "random_pool": self.random_pool.to(device),
            }
        return cache[device]

    def mask_sample(self, sample: dict, rate: float, step: int, stream: int) -> dict:
        """Mask ``sample`` in place of its ``src_tokens``; adds ``target`` (pad off the masked positions)."""
        if not sample or "net_input" not in sample:
            return sample
        src = sample["net_input"]["src_tokens"]  # (B, T) unmasked
        pad = self.source_dictionary.pad()
        # Masking runs where the batch lives (fairseq has already moved it to the GPU): no device->host copy
        # of the tokens, and every op is integer arithmetic, so CPU and GPU give the same masks.
        tables = self._device_tables(src.device)
        special = torch.isin(src, tables["special_ids"])  # (B, T) True = never mask (specials + padding)
        cont = tables["continuation"][src] if self.continuation is not None else None  # (B, T)
        # Per-sample randomness keyed by (seed, update, sample id), vectorised over the batch: masks do not
        # depend on batch composition, world size or accumulation, so resume reproduces them exactly.
        masked_t, labels_t = mask_batch(
            src, rate, mask_id=self.mask_idx, special_mask=special, random_pool=tables["random_pool"],
            seed=int(self.cfg.seed), step=int(step), sample_ids=sample["id"].to(src.device), stream=stream,
            continuation=cont, mask_prob=self.masking.mask_prob, random_prob=self.masking.random_prob)  # (B, T)
        target = torch.where(labels_t == IGNORE_INDEX, torch.full_like(labels_t, pad), labels_t)
        out = dict(sample)
        out["net_input"] = dict(sample["net_input"])
        out["net_input"]["src_tokens"] = masked_t
        out["target"] = target  # fairseq convention: pad = not predicted
        out["mask_rate"] = float(rate)
        out["n_maskable"] = (~special).sum()  # a device tensor: no host sync in the task
        out["update_num"] = int(step)
        return out

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        rate = self.train_mask_rate(update_num)
        sample = self.mask_sample(sample, rate, update_num, STREAM_MASK)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def valid_step(self, sample, model, criterion):
        sample = self.mask_sample(sample, self.cfg.valid_mask_rate, 0, STREAM_VALID_MASK)
        return super().valid_step(sample, model, criterion)

    # ---------------------------------------------------------------- misc

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
