"""What a launch is made of: the run config (resolved), the cluster resources, the batch split, the command.

``alum-launch`` turns *one* run config (the YAML ``alum-train --config`` reads) plus an optional paper
preset into a complete job: the per-process micro-batch and gradient accumulation for the GPU count,
the resolved config written beside the job script, and the engine command (``torchrun ... alum_pretrain.train``
or ``fairseq-train ...``).  The SLURM script itself is rendered by :mod:`launch.slurm`.

Precedence (lowest first): preset ``config:`` < ``--config run.yaml`` < engine overrides after ``--``
(native) < the launcher's own flags (``--output-dir``, the batch split, the device).  Resources:
built-in defaults < preset ``resources:`` < command-line flags.

Only the launcher knows about SLURM; the engine reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK.
"""

from __future__ import annotations

import copy
import re
import shlex
import tempfile
from dataclasses import dataclass, field
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any

import yaml

PRESET_KEYS = ("description", "engine", "requires", "resources", "config")
RESOURCE_KEYS = ("nodes", "gpus_per_node", "cpus_per_task", "mem", "time", "partition", "account", "qos",
                 "constraint", "exclusive", "max_micro_batch", "max_requeues", "signal")
ENGINES = ("native", "fairseq", "deepspeed")  # deepspeed = native with train.engine=deepspeed
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$")
_SIGNAL = re.compile(r"^(?:SIG)?(USR1|USR2)@(\d+)$")
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


