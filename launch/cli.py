"""``alum-launch``: one command -> a correct, restartable pre-training job on SLURM (or on this machine).

    alum-launch slurm --config run.yaml --preset bert-base-scratch [--nodes 1 --gpus-per-node 16 ...]
    alum-launch slurm --config run.yaml --nodes 2 --time 48:00:00 --partition gpu --dry-run
    alum-launch local --config run.yaml [--nproc-per-node N]          # torchrun --standalone here
    alum-launch presets                                                # the paper's runs
    alum-launch bench --suite S.yaml --checkpoints A B --out DIR       # alum-bench as a job array

``slurm`` writes OUTPUT/slurm/NAME.sbatch and the resolved run config OUTPUT/slurm/NAME.yaml (what every
worker reads), then submits the script with sbatch (not with --dry-run) and prints the job id and log.
Arguments after ``--`` go to the engine: alum-train ``--section.key=value`` overrides (folded into the
resolved config) or extra fairseq-train flags (appended).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import asdict, dataclass

from alum_pretrain.config import add_dataclass_arguments, dataclass_from_args, opt

from . import slurm as S
from .spec import (ENGINES, Resources, check_job_name, fairseq_train_argv, load_preset, native_train_argv,
                   preset_names, resolve_run, resources_from, shell_join, write_config)


@dataclass
class RunOptions:
    """The run: what ``slurm`` and ``local`` both take."""

    config: str | None = opt(None, "the run config (alum-train YAML: data/model/masking/alum/optim/train sections); "
                             "its values override the preset's", metavar="RUN.yaml")
    preset: str | None = opt(None, f"a paper run to start from: {', '.join(preset_names())} (or a path to a preset "
                             "YAML); `alum-launch presets` lists them", metavar="NAME")
    engine: str | None = opt(None, "native = alum-train under torchrun (default, or the preset's); fairseq = "
                             "fairseq-train with the alum_masked_lm task/criterion; deepspeed = the native job with "
                             "train.engine=deepspeed (ZeRO stage etc. as --deepspeed.* after '--' or in the config)",
                             choices=ENGINES)
    output_dir: str | None = opt(None, "run folder (default: train.output_dir of the config, else runs/JOB_NAME); "
                                 "checkpoints, logs and the job script live here, so a resubmitted job resumes",
                                 metavar="DIR")
    max_micro_batch: int | None = opt(None, "most sequences per GPU per micro-batch (default: the preset's, else "
                                      "train.batch_size); with train.global_batch_size set, the launcher picks "
                                      "micro-batch and gradient accumulation from it", metavar="N")
    dry_run: bool = opt(False, "write the files and print what would run; submit/run nothing")


@dataclass
class Allocation:
    """The SLURM allocation of ``slurm`` (each given flag overrides the preset's ``resources:``)."""

    nodes: int | None = opt(None, "number of nodes (DGX-2s); one srun task per node", metavar="N")
    gpus_per_node: int | None = opt(None, "GPUs per node (DGX-2: 16); 0 = a CPU run with one gloo process per node",
                                    metavar="G")
    cpus_per_task: int | None = opt(None, "CPUs for the node's task (torchrun + its workers)", metavar="C")
    mem: str | None = opt(None, "memory per node, SLURM format (e.g. 0 = all, 1400G)", metavar="M")
    time: str | None = opt(None, "time limit per job (HH:MM:SS or D-HH:MM:SS); longer runs requeue", metavar="T")
    partition: str | None = opt(None, "", metavar="P")
    account: str | None = opt(None, "", metavar="A")
    qos: str | None = opt(None, "", metavar="Q")
    constraint: str | None = opt(None, "node features, e.g. volta32gb", metavar="C")
    exclusive: bool | None = opt(None, "whole nodes only (--no-exclusive overrides a preset's)")


@dataclass
class JobOptions:
    """The SLURM job of ``slurm``: name, stop signal, requeues, the script's prologue and environment."""

    job_name: str | None = opt(None, "job name (default: the output folder's name); names the script and logs",
                               metavar="NAME")
    signal: str | None = opt(None, "stop signal (USR1 or USR2) SLURM sends the batch shell SECONDS before the time "
                             "limit (default USR1@180: three minutes to save a checkpoint); the script always "
                             "forwards USR1 to alum-train", metavar="SIG@SECONDS")
    max_requeues: int | None = opt(None, "requeue at most N times after a stop signal (default: the preset's, else "
                                   "3); the job resumes from its newest checkpoint", metavar="N")
    port: int | None = opt(None, "rendezvous port on the head node (default: 20000 + job id mod 20000)",
                           metavar="PORT")
    prologue: list[str] = opt([], "a shell line run before the step, e.g. 'source /shared/venv/bin/activate' or "
                              "'module load cuda' (repeatable)", metavar="CMD")
    env: list[str] = opt([], "export KEY=VALUE in the script, e.g. NCCL_SOCKET_IFNAME=ib0 (repeatable)",
                         metavar="KEY=VALUE")

    def __post_init__(self):
        S.env_pairs(self.env)  # fail early on a malformed --env


@dataclass
class LocalOptions:
    """What ``local`` adds to the run: processes and device on this machine."""

    nproc_per_node: int | None = opt(None, "processes (default: the GPU count, or 1 on CPU)", metavar="N")
    device: str = opt("auto", "auto = cuda when available (one process per GPU), else cpu (gloo)",
                      choices=("auto", "cpu", "cuda"))


def _split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alum-launch", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Arguments after `--` go to the engine (see each subcommand's --help).")
    sub = parser.add_subparsers(dest="command", required=True)

    ps = sub.add_parser("slurm", help="write (and sbatch) a SLURM job script for the run",
                        formatter_class=argparse.RawDescriptionHelpFormatter, description=S.__doc__)
    add_dataclass_arguments(ps, RunOptions)
    add_dataclass_arguments(ps.add_argument_group("allocation (default: the preset's, else 1 node x 16 GPUs)"),
                            Allocation)
    add_dataclass_arguments(ps.add_argument_group("job"), JobOptions)

    pl = sub.add_parser("local", help="run the same config on this machine (torchrun --standalone)")
    add_dataclass_arguments(pl, RunOptions)
    add_dataclass_arguments(pl, LocalOptions)

    sub.add_parser("presets", help="list the paper presets")
    from .bench_array import add_parser as add_bench_parser

    add_bench_parser(sub)
    return parser


