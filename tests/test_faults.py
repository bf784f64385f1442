"""The training loop under faults and at its edges (tiny preset, CPU, in-process): clipping seen to
act, the checkpoint pointer at every moment of a checkpoint write, the run directory's lock,
damaged checkpoints, Ctrl-C, a garbled metrics.jsonl, contradictory flags and unbounded sizes."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import phaseguard as pg
import rundir
from test_phaseguard import SMALL, read_metrics, run_main, small_flags, train_small


@pytest.fixture(autouse=True)
def pytorch_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels have their own tests


# ---------------------------------------------------------------------------- clipping


def test_clipping_acts_as_clip_grad_norm_by_hand_before_the_step(tmp_path, monkeypatch):
    """With a threshold far below the gradient norm: the gradients AdamW steps with are
    torch.nn.utils.clip_grad_norm_ applied by hand to the accumulated gradients, and the logged
    grad_norm is their norm before clipping (computed here in float64)."""
    clip = 1e-3
    accumulated, stepped = [], []
    train_step = pg.train_step

    def capture_accumulated(model, *args, **kwargs):
        stats = train_step(model, *args, **kwargs)
        accumulated.append([p.grad.detach().clone() for p in model.parameters() if p.requires_grad])
        return stats

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, *args, **kwargs):
            stepped.append([p.grad.detach().clone() for group in self.param_groups for p in group["params"]])
            return super().step(*args, **kwargs)
    monkeypatch.setattr(pg, "train_step", capture_accumulated)
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    run = train_small(tmp_path / "r", method="kl", limit=12, grad_clip=clip)  # 3 steps
    metrics = read_metrics(run)
    assert len(accumulated) == len(stepped) == len(metrics) == 3
    for grads, seen, record in zip(accumulated, stepped, metrics):
        norm64 = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        assert norm64 > 10 * clip  # clipping must act in this test
        assert record["grad_norm"] == pytest.approx(norm64, rel=1e-5)
        by_hand = [torch.zeros_like(g, requires_grad=True) for g in grads]
        for p, g in zip(by_hand, grads):
            p.grad = g.clone()
        returned = torch.nn.utils.clip_grad_norm_(by_hand, clip)
        assert float(returned) == pytest.approx(record["grad_norm"], rel=1e-6)
        for p, s in zip(by_hand, seen):
            torch.testing.assert_close(s, p.grad, rtol=1e-6, atol=0)
        assert math.sqrt(sum(float(s.double().pow(2).sum()) for s in seen)) == pytest.approx(clip, rel=1e-4)


# ---------------------------------------------------------------------------- checkpoint ordering

CHECKPOINT_FILES = ("state.json", "optimizer_rng.safetensors", "adapter/adapter_config.json",
                    "adapter/adapter_model.safetensors")


def test_the_pointer_names_a_complete_checkpoint_at_every_moment(tmp_path, monkeypatch):
    """Every rename and every removal the run makes is watched: before and after each, the
    pointer is absent or names a directory holding every file of a checkpoint of that step.
    The two moments a kill matters are seen: before checkpoint-6's rename (the pointer names
    checkpoint-3) and between that rename and the pointer's update (both are complete)."""
    run = tmp_path / "r"
    seen = []

    def pointer_is_complete(moment: str):
        pointer = run / "latest_checkpoint"
        name = pointer.read_text() if pointer.exists() else None
        if name is not None:
            for file in CHECKPOINT_FILES:
                assert (run / name / file).is_file(), f"{moment}: the pointer names {name}, which has no {file}"
            assert json.loads((run / name / "state.json").read_text())["step"] == int(name.split("-")[1])
        seen.append((moment, name, sorted(p.name for p in run.glob("checkpoint-*")) if run.is_dir() else []))

    def watched(function):
        def call(*args, **kwargs):
            where = " -> ".join(Path(a).name for a in args[:2])
            pointer_is_complete(f"before {function.__name__}({where})")
            result = function(*args, **kwargs)
            pointer_is_complete(f"after {function.__name__}({where})")
            return result
        return call
    monkeypatch.setattr(rundir.os, "replace", watched(rundir.os.replace))
    monkeypatch.setattr(rundir.shutil, "rmtree", watched(rundir.shutil.rmtree))
    train_small(run, method="none", limit=28)  # 7 steps: checkpoints at 3, 6 and 7
    moments = {moment: (name, dirs) for moment, name, dirs in seen}
    assert moments["before replace(checkpoint-6.tmp -> checkpoint-6)"] == ("checkpoint-3", ["checkpoint-3", "checkpoint-6.tmp"])
    assert moments["before replace(latest_checkpoint.tmp -> latest_checkpoint)"][0] is not None
    between = [(name, dirs) for moment, name, dirs in seen
               if moment == "before replace(latest_checkpoint.tmp -> latest_checkpoint)"]
    assert ("checkpoint-3", ["checkpoint-3", "checkpoint-6"]) in between
    assert (run / "latest_checkpoint").read_text() == "checkpoint-7"