# ---------------------------------------------------------------------------------------------------------
# Batch split
# ---------------------------------------------------------------------------------------------------------
def split_batch(global_batch: int, world_size: int, max_micro_batch: int) -> tuple[int, int]:
    """``(micro_batch, grad_accum)`` with ``micro_batch * grad_accum * world_size == global_batch``.

    The largest micro-batch that fits (``<= max_micro_batch``) is taken, i.e. the fewest accumulation
    steps: per-process batch ``global / world`` must be an integer, then ``grad_accum`` is the smallest
    divisor of it with ``per_process / grad_accum <= max_micro_batch``.
    Example: the paper's batch 256 on 1 DGX-2 (16 GPUs) with at most 16 per GPU -> (16, 1); on 2 DGX-2
    with at most 4 per GPU (RoBERTa-large) -> (4, 2).
    """
    for name, v in (("global batch", global_batch), ("world size", world_size), ("max micro-batch", max_micro_batch)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if global_batch % world_size:
        raise ValueError(
            f"global batch {global_batch} does not divide over {world_size} processes (nodes x GPUs per node); "
            f"change --train.global_batch_size, --nodes or --gpus-per-node so that it divides")
    per_process = global_batch // world_size
    for accum in range(1, per_process + 1):
        if per_process % accum == 0 and per_process // accum <= max_micro_batch:
            return per_process // accum, accum
    raise AssertionError("unreachable: accum == per_process gives micro-batch 1")


# ---------------------------------------------------------------------------------------------------------
# Resources
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Resources:
    """The allocation: what goes into the ``#SBATCH`` lines (and the process count of the run)."""

    nodes: int = 1
    gpus_per_node: int = 16  # DGX-2: 16 V100 32 GB; 0 = CPU run (one gloo process per node)
    cpus_per_task: int | None = None  # one task per node, so: CPUs per node for torchrun + its workers
    mem: str | None = None  # e.g. "0" (all of the node's memory), "1400G"
    time: str | None = None  # e.g. "48:00:00" or "2-00:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    max_micro_batch: int | None = None  # sequences per GPU per micro-batch that fit in memory
    max_requeues: int = 3
    signal: str = "USR1@180"  # SIG@SECONDS: SLURM signals the batch shell SECONDS before the time limit

    def __post_init__(self) -> None:
        def bad(flag: str, why: str) -> ValueError:
            return ValueError(f"--{flag.replace('_', '-')}={getattr(self, flag)!r}: {why}")

        for k in ("nodes", "gpus_per_node", "max_requeues"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if k == "nodes" else 0):
                raise bad(k, f"must be an integer >= {1 if k == 'nodes' else 0}")
        for k in ("cpus_per_task", "max_micro_batch"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise bad(k, "must be an integer >= 1")
        if self.time is not None and not _TIME.match(str(self.time)):
            raise bad("time", "use SLURM's format: MINUTES, HH:MM:SS or D-HH:MM:SS")
        if self.mem is not None and not re.match(r"^\d+[KMGT]?$", str(self.mem)):
            raise bad("mem", "use SLURM's format: a number with an optional K/M/G/T suffix (0 = all of the node)")
        if not _SIGNAL.match(self.signal):
            raise bad("signal", "use USR1@SECONDS or USR2@SECONDS, e.g. USR1@180 (SLURM sends the signal to the "
                                "batch shell SECONDS before the time limit)")
        for k in ("partition", "account", "qos", "constraint", "mem", "time"):
            v = getattr(self, k)
            if v is not None:
                setattr(self, k, str(v))
                if any(c.isspace() for c in str(v)) or "'" in str(v) or '"' in str(v):
                    raise bad(k, "must not contain spaces or quotes")

    @property
    def procs_per_node(self) -> int:
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def signal_name(self) -> str:
        return _SIGNAL.match(self.signal).group(1)  # type: ignore[union-attr]

    @property
    def signal_seconds(self) -> int:
        return int(_SIGNAL.match(self.signal).group(2))  # type: ignore[union-attr]


def resources_from(preset: dict | None, overrides: dict[str, Any]) -> Resources:
    """Defaults < preset ``resources:`` < ``overrides`` (the command-line flags that were given)."""
    data: dict[str, Any] = dict((preset or {}).get("resources") or {})
    unknown = [k for k in data if k not in RESOURCE_KEYS]
    if unknown:
        raise ValueError(f"preset resources: unknown key {unknown[0]!r} (valid: {', '.join(RESOURCE_KEYS)})")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return Resources(**data)


# ---------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------
def preset_names() -> list[str]:
    folder = importlib_resources.files("launch") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict:
    """A preset by name (``launch/presets/NAME.yaml``) or by path to a YAML file of the same layout."""
    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        res = importlib_resources.files("launch") / "presets" / f"{name}.yaml"
        if not res.is_file():
            raise ValueError(f"--preset {name}: unknown preset; choose one of {', '.join(preset_names())} "
                             "or give a path to a preset YAML file")
        text, where = res.read_text(encoding="utf-8"), f"preset {name}"
    else:
        text, where = path.read_text(encoding="utf-8"), str(path)
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: the top level must be a mapping with keys {', '.join(PRESET_KEYS)}")
    unknown = [k for k in data if k not in PRESET_KEYS]
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (valid: {', '.join(PRESET_KEYS)})")
    if data.get("engine", "native") not in ENGINES:
        raise ValueError(f"{where}: engine must be one of {ENGINES}, got {data.get('engine')!r}")
    return data


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# ---------------------------------------------------------------------------------------------------------
# The run config, resolved for a world size
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Resolved:
    """The run config made concrete for this launch (``cfg`` is an ``alum-train`` TrainConfig)."""

    cfg: Any
    output_dir: Path
    micro_batch: int
    grad_accum: int
    global_batch: int
    notes: list[str] = field(default_factory=list)


def _get_dotted(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _load_run_yaml(path: str | None) -> dict:
    if not path:
        return {}
    from alum_pretrain.config import load_yaml

    return load_yaml(path)


def resolve_run(config_path: str | None, preset: dict | None, res: Resources, *, output_dir: str | None,
                engine_overrides: list[str] | None = None, device: str | None = None,
                require_data: bool = True, job_name: str | None = None) -> Resolved:
    """Merge preset < run YAML < overrides, validate as an ``alum-train`` config, split the batch.

    ``engine_overrides`` are ``--section.key=value`` flags of alum-train (native engine only).
    ``require_data``: a missing ``data.path`` is an error (a warning in ``notes`` otherwise, for --dry-run).
    """
    from alum_pretrain.config import config_from_dict, config_to_dict, parse_config
    from alum_pretrain.engine.config import TrainConfig

    data = deep_merge((preset or {}).get("config") or {}, _load_run_yaml(config_path))
    source = f"--config {config_path}" if config_path else "config"
    cfg = config_from_dict(TrainConfig, data, _source=source)  # ValueError naming the key
    if engine_overrides:
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "merged.yaml"
            p.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
            try:
                cfg = parse_config(TrainConfig, ["--config", str(p), *engine_overrides], prog="alum-launch (engine args)")
            except SystemExit as exc:  # argparse already printed the reason
                raise ValueError(f"engine arguments after '--' are not valid alum-train flags: "
                                 f"{' '.join(engine_overrides)}") from exc
    if not cfg.data.path:
        raise ValueError(f"{source}: data.path is empty: set it to the data-bin written by alum-prep "
                         "(in the YAML or as --data.path=DIR after '--')")
    # Output folder: the flag wins, else train.output_dir of the config, else runs/JOB_NAME; always absolute
    # (shared FS) and never derived from the job id, so a requeued or re-submitted job finds its checkpoints.
    from alum_pretrain.engine.config import LoopConfig

    default_out = LoopConfig().output_dir
    if not output_dir and job_name and cfg.train.output_dir == default_out:
        output_dir = str(Path(default_out).parent / job_name)
    out = Path(output_dir or cfg.train.output_dir).expanduser().resolve()
    cfg.train.output_dir = str(out)
    cfg.data.path = str(Path(cfg.data.path).expanduser().resolve())
    notes = []
    if not Path(cfg.data.path).is_dir():
        msg = (f"data.path {cfg.data.path} is not a folder here: prepare it with alum-prep on a filesystem "
               "that the compute nodes share (the job reads it from there)")
        if require_data:
            raise ValueError(msg)
        notes.append("WARNING: " + msg)
    if cfg.model.init_from and Path(cfg.model.init_from).expanduser().exists():
        cfg.model.init_from = str(Path(cfg.model.init_from).expanduser().resolve())
    for key in (preset or {}).get("requires") or []:
        value = _get_dotted(config_to_dict(cfg), key)
        if value in (None, ""):
            raise ValueError(f"{source}: {key} is required by this preset; set it in the run YAML "
                             f"or as --{key}=VALUE after '--'")
    world = res.world_size
    tc = cfg.train
    if tc.global_batch_size > 0:
        max_micro = res.max_micro_batch or tc.batch_size
        micro, accum = split_batch(tc.global_batch_size, world, max_micro)
        global_batch = tc.global_batch_size
        notes.append(f"global batch {global_batch} = {micro} per process x {accum} accumulation x {world} processes")
    else:
        micro, accum = tc.batch_size, tc.grad_accum
        if res.max_micro_batch and micro > res.max_micro_batch:
            raise ValueError(f"--train.batch_size={micro} exceeds the preset's max_micro_batch {res.max_micro_batch}; "
                             "set --train.global_batch_size so the launcher can add gradient accumulation")
        global_batch = micro * accum * world
        notes.append(f"global batch {global_batch} = {micro} x {accum} x {world} processes "
                     "(no train.global_batch_size set: it grows with the process count)")
    preset_precision = _get_dotted((preset or {}).get("config") or {}, "train.precision")
    if preset_precision and preset_precision != tc.precision:
        # preset < --config merging can silently swap the preset's precision (a DGX-2 preset's fp16 for bf16)
        notes.append(f"WARNING: train.precision={tc.precision} overrides the preset's {preset_precision}"
                     + (" (V100 / DGX-2 GPUs have no bf16: alum-train refuses bf16 below compute capability 8.0 "
                        "at start-up; use fp16 there)" if tc.precision == "bf16" else ""))
    tc.batch_size, tc.grad_accum = micro, accum
    if device is not None:
        tc.device = device
    cfg = config_from_dict(TrainConfig, config_to_dict(cfg), _source=source)  # re-validate the edits
    return Resolved(cfg=cfg, output_dir=out, micro_batch=micro, grad_accum=accum, global_batch=global_batch,
                    notes=notes)


def write_config(cfg: Any, path: Path) -> Path:
    """The resolved run config (what the job runs) written atomically next to the job script."""
    from alum_pretrain.config import save_yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Engine commands
# ---------------------------------------------------------------------------------------------------------
def native_train_argv(config_file: Path) -> list[str]:
    """What each torchrun worker runs: the native engine with the resolved config (no SLURM inside)."""
    return ["-m", "alum_pretrain.train", "--config", str(config_file)]


# model.preset -> fairseq architecture flags (same sizes as alum_pretrain.models.PRESETS).
def _fairseq_arch(preset: str) -> list[str]:
    from alum_pretrain.families import preset_family
    from alum_pretrain.models import PRESETS

    fam = preset_family(preset)  # ValueError naming every preset when unknown
    if not fam.fairseq:
        raise ValueError(f"--model.preset={preset!r} builds {fam.name}; the fairseq engine trains fairseq's "
                         "RoBERTa architecture only (BERT size presets): use the native engine (--engine native)")
    if preset == "base":
        return ["--arch", "roberta_base"]
    if preset == "large":
        return ["--arch", "roberta_large"]
    if preset not in PRESETS:
        raise ValueError(f"--model.preset={preset!r}: unknown size preset; choose one of {sorted(PRESETS)}")
    s = PRESETS[preset]
    return ["--arch", "roberta_base", "--encoder-layers", str(s["num_hidden_layers"]),
            "--encoder-embed-dim", str(s["hidden_size"]), "--encoder-ffn-embed-dim", str(s["intermediate_size"]),
            "--encoder-attention-heads", str(s["num_attention_heads"])]


def fairseq_user_dir() -> str:
    import alum_pretrain

    return str(Path(alum_pretrain.__file__).resolve().parent / "fairseq_ext")


def fairseq_train_argv(cfg: Any, res: Resources) -> list[str]:
    """``fairseq-train`` flags for the same run (fairseq's own trainer; ``alum_masked_lm`` task/criterion).

    Mapping: data.* -> task flags; masking.* and alum.* -> ``--<section>-<field>`` for every field
    (:func:`alum_pretrain.knobs.to_argv`, the rule the plugin's options are generated with); optim.* -> Adam + polynomial
    decay (linear warm-up/decay as in the native engine), train.* -> --max-update/--batch-size/--update-freq,
    checkpoints in OUTPUT/checkpoints (fairseq resumes from checkpoint_last.pt there by itself).
    model.init_from must be a fairseq checkpoint (.pt): it is passed as --finetune-from-model, which fairseq
    uses only when OUTPUT/checkpoints/checkpoint_last.pt does not exist yet, so a requeued job resumes
    instead of restarting from the initial model.
    """
    from alum_pretrain import knobs

    d, m, a, o, t, mk = cfg.data, cfg.model, cfg.alum, cfg.optim, cfg.train, cfg.masking
    if d.mode == "pairs" and not d.nsp:
        raise ValueError("--data.nsp=false with --data.mode=pairs: the fairseq task's pairs mode always trains NSP; "
                         "use --data.mode=blocks (RoBERTa) or the native engine")
    if res.gpus_per_node == 0 and res.nodes > 1:
        raise ValueError("--engine fairseq with --gpus-per-node 0: fairseq runs one CPU process on one node only; "
                         "use --nodes 1 (or the native engine for multi-node CPU runs)")
    argv = [d.path, "--user-dir", fairseq_user_dir(), "--task", "alum_masked_lm", "--criterion", "alum_masked_lm"]
    argv += _fairseq_arch(m.preset)
    if m.init_from:
        if not m.init_from.endswith(".pt"):
            raise ValueError(f"--model.init_from={m.init_from!r}: the fairseq engine continues from a fairseq "
                             "checkpoint file (e.g. roberta.base/model.pt); HF folders are for the native engine")
        argv += ["--finetune-from-model", m.init_from]
    if m.dropout >= 0:
        argv += ["--dropout", str(m.dropout), "--attention-dropout", str(m.dropout)]
    argv += ["--sample-mode", d.mode, "--tokens-per-sample", str(d.max_seq_len)]
    argv += knobs.to_argv("masking", mk) + knobs.to_argv("alum", a)
    warmup = int(round(o.warmup_ratio * t.max_steps))
    argv += ["--optimizer", "adam", "--adam-betas", f"({o.betas[0]},{o.betas[1]})", "--adam-eps", str(o.eps),
             "--weight-decay", str(o.weight_decay), "--lr", str(o.lr), "--lr-scheduler", "polynomial_decay",
             "--warmup-updates", str(warmup), "--total-num-update", str(t.max_steps), "--clip-norm", str(o.grad_clip)]
    argv += ["--max-update", str(t.max_steps), "--batch-size", str(t.batch_size), "--update-freq", str(t.grad_accum),
             "--seed", str(t.seed), "--save-dir", str(Path(t.output_dir) / "checkpoints"),
             "--save-interval-updates", str(t.save_every), "--keep-interval-updates", str(t.keep_last),
             "--no-epoch-checkpoints", "--log-format", "simple", "--log-interval", str(t.log_every),
             "--skip-invalid-size-inputs-valid-test"]
    if t.eval_every:
        argv += ["--validate-interval-updates", str(t.eval_every)]
    argv += fairseq_precision_flags(t.precision, alum_on=a.alpha > 0, gpus=res.gpus_per_node)
    workers = t.num_workers if t.num_workers >= 0 else (2 if res.gpus_per_node > 0 else 0)  # -1 = auto
    if workers:
        argv += ["--num-workers", str(workers)]
    if res.gpus_per_node == 0:
        argv += ["--cpu"]
    return argv


def fairseq_precision_flags(precision: str, *, alum_on: bool, gpus: int) -> list[str]:
    """fairseq 0.12 flags for ``--train.precision`` (ValueError when fairseq cannot honour it).

    * ``fp16`` with ALUM: ``--amp`` (torch autocast, float32 weights and embeddings).  fairseq's ``--fp16``
      keeps the *weights* in fp16: the word embeddings (|e| ~ 0.05) then have a resolution of ~3e-5, above
      ALUM's eps = sigma = 1e-5, and the perturbation would be rounded away without an error.  Without
      ALUM, ``--fp16`` (fp16 weights with an fp32 master copy) is fairseq's usual fast path.
    * ``bf16``: refused.  In fairseq 0.12 ``--bf16`` selects the TPU/XLA code path and crashes at start on
      GPUs, and ``--amp`` autocasts to fp16 only.
    * CPU runs (``gpus == 0``): no flag (fairseq's 16-bit paths are CUDA-only).
    """
    if precision == "bf16":
        raise ValueError("--train.precision=bf16 with --engine fairseq: fairseq 0.12 cannot train in bf16 on GPUs "
                         "(its --bf16 is the TPU/XLA path and crashes at start; its --amp is fp16-only); use "
                         "--train.precision=fp16 (emitted as --amp) or the native engine, which runs bf16 autocast")
    if precision == "fp32" or gpus == 0:
        return []
    if precision != "fp16":
        raise ValueError(f"--train.precision={precision!r}: expected fp32, bf16 or fp16")
    return ["--amp"] if alum_on else ["--fp16"]


def shell_join(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def check_job_name(name: str) -> str:
    if not _JOB_NAME.match(name):
        raise ValueError(f"--job-name={name!r}: use letters, digits and _ . + - (it names the log and script files)")
    return name


__all__ = ["split_batch", "Resources", "resources_from", "preset_names", "load_preset", "deep_merge", "Resolved",
           "resolve_run", "write_config", "native_train_argv", "fairseq_train_argv", "fairseq_user_dir",
           "fairseq_precision_flags",
           "shell_join", "check_job_name", "ENGINES"]