def _resolve(run: RunOptions, extra: list[str], res: Resources, preset: dict | None, device: str,
             job_name: str | None = None):
    engine = run.engine or (preset or {}).get("engine", "native")
    overrides = extra if engine in ("native", "deepspeed") else []
    if engine == "deepspeed":
        # DeepSpeed runs inside alum-train: the same torchrun job (rendezvous, preemption, requeue) with
        # train.engine=deepspeed in the resolved config; ZeRO keys come from the config or after '--'.
        overrides = [*overrides, "--train.engine=deepspeed"]
    rr = resolve_run(run.config, preset, res, output_dir=run.output_dir, engine_overrides=overrides, device=device,
                     require_data=not run.dry_run, job_name=job_name)
    if engine == "deepspeed":
        engine = "native"
    if engine == "native" and rr.cfg.train.engine == "deepspeed":
        rr.notes.append(f"DeepSpeed ZeRO-{rr.cfg.deepspeed.zero_stage} (train.engine=deepspeed) inside alum-train "
                        "under torchrun")
    return engine, rr


def cmd_slurm(run: RunOptions, alloc: Allocation, opts: JobOptions, extra: list[str], argv: list[str]) -> int:
    preset = load_preset(run.preset) if run.preset else None
    flags = {**asdict(alloc), "max_requeues": opts.max_requeues, "signal": opts.signal,
             "max_micro_batch": run.max_micro_batch}
    res = resources_from(preset, flags)
    engine, rr = _resolve(run, extra, res, preset, device="cuda" if res.gpus_per_node > 0 else "cpu",
                          job_name=opts.job_name)
    name = check_job_name(opts.job_name or rr.output_dir.name)
    job = S.Job(name=name, engine=engine, output_dir=rr.output_dir, engine_argv=[], port=opts.port,
                prologue=tuple(opts.prologue), env=tuple(S.env_pairs(opts.env)),
                header="Generated by: alum-launch " + shell_join(argv))
    config_file = write_config(rr.cfg, job.slurm_dir / f"{name}.yaml")
    if engine == "native":
        job.engine_argv = native_train_argv(config_file)
    else:
        job.engine_argv = fairseq_train_argv(rr.cfg, res) + list(extra)
    script = S.write_script(res, job)
    print(f"alum-launch: {res.nodes} node(s) x {res.procs_per_node} process(es), engine {engine}", file=sys.stderr)
    for note in rr.notes:
        print(f"alum-launch: {note}", file=sys.stderr)
    print(f"alum-launch: wrote {script} and {config_file}", file=sys.stderr)
    if run.dry_run:
        print(script.read_text(encoding="utf-8"), end="")
        return 0
    job_id = S.submit(script)
    print(f"submitted job {job_id}: {name}")
    print(f"log: {job.log_path(job_id)}")
    print(f"watch: squeue -j {job_id}; tail -f {job.log_path(job_id)}")
    return 0


