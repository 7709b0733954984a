"""Render the SLURM batch script of a run (``launch/templates/job.sbatch``) and submit it with ``sbatch``.

What the script does (one task per node, ``--ntasks-per-node=1``)::

    HEAD_NODE = first host of `scontrol show hostnames $SLURM_JOB_NODELIST`
    native : srun torchrun --nnodes $SLURM_NNODES --nproc_per_node G --rdzv_backend c10d
                  --rdzv_endpoint $HEAD_NODE:$PORT --rdzv_id $SLURM_JOB_ID -m alum_pretrain.train --config RESOLVED
             (torchrun gives every worker RANK = node_rank * G + local_rank, WORLD_SIZE = nodes * G)
    fairseq: srun fairseq-train DATA ... --distributed-world-size nodes*G --distributed-port $PORT
             (fairseq's own SLURM inference: with SLURM_NTASKS_PER_NODE=1 it spawns one process per visible
             GPU, rank = SLURM_NODEID * G + local index, init tcp://HEAD_NODE:PORT)

Preemption / time limit: ``#SBATCH --signal=B:USR1@180`` signals the batch shell; its trap forwards USR1 to
the step (srun relays it to every process of the step on every node) and waits for the step to end.
alum-train's workers finish the step, save a checkpoint and exit 0 while torchrun ignores the signal
(``trap '' USR1`` before ``exec``) and exits 0 once its workers have.  fairseq-train does the same through the
plugin (``alum_pretrain/fairseq_ext/preemption.py``): after the current update every rank saves
``checkpoint_last.pt`` at that update and fairseq-train exits 0, after writing ``$ALUM_FAIRSEQ_STOP_FILE``
(``OUTPUT/slurm/stopped-on-signal.json``, removed by the script before the step) so that the script can tell
this exit 0 from the one at ``--max-update``.  The shell then runs ``scontrol requeue $SLURM_JOB_ID`` unless
the run is complete (native: ``OUTPUT/COMPLETED`` exists, written by alum-train; fairseq: the script writes
``OUTPUT/COMPLETED`` when fairseq-train exits 0 without the stop file, i.e. at ``--max-update``) or
``$SLURM_RESTART_COUNT`` reached ``--max-requeues``; the requeued job (same id, same name, same output
folder) resumes from the newest checkpoint (fairseq: ``checkpoint_last.pt``, no update lost).
"""

from __future__ import annotations

import datetime as _dt
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources as importlib_resources
from pathlib import Path

from .spec import Resources, shell_join

_PLACEHOLDER = re.compile(r"@@([A-Z_]+)@@")


@dataclass
class Job:
    """Everything the template needs besides the resources."""

    name: str
    engine: str  # native | fairseq
    output_dir: Path
    engine_argv: list[str]  # after `torchrun ...` (native: -m alum_pretrain.train --config X) / fairseq-train args
    port: int | None = None  # None = 20000 + job id % 20000
    prologue: tuple[str, ...] = ()  # shell lines run before the step (module load, source venv/bin/activate)
    env: tuple[tuple[str, str], ...] = ()  # extra `export KEY=VALUE`
    header: str = ""

    @property
    def slurm_dir(self) -> Path:
        return self.output_dir / "slurm"

    @property
    def script_path(self) -> Path:
        return self.slurm_dir / f"{self.name}.sbatch"

    @property
    def log_pattern(self) -> Path:
        """SLURM's --output: %x = job name, %j = job id (a requeued job keeps its id, so one log per submission)."""
        return self.slurm_dir / "%x-%j.log"

    def log_path(self, job_id: str) -> Path:
        return self.slurm_dir / f"{self.name}-{job_id}.log"


def env_pairs(items: list[str]) -> list[tuple[str, str]]:
    """``--env KEY=VALUE`` items as (KEY, VALUE) pairs for ``Job.env`` (ValueError naming a malformed one)."""
    pairs = []
    for kv in items:
        key, sep, value = kv.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--env {kv!r}: use KEY=VALUE")
        pairs.append((key, value))
    return pairs


