"""Resume rules a user can follow: after a NaN stop the message names a command that resumes with a lower
learning rate, and that command works; the override is recorded in log.jsonl and the model card, and the
resumed steps use the new rate.  Without ``--train.resume_override`` a changed rate is still refused."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from engine_helpers import make_stdlib_databin, read_log, run_train, train_args

pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


@pytest.fixture(scope="module")
def databin(tmp_path_factory):
    return make_stdlib_databin(tmp_path_factory.mktemp("resume-rules") / "data-bin")


def _main(args, capsys):
    from alum_pretrain.train import main

    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def _printed_command(err: str) -> list[str]:
    m = re.search(r"resume it from step-\d+ with a lower learning rate .*?: (alum-train [^()]*?) \(with fp16", err)
    assert m, err[-2000:]
    cmd = shlex.split(m.group(1))
    assert cmd[0] == "alum-train" and "--train.resume_override=optim.lr" in cmd
    return cmd


def test_the_nan_stop_names_a_command_that_resumes_with_a_lower_lr(databin, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = _main(train_args(databin, out, 12, "--optim.lr=1e3", "--optim.warmup_ratio=0", "--train.save_every=1",
                               "--train.eval_every=0", "--train.keep_last=50"), capsys)
    assert rc == 3, err[-2000:]
    cmd = _printed_command(err)
    assert "--optim.lr=100" in cmd
    first_bad = min(r["step"] for r in read_log(out) if r["nonfinite_skipped"])
    start = int(next(a for a in cmd if a.startswith("--train.resume_from=")).split("=")[1])
    assert start <= first_bad - 2  # the newest checkpoint written before the divergence began
    # the same change without the override is refused, and says which key
    rc2, err2 = _main([a for a in cmd[1:] if not a.startswith("--train.resume_override")], capsys)
    assert rc2 == 2 and "--optim.lr was 1000.0" in err2
    # Run exactly the printed command; lr 1e3 wrecks the weights within a step, so the first lower rate
    # (100) may diverge again: its stop prints the next command (10), which finishes the run.
    lrs = []
    for _ in range(4):
        lrs.append(float(next(a for a in cmd if a.startswith("--optim.lr=")).split("=")[1]))
        rc, err = _main(cmd[1:], capsys)
        assert rc in (0, 3), err[-2000:]
        assert "resume override at step" in err
        if rc == 0:
            break
        cmd = _printed_command(err)
    assert rc == 0 and lrs == sorted(lrs, reverse=True)
    start = int(next(a for a in cmd if a.startswith("--train.resume_from=")).split("=")[1])
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    ev = [r for r in recs if r.get("kind") == "resume_override"]
    assert ev[-1]["key"] == "optim.lr" and ev[-1]["now"] == lrs[-1] and ev[-1]["step"] == start
    assert [r["step"] for r in read_log(out)] == list(range(1, 13))  # every step logged once
    resumed = [r for r in read_log(out) if r["step"] > start]
    assert resumed and all(r["loss"] is not None and r["nonfinite_skipped"] == 0 for r in resumed), resumed
    assert sorted(p.name for p in (out / "checkpoints").glob("abandoned-step-*"))  # kept, never resumed from
    assert json.loads((out / "COMPLETED").read_text())["step"] == 12
    from alum_pretrain.export import export

    export(out, tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "Changed on resume" in card and "`optim.lr`" in card


def test_a_resumed_lr_scales_the_schedule(databin, tmp_path, capsys):
    from alum_pretrain.engine.optim import lr_factor

    out = tmp_path / "run"
    assert _main(train_args(databin, out, 6, "--optim.warmup_ratio=0", "--train.save_every=3",
                            "--train.eval_every=0"), capsys)[0] == 0
    rc, err = _main(train_args(databin, out, 6, "--optim.warmup_ratio=0", "--train.eval_every=0",
                               "--optim.lr=5e-4", "--train.resume_override=optim.lr", "--train.resume_from=3"), capsys)
    assert rc == 0, err[-2000:]
    recs = read_log(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    for r in recs:
        peak = 1e-3 if r["step"] <= 3 else 5e-4
        assert r["lr"] == pytest.approx(peak * lr_factor(r["step"] - 1, 6, 0)), r


def test_an_override_of_a_key_that_is_not_allowed_is_refused(databin, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _main(train_args(databin, tmp_path / "run", 1, "--train.resume_override=model.preset"), capsys)
    assert e.value.code == 2 and "model.preset cannot be overridden on resume" in capsys.readouterr().err