def cmd_local(run: RunOptions, local: LocalOptions, extra: list[str]) -> int:
    preset = load_preset(run.preset) if run.preset else None
    device = local.device
    if device != "cpu":
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        n_gpu = torch.cuda.device_count()
        if n_gpu == 0:
            raise ValueError("--device cuda: no CUDA device visible (use --device cpu)")
        nproc = local.nproc_per_node or n_gpu
    else:
        nproc = local.nproc_per_node or 1
    if nproc < 1:
        raise ValueError(f"--nproc-per-node={nproc}: must be >= 1")
    # The world size is what matters for the batch split: nproc processes on this one machine.
    res = Resources(nodes=1, gpus_per_node=nproc, max_micro_batch=run.max_micro_batch
                    or ((preset or {}).get("resources") or {}).get("max_micro_batch"))
    engine, rr = _resolve(run, extra, res, preset, device=device)
    if engine == "native":
        config_file = write_config(rr.cfg, rr.output_dir / "launch" / "local.yaml")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               *native_train_argv(config_file)]
    else:
        fres = Resources(nodes=1, gpus_per_node=nproc if device == "cuda" else 0)
        cmd = ["fairseq-train", *fairseq_train_argv(rr.cfg, fres), *extra]
        if device == "cuda":
            cmd += ["--distributed-world-size", str(nproc)]
    for note in rr.notes:
        print(f"alum-launch: {note}", file=sys.stderr)
    print("alum-launch: " + shell_join(cmd), file=sys.stderr)
    if run.dry_run:
        return 0
    rr.output_dir.mkdir(parents=True, exist_ok=True)
    return run_forwarding_stop_signals(cmd)


def run_forwarding_stop_signals(cmd: list[str]) -> int:
    """Run the training command in the foreground (as long as it trains: no time limit) and hand SIGTERM and
    SIGUSR1 on to it, so that stopping ``alum-launch local`` saves and stops the run instead of leaving it
    running without its launcher; returns its exit status.  Ctrl-C reaches the command from the terminal
    itself (one process group), so the launcher ignores SIGINT rather than deliver it twice (a second Ctrl-C
    stops alum-train without saving)."""
    import signal

    proc = subprocess.Popen(cmd)
    forward = lambda signum, _frame: proc.send_signal(signum)  # noqa: E731
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def cmd_presets() -> int:
    for name in preset_names():
        p = load_preset(name)
        r = p.get("resources") or {}
        print(f"{name}: {p.get('description', '').strip()}")
        print(f"    engine {p.get('engine', 'native')}, {r.get('nodes', 1)} node(s) x {r.get('gpus_per_node', 16)} GPUs, "
              f"time {r.get('time', '-')}, max micro-batch {r.get('max_micro_batch', '-')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, extra = _split_extra(argv)
    args = build_parser().parse_args(own)
    try:
        if args.command == "presets":
            return cmd_presets()
        if args.command == "bench":
            from .bench_array import BenchOptions, cmd_bench

            return cmd_bench(dataclass_from_args(BenchOptions, args), argv)
        run = dataclass_from_args(RunOptions, args)
        if args.command == "slurm":
            return cmd_slurm(run, dataclass_from_args(Allocation, args), dataclass_from_args(JobOptions, args),
                             extra, argv)
        return cmd_local(run, dataclass_from_args(LocalOptions, args), extra)
    except ValueError as exc:
        print(f"alum-launch: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