# ---------------------------------------------------------------------------- the run directory's lock


def test_a_second_training_into_the_same_directory_is_refused_while_the_first_runs(tmp_path, monkeypatch, capsys):
    """While a run trains (here: at its third step), a second training into its directory, with
    or without RESUME, stops at once with one line naming the directory, and writes nothing;
    the first run then ends as if alone."""
    out = tmp_path / "r"
    second = {}
    learning_rate = pg.learning_rate

    def start_a_second_training(cfg, step, total):
        if step == 2 and not second:
            files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
            second["fresh"] = run_main(capsys, *small_flags(method="none"), "--out", str(out))
            second["resume"] = run_main(capsys, *small_flags(method="none"), "--out", str(out), "--resume")
            second["unchanged"] = files == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        return learning_rate(cfg, step, total)
    monkeypatch.setattr(pg, "learning_rate", start_a_second_training)
    assert run_main(capsys, *small_flags(method="none"), "--out", str(out))[0] == 0
    for code, err in (second["fresh"], second["resume"]):
        assert code == 2 and err[-1] == (f"error: {out}: another training is writing this run directory (it holds "
                                         f"{out / 'run.lock'}): wait for it to end, or choose another OUT")
        assert not any(line.startswith("[phaseguard] none on") for line in err[-2:])  # refused before loading
    assert second["unchanged"]
    assert [m["step"] for m in read_metrics(out)] == list(range(1, 11))
    code, err = run_main(capsys, *small_flags(method="none"), "--out", str(out))  # the lock ended with the run
    assert code == 2 and "already holds a run" in err[-1]


# ---------------------------------------------------------------------------- Ctrl-C, resume, garbled metrics


def interrupt_at(monkeypatch, step: int):
    """Ctrl-C as the loop reaches `step` (that many updates done and logged)."""
    learning_rate = pg.learning_rate

    def interrupted(cfg, s, total):
        if s == step:
            raise KeyboardInterrupt
        return learning_rate(cfg, s, total)
    monkeypatch.setattr(pg, "learning_rate", interrupted)
    return learning_rate


