"""PhaseGuard-KL: the training loop (Eq. 1), switched on by a drift monitor (Eq. 2, monitor.py).

    L = L_CE(theta_t; D) + lambda_t * KL(pi_theta_t || pi_theta_0)                  (Eq. 1)
    D_t = 1/|P| sum_p JS_k(pi_theta_t(.|p), pi_theta_0(.|p))                         (Eq. 2)

Methods: `none` (lambda_t = 0), `kl` (lambda_t = lambda from step 0), `phaseguard`
(lambda_t = lambda once the trigger has fired, 0 before). The reference pi_theta_0 is the
same model with its LoRA adapters switched off (`lora.disabled`), never a second copy.

The monitors (Eq. 2 and five others) and the trigger live in monitor.py; the loop logs every
monitor at every monitoring step, for every method, and once more after the last update, and
the trigger reads the one chosen by `--monitor` (`js`, Eq. 2, by default: monitor.js).

Steps count completed optimizer updates. D_t is measured at t = 0, 5, 10, ... before
update t+1 (t = 0 is before training, where D_0 = 0 for a fresh adapter); the first 3
measurements are warm-up, so with D_t above tau from the start the trigger fires at
t = 20, the step the paper reports.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import signal
import sys
import time
from pathlib import Path

import torch

import data
import kernels
import lora
import model_qwen2 as mq
import provenance
from config import PRESETS, TrainConfig, resolve_config
from distributed import Dist
from errors import ArgumentParser, UserError
from monitor import (MONITORS, MonitorSetup, Reference, Trigger, all_monitors, canary_batch, monitor_record,
                     monitor_setup, reference_state, update_trigger)
from rundir import (check_run_dir, latest_checkpoint, load_checkpoint, write_errors_name, resume_hint, run_lock,
                    save_checkpoint, start_run_dir, truncate_metrics, write_atomic)

# ----------------------------------------------------------------------------
# Which lambda and learning rate a step gets


def active_lambda(cfg: TrainConfig, trigger: Trigger) -> float:
    if cfg.method == "kl" or (cfg.method == "phaseguard" and trigger.fired):
        return cfg.lam
    return 0.0


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Linear warm-up (optional), then linear decay to 0 at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * max(0.0, (total_steps - step) / max(1, total_steps - cfg.warmup_steps))


# ----------------------------------------------------------------------------
# One optimizer step of Eq. 1 over micro-batches


def train_step(model, micro_batches, lam: float, kl_tokens: str, device, autocast, dist: "Dist | None" = None) -> dict:
    """Accumulate gradients of Eq. 1 over the micro-batches of one effective batch.
    CE is the mean over the batch's supervised tokens; KL the mean over its KL tokens.
    Data parallel (dist): each rank runs its share of the micro-batches with the normalisers of
    the whole effective batch, so the all-reduced (summed) gradient is the one-process gradient."""
    dist = dist or Dist()

    def kl_mask_of(mb):
        return mb["labels"] != kernels.IGNORE_INDEX if kl_tokens == "supervised" else mb["attention_mask"].bool()
    n_ce = sum(int((mb["labels"] != kernels.IGNORE_INDEX).sum()) for mb in micro_batches)
    n_kl = sum(int(kl_mask_of(mb).sum()) for mb in micro_batches)
    ce_sum = kl_sum = 0.0
    for mb in dist.share_of(micro_batches):
        ids, mask = mb["input_ids"].to(device), mb["attention_mask"].to(device)
        with autocast():
            hidden = model.hidden_states(ids, mask)
            ref_hidden = None
            if lam > 0:
                with torch.no_grad(), lora.disabled(model):
                    ref_hidden = model.hidden_states(ids, mask)
        H = hidden.shape[-1]
        out = kernels.fused_linear_ce_kl(
            hidden.reshape(-1, H), None if ref_hidden is None else ref_hidden.reshape(-1, H),
            model.lm_head.weight, mb["labels"].to(device).reshape(-1), kl_mask_of(mb).to(device).reshape(-1),
            ce_weight=1.0 / max(1, n_ce), kl_weight=lam / max(1, n_kl))
        out.loss.backward()
        ce_sum += float(out.ce_sum)
        kl_sum += float(out.kl_sum)
    ce_sum, kl_sum = dist.sum_across_ranks([p for p in model.parameters() if p.requires_grad], [ce_sum, kl_sum])
    ce, kl = ce_sum / max(1, n_ce), (kl_sum / max(1, n_kl) if lam > 0 else None)
    tokens = sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
    return {"ce": ce, "kl": kl, "loss": ce + lam * (kl or 0.0), "tokens": tokens, "supervised_tokens": n_ce}


# ----------------------------------------------------------------------------
# Model and data for a run


def build_tiny_model(cfg: TrainConfig, samples_text: list[str], directory: Path) -> tuple[Path, Path]:
    """Tiny preset: a BPE tokenizer trained in process on the training texts (with Qwen's
    chat special tokens) and a small random Qwen2, saved like a real checkpoint so the
    run goes through the same loading code as the 7B model."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    directory.mkdir(parents=True, exist_ok=True)
    sizes = dict(cfg.tiny_model)
    vocab = sizes.pop("vocab", 1024)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(samples_text + data.CANARY_PROMPTS, trainer)
    tok.save(str(directory / "tokenizer.json"))
    config = dict(sizes, vocab_size=tok.get_vocab_size(), tie_word_embeddings=True, rope_theta=10000.0,
                  rms_norm_eps=1e-6, max_position_embeddings=4096, torch_dtype="float32",
                  eos_token_id=tok.token_to_id("<|im_end|>"), bos_token_id=None)
    # Its own RNG stream: the build must not move the training RNG, or a run killed before its
    # first checkpoint (which reuses the built model) would resume to a different adapter.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = mq.Qwen2(mq.Qwen2Config.from_dict(config))
        for name, p in model.named_parameters():
            if p.dim() > 1:  # the tied embedding gets a wider init: a frozen 0.02 head could move logits ~1 nat at most
                torch.nn.init.normal_(p, std=0.25 if "embed_tokens" in name else 0.02)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory, directory / "tokenizer.json"


