"""Training loops: MLM+NSP pre-training, sequence classification and extractive QA fine-tuning.

One `Trainer` runs every task. A task supplies its examples, how a global batch is built (padding,
MLM masking), its loss as (sum, count) terms and its evaluation. The loop adds AdamW with linear
warmup/decay, gradient accumulation and clipping, autocast, DDP, resumable Hugging Face format
checkpoints, a tqdm bar and a JSON metrics file.

Exactness across process counts: every rank builds the same *global* batch (same seed, same
masking), divides each loss sum by the global count (masked tokens, rows) and keeps only its rows.
So 2 processes compute the same loss and gradients as 1 process with the same global batch,
and a resumed run repeats the uninterrupted one exactly (data order, masking and dropout are all
derived from saved seeds / RNG states).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastbert import data as fbdata

STATE_FILE = "trainer_state.pt"


@dataclass
class TrainConfig:
    output_dir: str
    epochs: float = 1.0
    max_steps: Optional[int] = None     # overrides epochs
    batch_size: int = 32                # global batch of one micro-step, over all processes
    grad_accum: int = 1                 # micro-steps per optimizer step
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0          # 0 disables clipping
    precision: str = "fp32"             # fp32 | bf16 | fp16 (fp16 needs a GPU)
    seed: int = 42
    log_every: int = 10
    eval_every: Optional[int] = None    # steps; None = at the end only
    save_every: Optional[int] = None    # steps; None = at the end only
    save_total_limit: Optional[int] = 2  # keep this many checkpoint-* directories
    resume_from: Optional[str] = None   # a checkpoint-* directory, or "latest" in output_dir
    device: str = "auto"
    progress: bool = True


# --------------------------------------------------------------------------------------------
# processes and devices
# --------------------------------------------------------------------------------------------

def setup_distributed(device: str = "auto"):
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) this joins the process group:
    NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------

@dataclass
class Task:
    """What the Trainer needs to know about a task.

    make_batch(examples, seed) -> dict of tensors for the whole global batch;
    loss_sums(outputs, batch) -> [sum of each loss term over the batch's rows];
    loss_counts(batch) -> [what each term is averaged by: masked tokens, rows];
    evaluate(model, device) -> dict of metrics (run on rank 0 only).
    The loss is sum_i loss_sums[i] / loss_counts[i], the counts taken over the global batch.
    """
    name: str
    train_examples: List[dict]
    make_batch: Callable
    loss_sums: Callable
    loss_counts: Callable
    evaluate: Optional[Callable] = None
    train_inputs: Optional[Callable] = None  # batch -> model kwargs in training (default: the ids)


def _model_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def _labelled_inputs(batch):
    """Training inputs of the LM tasks: with the labels and return_logits=False the vocabulary
    decoder runs at labelled positions only (15 % of tokens in MLM) and gives those logits."""
    return {**_model_inputs(batch), "labels": batch["labels"], "return_logits": False}


def _lm_logits(outputs, targets):
    """(M, V) logits at the labelled positions and their (M,) targets, from full or labelled
    logits (the labels are -100 wherever the model has no output to give)."""
    chosen = targets != fbdata.IGNORE_INDEX
    logits = outputs.labelled_logits if getattr(outputs, "labelled_logits", None) is not None \
        else (outputs.prediction_logits if hasattr(outputs, "prediction_logits")
              else outputs.logits)[chosen]
    return logits.float(), targets[chosen]


def pretraining_task(train_examples, tokenizer, eval_examples=None, mlm_probability=0.15,
                     eval_batch_size=32) -> Task:
    def make_batch(examples, seed):
        batch = fbdata.collate(examples, tokenizer.pad_id)
        generator = torch.Generator().manual_seed(seed)
        batch["input_ids"], batch["labels"] = fbdata.mask_tokens(
            batch["input_ids"], batch["attention_mask"], tokenizer.special_ids, tokenizer.mask_id,
            tokenizer.vocab_size, generator, mlm_probability)
        return batch

    def loss_sums(outputs, batch):
        mlm = F.cross_entropy(*_lm_logits(outputs, batch["labels"]), reduction="sum")
        nsp = F.cross_entropy(outputs.seq_relationship_logits.float(), batch["next_sentence_label"],
                              reduction="sum")
        return [mlm, nsp]

    def loss_counts(batch):
        return [int((batch["labels"] != fbdata.IGNORE_INDEX).sum()), batch["next_sentence_label"].numel()]

    @torch.no_grad()
    def evaluate(model, device):
        sums = dict(mlm_loss=0.0, nsp_loss=0.0, mlm_correct=0, masked=0, nsp_correct=0, rows=0)
        for i in range(0, len(eval_examples), eval_batch_size):
            batch = _to(make_batch(eval_examples[i:i + eval_batch_size], seed=i), device)
            out = model(**_labelled_inputs(batch))
            mlm, nsp = loss_sums(out, batch)
            n_masked, n_rows = loss_counts(batch)
            logits, targets = _lm_logits(out, batch["labels"])
            sums["mlm_loss"] += mlm.item()
            sums["nsp_loss"] += nsp.item()
            sums["mlm_correct"] += (logits.argmax(-1) == targets).sum().item()
            sums["masked"] += n_masked
            sums["nsp_correct"] += (out.seq_relationship_logits.argmax(-1) == batch["next_sentence_label"]).sum().item()
            sums["rows"] += n_rows
        mlm_loss = sums["mlm_loss"] / max(sums["masked"], 1)
        nsp_loss = sums["nsp_loss"] / sums["rows"]
        return {"eval_loss": mlm_loss + nsp_loss, "eval_mlm_loss": mlm_loss,
                "eval_mlm_accuracy": sums["mlm_correct"] / max(sums["masked"], 1),
                "eval_nsp_accuracy": sums["nsp_correct"] / sums["rows"]}

    return Task("pretrain", train_examples, make_batch, loss_sums, loss_counts,
                evaluate if eval_examples else None, _labelled_inputs)


def causal_lm_task(train_examples, tokenizer, eval_examples=None, eval_batch_size=32) -> Task:
    """Left-to-right language modelling (BertLMHeadModel): position i predicts token i + 1."""
    def make_batch(examples, seed):
        batch = fbdata.collate(examples, tokenizer.pad_id)
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, fbdata.IGNORE_INDEX)
        return batch

    def shifted(batch):  # (B, S): position i predicts token i + 1
        return F.pad(batch["labels"], (0, 1), value=fbdata.IGNORE_INDEX)[:, 1:]

    def loss_sums(outputs, batch):
        return [F.cross_entropy(*_lm_logits(outputs, shifted(batch)), reduction="sum")]

    def loss_counts(batch):
        return [int((batch["labels"][:, 1:] != fbdata.IGNORE_INDEX).sum())]

    @torch.no_grad()
    def evaluate(model, device):
        loss, correct, count = 0.0, 0, 0
        for i in range(0, len(eval_examples), eval_batch_size):
            batch = _to(make_batch(eval_examples[i:i + eval_batch_size], 0), device)
            out = model(**_labelled_inputs(batch))
            logits, targets = _lm_logits(out, shifted(batch))
            loss += loss_sums(out, batch)[0].item()
            correct += (logits.argmax(-1) == targets).sum().item()
            count += loss_counts(batch)[0]
        return {"eval_loss": loss / count, "eval_perplexity": math.exp(min(loss / count, 50)),
                "eval_next_token_accuracy": correct / count}

    return Task("clm", train_examples, make_batch, loss_sums, loss_counts,
                evaluate if eval_examples else None, _labelled_inputs)


def classification_task(train_examples, tokenizer, label_names, eval_examples=None, eval_batch_size=64) -> Task:
    def make_batch(examples, seed):
        return fbdata.collate(examples, tokenizer.pad_id)

    def loss_sums(outputs, batch):
        return [F.cross_entropy(outputs.logits.float(), batch["labels"], reduction="sum")]

    def loss_counts(batch):
        return [batch["labels"].numel()]

    @torch.no_grad()
    def evaluate(model, device):
        predictions, labels, loss = [], [], 0.0
        for i in range(0, len(eval_examples), eval_batch_size):
            batch = _to(make_batch(eval_examples[i:i + eval_batch_size], 0), device)
            out = model(**_model_inputs(batch))
            loss += loss_sums(out, batch)[0].item()
            predictions.append(out.logits.argmax(-1).cpu())
            labels.append(batch["labels"].cpu())
        metrics = classification_metrics(torch.cat(predictions), torch.cat(labels), len(label_names))
        metrics["eval_loss"] = loss / len(eval_examples)
        return metrics

    return Task("classify", train_examples, make_batch, loss_sums, loss_counts,
                evaluate if eval_examples else None)


def classification_metrics(predictions: torch.Tensor, labels: torch.Tensor, num_labels: int) -> Dict[str, float]:
    """Accuracy and macro-F1 (the unweighted mean of the per-class F1; a class with no
    predictions and no examples counts as 0, as scikit-learn does)."""
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.long)
    confusion.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
    true_pos = confusion.diag().double()
    precision = true_pos / confusion.sum(0).clamp(min=1)
    recall = true_pos / confusion.sum(1).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(precision))
    return {"eval_accuracy": true_pos.sum().item() / max(labels.numel(), 1), "eval_macro_f1": f1.mean().item()}


def qa_task(train_features, tokenizer, eval_examples=None, eval_features=None, eval_batch_size=64,
            max_answer_length=30, version_2=False) -> Task:
    def make_batch(examples, seed):
        return fbdata.collate(examples, tokenizer.pad_id)

    def loss_sums(outputs, batch):
        start = F.cross_entropy(outputs.start_logits.float(), batch["start_positions"], reduction="sum")
        end = F.cross_entropy(outputs.end_logits.float(), batch["end_positions"], reduction="sum")
        return [(start + end) / 2]

    def loss_counts(batch):
        return [batch["start_positions"].numel()]

    @torch.no_grad()
    def evaluate(model, device):
        starts, ends = [], []
        for i in range(0, len(eval_features), eval_batch_size):
            features = eval_features[i:i + eval_batch_size]
            batch = _to(make_batch([f.inputs for f in features], 0), device)
            out = model(**_model_inputs(batch))
            for row, f in enumerate(features):  # drop the padding columns again
                n = len(f.offsets)
                starts.append(out.start_logits[row, :n].float().cpu())
                ends.append(out.end_logits[row, :n].float().cpu())
        predictions = fbdata.squad_predictions(eval_examples, eval_features, starts, ends,
                                               max_answer_length, version_2)
        scores = fbdata.squad_evaluate(eval_examples, predictions)
        return {"eval_exact_match": scores["exact_match"], "eval_f1": scores["f1"]}

    train_examples = [f.inputs for f in train_features]
    return Task("qa", train_examples, make_batch, loss_sums, loss_counts,
                evaluate if eval_examples else None)


def _to(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------

def _param_groups(model, weight_decay):
    """No weight decay on biases and LayerNorm weights (as BERT was trained)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Trainer:
    def __init__(self, model, task: Task, config: TrainConfig, tokenizer=None):
        self.config, self.task, self.tokenizer = config, task, tokenizer
        self.rank, self.world, self.device = setup_distributed(config.device)
        if config.batch_size % self.world:
            raise ValueError(f"batch_size {config.batch_size} must be divisible by the number of "
                             f"processes {self.world}")
        if len(task.train_examples) < config.batch_size:
            raise ValueError(f"{task.name}: {len(task.train_examples)} training examples, fewer than "
                             f"one batch of {config.batch_size}")
        if config.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {config.precision!r}")
        if config.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision fp16 needs a CUDA GPU (use bf16 or fp32 on CPU)")

        self.model = model.to(self.device)
        self.ddp_model = (torch.nn.parallel.DistributedDataParallel(self.model) if self.world > 1
                          else self.model)
        self.micro_per_epoch = len(task.train_examples) // config.batch_size  # last partial batch dropped
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * self.micro_per_epoch / config.grad_accum))
        self.optimizer = torch.optim.AdamW(_param_groups(self.model, config.weight_decay), lr=config.lr)
        self.scheduler = linear_schedule(self.optimizer, int(config.warmup_ratio * self.total_steps), self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16")
        self.step = 0
        self.metrics = {"task": task.name, "config": asdict(config), "world_size": self.world,
                        "device": str(self.device), "total_steps": self.total_steps,
                        "train_examples": len(task.train_examples), "history": [], "eval": []}
        # each rank its own dropout stream; the data stream is shared (seeded by step)
        torch.manual_seed(config.seed + self.rank)
        random.seed(config.seed + self.rank)
        np.random.seed(config.seed + self.rank)
        if config.resume_from:
            self._load_state(resolve_checkpoint(config.output_dir, config.resume_from))

    # ---- data ------------------------------------------------------------------------------

    def _global_batch(self, micro_index: int):
        """The global batch of micro-step `micro_index`: a slice of the epoch's permutation."""
        epoch, position = divmod(micro_index, self.micro_per_epoch)
        order = torch.randperm(len(self.task.train_examples),
                               generator=torch.Generator().manual_seed(self.config.seed * 1000 + epoch))
        rows = order[position * self.config.batch_size:(position + 1) * self.config.batch_size]
        examples = [self.task.train_examples[i] for i in rows.tolist()]
        return self.task.make_batch(examples, seed=self.config.seed * 1_000_003 + micro_index)

    def _local_rows(self, batch):
        per_rank = self.config.batch_size // self.world
        return {k: v[self.rank * per_rank:(self.rank + 1) * per_rank] for k, v in batch.items()}

    # ---- the loop ----------------------------------------------------------------------------

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def train(self) -> dict:
        from tqdm.auto import tqdm

        cfg = self.config
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.task.name, unit="step",
                   disable=not (cfg.progress and is_main_process()), dynamic_ncols=True)
        start_time = time.perf_counter()
        window_time, window_tokens, window_samples, window_loss, window_steps = start_time, 0, 0, 0.0, 0
        self.model.train()
        while self.step < self.total_steps:
            step_loss = torch.zeros((), device=self.device)
            for k in range(cfg.grad_accum):
                global_batch = self._global_batch(self.step * cfg.grad_accum + k)
                counts = self.task.loss_counts(global_batch)
                batch = _to(self._local_rows(global_batch), self.device)
                window_tokens += int(global_batch["attention_mask"].sum())
                window_samples += cfg.batch_size
                # gradients are all-reduced only on the last micro-step of an accumulation
                last = k == cfg.grad_accum - 1
                with contextlib.ExitStack() as stack:
                    if self.world > 1 and not last:
                        stack.enter_context(self.ddp_model.no_sync())
                    with self._autocast():
                        outputs = self.ddp_model(**(self.task.train_inputs or _model_inputs)(batch))
                    sums = self.task.loss_sums(outputs, batch)
                    loss = sum(s / max(c, 1) for s, c in zip(sums, counts)) / cfg.grad_accum
                    # this rank's share of the global mean; DDP divides the summed gradients by world
                    self.scaler.scale(loss * self.world).backward()
                step_loss += loss.detach()
            self._optimizer_step()
            if self.world > 1:
                dist.all_reduce(step_loss)
            self.step += 1
            window_loss += step_loss.item()
            window_steps += 1
            bar.update(1)

            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                elapsed = time.perf_counter() - window_time
                record = {"step": self.step, "loss": window_loss / window_steps,
                          "lr": self.scheduler.get_last_lr()[0],
                          "tokens_per_s": window_tokens / elapsed, "samples_per_s": window_samples / elapsed}
                self.metrics["history"].append(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
                window_time, window_tokens, window_samples, window_loss, window_steps = time.perf_counter(), 0, 0, 0.0, 0
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                self.evaluate()
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        bar.close()
        self.metrics["train_wall_time_s"] = time.perf_counter() - start_time
        final = self.evaluate() if self.task.evaluate else {}
        self.metrics["final"] = {"step": self.step, **final}
        self.save_checkpoint()
        self.save_final()
        return self.metrics

    def _optimizer_step(self):
        cfg = self.config
        if cfg.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def evaluate(self) -> dict:
        """Run the task's evaluation on rank 0 (the others wait) and record it."""
        result = {}
        if is_main_process() and self.task.evaluate:
            self.model.eval()
            with self._autocast():
                result = self.task.evaluate(self.model, self.device)
            self.model.train()
            self.metrics["eval"].append({"step": self.step, **result})
            self._write_metrics()
        _barrier()
        return result

    # ---- checkpoints -------------------------------------------------------------------------

    def save_final(self):
        if is_main_process():
            self._save_model(Path(self.config.output_dir))
            self._write_metrics()
        _barrier()

    def _save_model(self, directory: Path):
        self.model.save_pretrained(str(directory))
        if self.tokenizer is not None:
            self.tokenizer.save(directory)

    def save_checkpoint(self):
        """checkpoint-<step>/: the model in Hugging Face format, the tokenizer, and what resuming
        needs (optimizer, scheduler, grad scaler, step, every rank's RNG states)."""
        directory = Path(self.config.output_dir) / f"checkpoint-{self.step}"
        if is_main_process():
            self._save_model(directory)
            torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                        "config": asdict(self.config), "world_size": self.world},
                       directory / STATE_FILE)
        _barrier()
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        torch.save(rng, directory / f"rng_state_{self.rank}.pt")
        _barrier()
        if is_main_process() and self.config.save_total_limit:
            for old in sorted(_checkpoints(self.config.output_dir))[:-self.config.save_total_limit]:
                _remove_tree(old[1])

    def _load_state(self, directory: Path):
        """Restore everything but the weights (the caller loaded the model from `directory`)."""
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
        if state["world_size"] != self.world:
            raise ValueError(f"resume: checkpoint was written by {state['world_size']} processes, "
                             f"this run has {self.world}; exact resumption needs the same number")
        self.step = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        rng = torch.load(directory / f"rng_state_{self.rank}.pt", map_location="cpu", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if rng["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        metrics = Path(self.config.output_dir) / "metrics.json"
        if metrics.is_file():  # keep the history of the interrupted run
            previous = json.loads(metrics.read_text())
            self.metrics["history"] = [h for h in previous.get("history", []) if h["step"] <= self.step]
            self.metrics["eval"] = [e for e in previous.get("eval", []) if e["step"] <= self.step]
        self.metrics["resumed_from"] = str(directory)

    def _write_metrics(self):
        path = Path(self.config.output_dir) / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.metrics, indent=2))


def resolve_checkpoint(output_dir, where: str) -> Path:
    """The checkpoint directory to resume: `where`, or the newest in `output_dir` if "latest"."""
    if where == "latest":
        found = _checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"resume: no checkpoint-* directory in {output_dir}")
        return max(found)[1]
    path = Path(where)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume: {path} is not a checkpoint directory (no {STATE_FILE})")
    return path


def _checkpoints(output_dir):
    found = []
    for p in Path(output_dir).glob("checkpoint-*"):
        if p.is_dir() and p.name.split("-", 1)[1].isdigit() and (p / STATE_FILE).is_file():
            found.append((int(p.name.split("-", 1)[1]), p))
    return found


def _remove_tree(path: Path):
    for child in path.iterdir():
        _remove_tree(child) if child.is_dir() else child.unlink()
    path.rmdir()