def sbatch_resource_lines(res: Resources) -> list[str]:
    """The ``#SBATCH`` lines for GPUs, CPUs, memory, time and placement (shared with the benchmark array)."""
    lines = []
    if res.gpus_per_node > 0:
        # --gres works on every SLURM with GPUs configured as gres (cons_res and cons_tres alike).
        lines.append(f"#SBATCH --gres=gpu:{res.gpus_per_node}")
    for flag, value in (("cpus-per-task", res.cpus_per_task), ("mem", res.mem), ("time", res.time),
                        ("partition", res.partition), ("account", res.account), ("qos", res.qos),
                        ("constraint", res.constraint)):
        if value is not None:
            lines.append(f"#SBATCH --{flag}={value}")
    if res.exclusive:
        lines.append("#SBATCH --exclusive")
    return lines


def _environment(res: Resources, job: Job) -> list[str]:
    out = []
    if res.gpus_per_node > 0:
        out += [
            "# NCCL on DGX-2 nodes (16 V100 on NVSwitch inside a node; InfiniBand between nodes). Adjust per site:",
            'export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"   # INFO: print the transports and rings/trees NCCL picked',
            "# export NCCL_IB_DISABLE=0                # keep InfiniBand on (1 = TCP sockets only: much slower)",
            "# export NCCL_IB_HCA=mlx5                 # use only these HCAs (default: all that are up)",
            "# export NCCL_SOCKET_IFNAME=ib0           # interface for NCCL's bootstrap/socket traffic (or ^lo,docker0)",
            "# A failed or hung rank aborts the job (then requeue/resubmit) instead of blocking all GPUs:",
            'export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"',
        ]
    else:
        out += ["# CPU run: gloo over TCP (set GLOO_SOCKET_IFNAME when the nodes have several interfaces)."]
    if res.cpus_per_task:
        threads = max(1, res.cpus_per_task // res.procs_per_node)
        out.append(f'export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-{threads}}}"   # CPUs per task / processes per node')
    if job.engine == "fairseq":
        out += ["# The fairseq plugin writes this file when a stop signal made fairseq-train save and exit 0",
                "# (resume, not complete); a stale one from an earlier run must not count.",
                'export ALUM_FAIRSEQ_STOP_FILE="$OUTPUT_DIR/slurm/stopped-on-signal.json"',
                'rm -f "$ALUM_FAIRSEQ_STOP_FILE"']
    for k, v in job.env:
        out.append(f"export {k}={shlex.quote(v)}")
    out += _node_setup(job)
    return out


def _node_setup(job: Job) -> list[str]:
    """``alum_node_setup``: what every node's step task does before exec'ing the launcher (an exported
    shell function; srun passes the environment, functions included, to the tasks)."""
    node_log = shlex.quote(str(job.slurm_dir)) + f'/{job.name}-"$SLURM_JOB_ID"-node"$SLURM_NODEID".log'
    return [
        "# Run by every node's step task before the launcher starts (srun passes exported functions on):",
        "# * GLOO_SOCKET_IFNAME: the gloo control group (stop flag, counts; all traffic of a CPU run) binds to",
        "#   the interface holding this node's address towards the head node, not to whatever the hostname",
        "#   resolves to (127.0.1.1 on many images: a cross-node hang).  Export it yourself to override.",
        "# * a per-node log: this node's output also goes to slurm/NAME-JOBID-nodeN.log (tee inherits the",
        "#   ignored stop signal, so it outlives the save-and-exit of the workers).",
        "alum_node_setup() {",
        '  if [ -z "${GLOO_SOCKET_IFNAME:-}" ] && command -v ip >/dev/null 2>&1; then',
        "    local head_ip dev",
        "    head_ip=$(getent ahostsv4 \"$HEAD_NODE\" | awk 'NR == 1 {print $1}')",
        "    dev=$(ip -o -4 route get \"$head_ip\" 2>/dev/null | sed -n 's/.* dev \\([^ ]*\\).*/\\1/p')",
        '    if [ -z "$dev" ] || [ "$dev" = lo ]; then  # on the head node: the interface that holds its address',
        "      dev=$(ip -o -4 addr show 2>/dev/null | awk -v a=\"$head_ip\" 'index($4, a \"/\") == 1 {print $2; exit}')",
        "    fi",
        '    if [ -n "$dev" ] && [ "$dev" != lo ]; then export GLOO_SOCKET_IFNAME="$dev"; fi',
        "  fi",
        f"  exec > >(tee -a {node_log}) 2>&1",
        '  echo "[alum-launch] node ${SLURM_NODEID} ($(hostname)): GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-unset}"',
        "}",
        "export -f alum_node_setup",
        "export HEAD_NODE",
    ]


def _command(res: Resources, job: Job) -> str:
    """The step command, one flag group per continuation line (variables expand in the batch shell)."""
    if job.engine == "native":
        head = [
            f'torchrun --nnodes "$SLURM_NNODES" --nproc_per_node {res.procs_per_node}',
            '--rdzv_backend c10d --rdzv_endpoint "$HEAD_NODE:$PORT" --rdzv_id "$SLURM_JOB_ID" --max_restarts 0',
            shell_join(job.engine_argv),
        ]
    else:
        args = list(job.engine_argv)
        head = ["fairseq-train " + shell_join(args[:1]), *_flag_lines(args[1:])]
        if res.gpus_per_node > 0:
            head.append(f'--distributed-world-size {res.world_size} --distributed-port "$PORT"')
    return " \\\n    ".join(["  " + head[0].strip(), *head[1:]])


def _flag_lines(argv: list[str], per_line: int = 4) -> list[str]:
    """Group ``--flag value...`` runs, ``per_line`` flags per line, for a readable script."""
    groups: list[list[str]] = []
    for a in argv:
        if a.startswith("--") or not groups:
            groups.append([a])
        else:
            groups[-1].append(a)
    return [" ".join(shell_join(g) for g in groups[i:i + per_line]) for i in range(0, len(groups), per_line)]


def _on_signal(res: Resources, job: Job) -> str:
    """The batch shell's handler for the stop signal: pass SIGUSR1 on to the step, whose trainer saves and exits."""
    sig = res.signal_name
    if job.engine == "native":
        trainer, saves, how = "alum-train", "a checkpoint", (
            "alum-train's workers finish the\n"
            "  # current step, save and exit 0; torchrun ignores it and exits 0 after its workers.")
    else:
        trainer, saves, how = "fairseq-train", "checkpoint_last.pt", (
            "the plugin's handler makes every\n"
            "  # rank stop after the current update, save and exit 0 (fairseq-train's launcher shell ignores it).")
    return f"""on_stop_signal() {{
  [ -n "$STOPPING" ] && return 0
  STOPPING={sig}
  log "got SIG{sig}: asking {trainer} to save {saves} and exit (SIGUSR1 to every process of the step)"
  # srun relays the signal to every process of the step on every node; {how}
  kill -USR1 "$STEP_PID" 2>/dev/null || log "could not signal the step (already finished?)"
}}"""


def _on_exit(job: Job) -> str:
    if job.engine == "native":
        return """if [ -e "$OUTPUT_DIR/COMPLETED" ]; then log "run completed: $OUTPUT_DIR/COMPLETED"; exit 0; fi
if [ -n "$STOPPING" ]; then
  [ "$STEP_RC" -eq 0 ] || log "the step did not exit cleanly after the signal; the run resumes from its newest complete checkpoint"
  requeue_or_stop; exit $?
fi
exit "$STEP_RC\""""
    return """if [ "$STEP_RC" -eq 0 ] && [ ! -e "$ALUM_FAIRSEQ_STOP_FILE" ]; then
  # fairseq-train exited 0 without stopping on a signal: it reached --max-update (or its own early-stop
  # conditions): mark the run complete, atomically.
  echo "{\\"engine\\": \\"fairseq\\", \\"job_id\\": \\"$SLURM_JOB_ID\\"}" > "$OUTPUT_DIR/COMPLETED.tmp" && mv "$OUTPUT_DIR/COMPLETED.tmp" "$OUTPUT_DIR/COMPLETED"
  log "run completed: $OUTPUT_DIR/COMPLETED"; exit 0
fi
if [ -n "$STOPPING" ] || [ -e "$ALUM_FAIRSEQ_STOP_FILE" ]; then
  if [ -e "$ALUM_FAIRSEQ_STOP_FILE" ]; then log "fairseq-train saved and stopped: $(cat "$ALUM_FAIRSEQ_STOP_FILE")"
  else log "the step did not exit cleanly after the signal; the run resumes from checkpoint_last.pt"; fi
  requeue_or_stop; exit $?
fi
exit "$STEP_RC\""""


def render(res: Resources, job: Job) -> str:
    """The complete batch script (text)."""
    template = (importlib_resources.files("launch") / "templates" / "job.sbatch").read_text(encoding="utf-8")
    ignore = " ".join(dict.fromkeys(["USR1", res.signal_name]))
    prologue = "\n".join(["# ---- prologue (--prologue) ----", *job.prologue]) + "\n" if job.prologue else ""
    values = {
        "HEADER": job.header or f"Generated by alum-launch on {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "JOB_NAME": job.name,
        "SCRIPT": shlex.quote(str(job.script_path)),
        "NODES": str(res.nodes),
        "SBATCH_RESOURCES": "\n".join(sbatch_resource_lines(res)),
        "LOG": str(job.log_pattern),
        "SIGNAL": res.signal,
        "SIGNAL_NAME": res.signal_name,
        "SIGNAL_SECONDS": str(res.signal_seconds),
        "STEP_IGNORE": ignore,
        "OUTPUT_DIR": shlex.quote(str(job.output_dir)),
        "MAX_REQUEUES": str(res.max_requeues),
        "PROLOGUE": prologue,
        "PORT": str(job.port) if job.port else "$((20000 + SLURM_JOB_ID % 20000))",
        "ENVIRONMENT": "\n".join(_environment(res, job)),
        "PROCS_PER_NODE": str(res.procs_per_node),
        # the sbatch value when given; else every CPU SLURM gave this job on the node
        "STEP_CPUS": str(res.cpus_per_task) if res.cpus_per_task else '"${SLURM_CPUS_ON_NODE:-1}"',
        "ON_SIGNAL": _on_signal(res, job),
        "COMMAND": _command(res, job),
        "ON_EXIT": _on_exit(job),
    }
    text = _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
    # (an empty resource block would leave a blank line between #SBATCH lines: harmless, but tidy it)
    text = re.sub(r"\n\n(#SBATCH)", r"\n\1", text)
    assert "@@" not in text, "unfilled template placeholder"
    return text


def write_script(res: Resources, job: Job) -> Path:
    """Write the script atomically to ``OUTPUT/slurm/NAME.sbatch`` (executable)."""
    job.slurm_dir.mkdir(parents=True, exist_ok=True)
    path = job.script_path
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(res, job), encoding="utf-8")
    tmp.chmod(0o755)
    tmp.replace(path)
    return path


#: The longest wait for ``sbatch`` to accept a script.
SBATCH_TIMEOUT_S = 120


def submit(script: Path, sbatch: str = "sbatch") -> str:
    """``sbatch --parsable SCRIPT`` -> the job id (ValueError with sbatch's message when it refuses)."""
    exe = shutil.which(sbatch)
    if exe is None:
        raise ValueError(f"{sbatch}: not found on PATH; run alum-launch on a SLURM login node, or use --dry-run "
                         f"and submit {script} yourself")
    try:  # sbatch answers in seconds; a controller that does not answer is an error, not a hang
        proc = subprocess.run([exe, "--parsable", str(script)], capture_output=True, text=True,
                              timeout=SBATCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ValueError(f"sbatch {script}: no answer in {SBATCH_TIMEOUT_S} s (is slurmctld up? `scontrol ping`); "
                         "nothing was submitted, or check `squeue --me` before submitting again") from None
    if proc.returncode != 0:
        raise ValueError(f"sbatch {script} failed (status {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


__all__ = ["Job", "render", "sbatch_resource_lines", "write_script", "submit"]