def test_ctrl_c_is_one_line_and_a_garbled_metrics_line_is_kept_aside_on_resume(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    learning_rate = interrupt_at(monkeypatch, 5)
    code, err = run_main(capsys, *small_flags(method="none", limit=28), "--out", str(out))
    assert code == 130
    assert err[-1] == ("interrupted: the last complete checkpoint is intact (checkpoint-3): rerun with RESUME=1 "
                       "to continue from step 3")
    assert not any("Traceback" in line or "KeyboardInterrupt" in line for line in err)
    assert (out / "latest_checkpoint").read_text() == "checkpoint-3"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5
    # Line 2 garbled (step 2 is before the checkpoint: its record cannot be recomputed), line 5
    # cut as a kill would cut it (step 5 is after: it is recomputed).
    lines[1], lines[4] = '{"step": 2, "loss": 1.2', lines[4][:17]
    (out / "metrics.jsonl").write_text("\n".join(lines))
    monkeypatch.setattr(pg, "learning_rate", learning_rate)
    code, err = run_main(capsys, *small_flags(method="none", limit=28), "--out", str(out), "--resume")
    assert code == 0, err[-3:]
    assert "[phaseguard] resuming from step 3 (checkpoint-3)" in err
    warning = [line for line in err if "not a JSON record" in line]
    assert warning == [f"[phaseguard] warning: {out / 'metrics.jsonl'}: line(s) 2, 5 not a JSON record (kept aside in "
                       f"{out / 'metrics.jsonl.garbled'}); the valid records up to step 3 are kept; no record left "
                       f"for step(s) 2"]
    assert (out / "metrics.jsonl.garbled").read_text() == f"{lines[1]}\n{lines[4]}\n"
    assert [m["step"] for m in read_metrics(out)] == [1, 3, 4, 5, 6, 7]


def test_ctrl_c_before_the_first_checkpoint_says_what_a_resume_does(tmp_path, monkeypatch, capsys):
    interrupt_at(monkeypatch, 1)
    code, err = run_main(capsys, *small_flags(method="none", limit=8), "--out", str(tmp_path / "r"))
    assert code == 130 and err[-1] == "interrupted: no checkpoint yet: rerun with RESUME=1 to start again from step 0"


# ---------------------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """3 steps, checkpoint-3 the last."""
    import os
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        return train_small(tmp_path_factory.mktemp("finished") / "r", method="none", limit=12)
    finally:
        os.environ["TRITON_INTERPRET"] = "1"


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


@pytest.mark.parametrize("file", CHECKPOINT_FILES)
@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_damaged_checkpoint_file_is_one_line_naming_it(tmp_path, capsys, finished_run, file, damage):
    """One line naming the file, no false "rerun with RESUME=1" (the rerun would fail the same
    way), exit 2, and not a byte of the run changed."""
    run = shutil.copytree(finished_run, tmp_path / "r")
    path = run / "checkpoint-3" / file
    truncate(path) if damage == "truncated" else path.unlink()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, err = run_main(capsys, *small_flags(method="none", limit=12), "--out", str(run), "--resume")
    assert code == 2 and str(path) in err[-1] and "RESUME=1" not in err[-1], err[-1]
    assert not any("Traceback" in line for line in err)
    assert before == {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert rundir.resume_hint(run) is None  # what an OSError or Ctrl-C would add: no hint to resume from it
    if damage == "deleted":  # the pointer names only a complete checkpoint
        with pytest.raises(pg.UserError, match=f"no {path}"):
            rundir.latest_checkpoint(run)


@pytest.mark.parametrize("state", ['{"step": "3"}', "[]", '{"step": 3}'])
def test_a_state_json_without_its_fields_is_one_line(tmp_path, capsys, finished_run, state):
    run = shutil.copytree(finished_run, tmp_path / "r")
    (run / "checkpoint-3" / "state.json").write_text(state)
    code, err = run_main(capsys, *small_flags(method="none", limit=12), "--out", str(run), "--resume")
    assert code == 2 and err[-1].startswith(f"error: {run / 'checkpoint-3' / 'state.json'}: cannot read it")


# ---------------------------------------------------------------------------- flags and sizes


def test_epochs_are_drawn_when_needed(tmp_path, capsys):
    """`--epochs 1000000000 --max-steps 1` trains one step (the schedule's length is arithmetic);
    and the lazily drawn batches are those of length_grouped_batches, epoch after epoch."""
    out = tmp_path / "r"
    code, err = run_main(capsys, *small_flags(limit=8), "--epochs", "1000000000", "--max-steps", "1", "--out", str(out))
    assert code == 0, err[-3:]
    assert len(read_metrics(out)) == 1
    assert json.loads((out / "summary.json").read_text())["planned_steps"] == 2 * 10**9
    cfg = pg.resolve_config({**SMALL, "epochs": 3, "batch_size": 4})
    lengths = [5, 9, 2, 7, 7, 3, 1, 8, 4, 6]  # 10 samples: 3 batches per epoch, the last one short
    total, batch_of = pg.step_schedule(lengths, cfg)
    expected = [b for epoch in range(3) for b in pg.data.length_grouped_batches(lengths, 4, cfg.seed, epoch)]
    assert total == len(expected) == 9 and [batch_of(s) for s in range(total)] == expected