def load_run_model(cfg: TrainConfig, run: Path, resuming: bool = False, device: str | None = None, build: bool = True):
    """(model with rs-LoRA injected, tokenizer, task data). The tiny model is reused only by
    a run that has started (config.json written); a failed start's leftover is rebuilt.
    build=False: read the tiny model another rank has just built."""
    device = device or cfg.device
    if cfg.preset == "tiny" and cfg.model == "tiny" and (not build or resuming) and (run / "tiny_model" / "config.json").is_file():
        model_dir, tok_path = run / "tiny_model", run / "tiny_model" / "tokenizer.json"
    elif cfg.preset == "tiny" and cfg.model == "tiny":
        if cfg.task == "security":
            raw_train, _, _ = data.security_split(cfg.data)
        else:
            raw_train, _ = data.opswap_split(2)
        texts = [m["content"] for s in raw_train[:cfg.limit] for m in s["messages"]]
        with write_errors_name(run / "tiny_model"):
            model_dir, tok_path = build_tiny_model(cfg, texts, run / "tiny_model")
    else:  # one snapshot: the weights, and the tokenizer unless another is named, at the same commit
        model_dir = mq.resolve_model_dir(cfg.model, revision=cfg.revision)
        tok_path = cfg.tokenizer or model_dir
    tokenizer = mq.load_tokenizer(tok_path)
    cuda = device.startswith("cuda")
    model = mq.load_model(model_dir, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    model.activation_checkpointing = cuda
    # fp32 adapters on a bf16 base: small updates are not rounded away.
    lora.inject(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, dtype=torch.float32)
    # The held-out splits are fixed (data.DATA_SEED): every training seed sees the same train set.
    task = data.load_task(cfg.task, tokenizer, path=cfg.data, max_len=cfg.max_len, limit=cfg.limit)
    return model, tokenizer, task


# ----------------------------------------------------------------------------
# The training loop


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """One run, top to bottom. Flags were checked by resolve_config; rank 0 then locks the run
    directory (a second training into it is refused before anything is written) for the run's
    whole life; the rest is train_locked."""
    dist = Dist()
    n_micro = cfg.batch_size // cfg.micro_batch_size
    if n_micro % dist.world:
        raise UserError(f"{dist.world} processes cannot share the {n_micro} micro-batches of an effective batch "
                        f"({cfg.batch_size} / {cfg.micro_batch_size}): use a process count that divides {n_micro}")
    with run_lock(Path(cfg.out)) if dist.is_main else contextlib.nullcontext():
        return train_locked(cfg, resume, dist)


@dataclasses.dataclass
class Run:
    """What the loop needs, from setup_run. canaries and reference exist on rank 0 only (it monitors)."""
    dir: Path
    model: torch.nn.Module
    tokenizer: object
    task: data.TaskData
    optimizer: torch.optim.Optimizer
    device: str
    total_steps: int  # the whole schedule's optimizer updates (what the learning rate decays over)
    stop: int  # the update the run stops after (--max-steps)
    step_batch: object  # step -> its effective batch's sample indices
    trigger: Trigger
    start: int  # the first update to run: 0, or the resumed checkpoint's step
    monitor_history: dict  # name -> [[step, value], ...]
    canaries: tuple | None = None
    reference: Reference | None = None
    setup: MonitorSetup | None = None

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else torch.autocast("cpu", enabled=False)


def train_locked(cfg: TrainConfig, resume: bool, dist: Dist) -> Path:
    """The loop, nanoGPT-style: set up, then per update monitor -> lambda -> Eq. 1 -> log and
    checkpoint, then the final reading and the adapter. Under torchrun every rank runs this;
    rank 0 alone monitors and writes, and hands the monitors' result to the others."""
    run = setup_run(cfg, resume, dist)  # model, data, optimizer, reference, resume
    trigger, shown_d_t = run.trigger, None
    from tqdm import tqdm
    bar = tqdm(range(run.start, run.stop), initial=run.start, total=run.stop, dynamic_ncols=True,
               disable=not dist.is_main)
    run.model.train()
    with (open(run.dir / "metrics.jsonl", "a") if dist.is_main else contextlib.nullcontext()) as log:
        for step in bar:
            # Monitor, between optimizer updates: every monitor, for every method, so drift can be
            # compared across methods and monitors; the trigger reads cfg.monitor (D_t, Eq. 2, for "js").
            values = None
            if step % cfg.monitor_every == 0:
                values, trigger = measure(cfg, run, trigger, step, dist)
                shown_d_t = values[cfg.monitor]
                for name, value in values.items():
                    run.monitor_history[name].append([step, value])
            # Eq. 1: lambda from the method and the trigger, then one optimizer update.
            lam, lr = active_lambda(cfg, trigger), learning_rate(cfg, step, run.total_steps)
            stats, grad_norm, seconds = optimizer_update(cfg, run, step, lam, lr, dist)
            if not dist.is_main:
                continue
            # Log and checkpoint (rank 0).
            with write_errors_name(run.dir / "metrics.jsonl"):
                log.write(json.dumps(step_record(cfg, step, stats, lam, lr, grad_norm, seconds, values, trigger,
                                                 run.cuda)) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{stats['loss']:.3f}", kl="-" if stats["kl"] is None else f"{stats['kl']:.4f}",
                            lam=f"{lam:g}", D_t=f"{shown_d_t:.3f}" if shown_d_t is not None else "-",
                            trigger=trigger.fired_at if trigger.fired else ("off" if cfg.method == "phaseguard" else "n/a"))
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == run.stop:
                save_checkpoint(run.dir, run.model, run.optimizer, step + 1, trigger, run.monitor_history)
    return finish(cfg, run, trigger, dist)  # the final reading, the adapter and summary.json


def setup_run(cfg: TrainConfig, resume: bool, dist: Dist) -> Run:
    """Data, tokenizer and model are loaded and checked first; config.json is written only when
    training really starts, so a failed start leaves nothing that refuses the same command with
    the input fixed."""
    run_dir = Path(cfg.out)
    resuming = check_run_dir(run_dir, cfg, resume)
    device = dist.join(cfg.device)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the same on every rank: the same LoRA initialisation
    if dist.is_main:
        model, tokenizer, task = load_run_model(cfg, run_dir, resuming, device)
    dist.barrier()  # rank 0 has built the tiny model (if any) before the others read it
    if not dist.is_main:
        model, tokenizer, task = load_run_model(cfg, run_dir, resuming, device, build=False)
    if cfg.topk > model.config.vocab_size:
        raise UserError(f"topk={cfg.topk} is larger than the vocabulary ({model.config.vocab_size})")
    # Effective batches (length-grouped), each split into micro-batches; 1 epoch in the paper.
    total_steps, step_batch = step_schedule([len(e["ids"]) for e in task.train], cfg)
    if total_steps == 0:
        raise UserError(f"no training samples from {task.source}: every sample lost its assistant tokens "
                        f"when cut at max_len={cfg.max_len} ({task.n_truncated} cut)" if task.n_truncated else
                        f"no training samples from {task.source} (limit={cfg.limit})")
    # --max-steps stops early but keeps the whole run's learning-rate schedule (learning_rate gets
    # total_steps, not stop): the first N steps are then exactly those of the full run, so a short
    # run shows what the full run's monitors read at those steps.
    stop = min(total_steps, cfg.max_steps or total_steps)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    run = Run(run_dir, model, tokenizer, task, optimizer, device, total_steps, stop, step_batch,
              Trigger(cfg.tau, cfg.warmup_measurements, cfg.consecutive), 0, {name: [] for name in MONITORS})
    if dist.is_main:  # the monitors run on rank 0; the others get their result
        run.canaries = canary_batch(tokenizer, device)
        run.setup = monitor_setup(cfg, tokenizer, model)
        run.reference = reference_state(model, run.canaries, cfg.topk, run.setup)  # once: the reference never changes
    if resuming and latest_checkpoint(run_dir) is not None:  # every rank reads the same checkpoint
        run.start, trigger_state, run.monitor_history = load_checkpoint(run_dir, model, optimizer)
        if dist.is_main:
            print(f"[phaseguard] resuming from step {run.start} ({latest_checkpoint(run_dir).name})", file=sys.stderr)
        run.trigger = Trigger(**trigger_state)
    dist.barrier()  # nobody reads the run directory once rank 0 starts writing it
    if dist.is_main:
        start_writing(cfg, run, resuming, dist)
    return run


def start_writing(cfg: TrainConfig, run: Run, resuming: bool, dist: Dist):
    """Rank 0, as training starts: config.json and provenance, the monitors' reference record,
    metrics.jsonl cut back to the resumed step, and one line saying what runs."""
    origin = provenance.collect(model=provenance.model_record(cfg.model, cfg.revision, run.model.weights_dir),
                                data=provenance.data_record(run.task.source, run.task.sha256, run.task.sha256_of))
    if resuming and run.start == 0:
        print("[phaseguard] resuming a run that has no checkpoint yet: starting at step 0", file=sys.stderr)
    start_run_dir(run.dir, cfg, resuming, origin, run.start)  # training starts now: config.json, then metrics
    write_atomic(run.dir / "monitor_reference.json", json.dumps(monitor_record(run.reference, run.setup), indent=2))
    truncate_metrics(run.dir / "metrics.jsonl", run.start)
    task, total_steps, stop = run.task, run.total_steps, run.stop
    print(f"[phaseguard] {cfg.method} on {cfg.task}: {len(task.train)} samples ({task.n_truncated} truncated at "
          f"{cfg.max_len}), {total_steps} steps" + (f" (stopping after {stop})" if stop < total_steps else "")
          + f", lambda={cfg.lam}, monitor {cfg.monitor}, data from {task.source}"
          + (f", {dist.world} processes" if dist.parallel else ""), file=sys.stderr)


def measure(cfg: TrainConfig, run: Run, trigger: Trigger, step: int, dist: Dist) -> tuple[dict, Trigger]:
    """Every monitor (rank 0) and, for phaseguard, the trigger updated from cfg.monitor's value;
    every rank gets both, so every rank applies the same lambda on the same step."""
    values = None
    if dist.is_main:
        values = all_monitors(run.model, run.canaries, run.reference)
        if cfg.method == "phaseguard":
            update_trigger(trigger, values[cfg.monitor], step)
    return dist.broadcast_from_main((values, trigger))


def optimizer_update(cfg: TrainConfig, run: Run, step: int, lam: float, lr: float, dist: Dist):
    """One AdamW update of Eq. 1 on step's effective batch: (train_step's stats, the gradient norm
    before clipping, the wall seconds)."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if run.cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    examples = sorted((run.task.train[i] for i in run.step_batch(step)), key=lambda e: len(e["ids"]))
    micro = [data.collate(examples[i:i + cfg.micro_batch_size], run.tokenizer.pad_id)
             for i in range(0, len(examples), cfg.micro_batch_size)]
    stats = train_step(run.model, micro, lam, cfg.kl_tokens, run.device, run.autocast, dist)
    # grad_clip 0 is "off": an infinite max norm still returns the norm for the log.
    grad_norm = torch.nn.utils.clip_grad_norm_(run.optimizer.param_groups[0]["params"],
                                               cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.cuda:
        torch.cuda.synchronize()  # the step's kernels are queued, not finished
    return stats, float(grad_norm), time.perf_counter() - t0


def step_record(cfg: TrainConfig, step: int, stats: dict, lam: float, lr: float, grad_norm: float, seconds: float,
                values: dict | None, trigger: Trigger, cuda: bool) -> dict:
    """One line of metrics.jsonl: the update's Eq. 1 terms and costs, and every monitor when they were
    measured before this update (at step `step`, the record's step - 1), else null."""
    return {"step": step + 1, **stats, "lambda_active": lam, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": stats["tokens"] / seconds, "peak_memory_gb": peak_memory_gb(cuda),
            "monitors": values, "trigger_fired_at": trigger.fired_at, "time": round(time.time(), 3)}


def finish(cfg: TrainConfig, run: Run, trigger: Trigger, dist: Dist) -> Path:
    """A final reading after the last update (the drift of the adapter that is saved), then rank 0
    saves the adapter and summary.json."""
    if dist.is_main:
        for name, value in all_monitors(run.model, run.canaries, run.reference).items():
            if not run.monitor_history[name] or run.monitor_history[name][-1][0] != run.stop:
                run.monitor_history[name].append([run.stop, value])
    dist.barrier()
    if dist.is_main:
        with write_errors_name(run.dir / "adapter"):
            lora.save_adapter(run.model, run.dir / "adapter", cfg.model)
        summary = {"steps": run.stop, "planned_steps": run.total_steps, "trigger_step": trigger.fired_at,
                   "monitor": cfg.monitor, "monitor_history": run.monitor_history,
                   "final_reading_step": run.stop, "n_train": len(run.task.train), "n_truncated": run.task.n_truncated,
                   "data_source": run.task.source}
        write_atomic(run.dir / "summary.json", json.dumps(summary, indent=2))
    dist.leave()
    return run.dir


def step_schedule(lengths: list[int], cfg: TrainConfig):
    """(total optimizer steps, step -> its batch of sample indices). An epoch's batches are drawn
    when a step first needs them, one epoch held at a time: `--epochs 1000000000 --max-steps 1`
    draws one epoch, not a billion."""
    import functools
    per_epoch = -(-len(lengths) // cfg.batch_size)  # length_grouped_batches cuts ceil(n / batch) batches

    @functools.lru_cache(maxsize=1)
    def epoch_batches(epoch: int) -> list[list[int]]:
        return data.length_grouped_batches(lengths, cfg.batch_size, cfg.seed, epoch)
    return per_epoch * cfg.epochs, lambda step: epoch_batches(step // per_epoch)[step % per_epoch]


def peak_memory_gb(cuda: bool) -> float:
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# ----------------------------------------------------------------------------
# Command line: `python phaseguard.py train --method phaseguard --task security ...`


def main(argv=None) -> int:
    parser = ArgumentParser(description="PhaseGuard-KL training")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune with rs-LoRA (methods none | kl | phaseguard)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "tiny_model":
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
                       help=f"default: {f.default}" + "".join(f" (the {name} preset: {values[f.name]})"
                                                              for name, values in PRESETS.items() if f.name in values))
    p.add_argument("--resume", action="store_true")
    args = vars(parser.parse_args(argv))
    args.pop("command")  # only `train` for now
    resume = args.pop("resume")
    # A file-size limit (ulimit -f) then fails the write with EFBIG, reported below, instead of
    # killing the process without a word.
    if hasattr(signal, "SIGXFSZ"):  # POSIX only
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    cfg = None
    try:
        cfg = resolve_config(args)
        if cfg.preset == "tiny":
            print("[phaseguard] TINY PRESET: a small random model on the CPU. It checks the pipeline; "
                  "its numbers mean nothing.", file=sys.stderr)
        elif cfg.preset == "small":
            print(f"[phaseguard] SMALL PRESET: {cfg.model} on the CPU at reduced sizes (batch {cfg.batch_size}, "
                  f"r = {cfg.lora_r}): not the paper's setting.", file=sys.stderr)
        run = train(cfg, resume=resume)
    except UserError as err:
        return fail(f"error: {err}", 2)
    except OSError as err:  # a read-only or full disk, a file-size limit: the last checkpoint is intact
        where = err.filename or (cfg.out if cfg else "?")
        hint = resume_hint(Path(cfg.out)) if cfg is not None else None
        return fail(f"error: {where}: {err.strerror or err}" + (f" ({hint})" if hint else ""), 2)
    except KeyboardInterrupt:  # Ctrl-C: one line saying what is on disk, no traceback
        hint = resume_hint(Path(cfg.out)) if cfg is not None else None
        return fail("interrupted" + (f": {hint}" if hint else " before training started: the same command starts "
                                     "it afresh"), 130)
    if Dist().is_main:
        print(f"[phaseguard] done: {run}", file=sys.stderr)
    return 0


def fail(line: str, code: int) -> int:
    """One line on stderr, from rank 0 (under torchrun every rank usually meets the same error).
    Every rank also hands it to torchrun, whose failure summary then shows it instead of a pointer
    to its docs (a rank that fails alone is named there too)."""
    dist = Dist()
    if dist.is_main:
        print(line, file=sys.stderr)
    if dist.parallel:
        dist.tell_launcher(line)
    return code


if __name__ == "__main__":
    sys.exit(main())
