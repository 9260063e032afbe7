"""The training loop: stream minibatches, step the optimiser, validate, checkpoint, resume exactly.

Single-process and DDP runs share this code: ``DistContext`` says who we are, ``StreamLoader`` gives each rank
its own share of the global order with the same number of steps, and only rank 0 writes anything.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from loaders.collection import Collection
from loaders.plan import split_validation, validation_block
from loaders.registry import Registry
from loaders.stream import StreamConfig
from loaders.stream_loader import StreamLoader
from streamtotal.config import RunConfig
from streamtotal.data import open_collection
from streamtotal.device import resolve_device
from streamtotal.errors import CheckpointError, RunDirError
from streamtotal.model import native
from streamtotal.model.kl_schedule import kl_weight
from streamtotal.model.totalvi import TotalVAE
from streamtotal.training.checkpoint import CheckpointWriter, load_latest_checkpoint
from streamtotal.training.config_diff import config_differences
from streamtotal.training.gc_control import ManualGC
from streamtotal.training.distributed import DistContext
from streamtotal.training.init_from import initialise_from
from streamtotal.training.metrics_log import MetricsLog
from streamtotal.training.precision import autocast, compile_model, resolve_precision
from streamtotal.failure_injection import InjectedFailure, fail_at_step
from streamtotal.training.preemption import Preempted, PreemptionFlag
from streamtotal.training.priors import estimate_priors
from streamtotal.training.run_dir import RunDir
from streamtotal.training.validation import ValidationBatches, evaluate_elbo

logger = logging.getLogger(__name__)

# Train-config fields that may differ between a run and its resumption: they change neither the data order
# nor the optimisation.
_RESUMABLE_CHANGES = {"progress", "device", "threads", "checkpoint_every_steps", "keep_checkpoints", "log_every_steps",
                      "validation_cache_mb"}


@dataclass
class TrainSummary:
    """What a finished (or stopped) training run reports.

    Attributes:
        steps: optimiser steps taken in total.
        epochs: epochs completed.
        cells_per_second: training throughput of this invocation (cells seen / wall time of the loop).
        validation: the last validation metrics (empty when there are no validation cells).
        stopped_early: True when early stopping ended the run.
    """

    steps: int
    epochs: int
    cells_per_second: float
    validation: dict
    stopped_early: bool


_WINDOW_TERMS = ("loss", "rna_nll", "protein_nll", "kl_z", "kl_background")
"""Per-cell means the train log lines report (``loss`` is the batch mean, weighted by the batch's cells)."""


def resolve_prefetch_batches(prefetch_batches: int | None, device: torch.device) -> int:
    """``train.prefetch_batches``, with unset resolved for ``device`` (see its docstring): 0 on a CPU where torch's
    threads take every core this process may use, else 2."""
    if prefetch_batches is not None:
        return prefetch_batches
    if device.type != "cpu":
        return 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if torch.get_num_threads() >= cores else 2


def _adam_kernel(params, device: torch.device) -> dict:
    """Adam's implementation: the fused kernel (one pass over each tensor; on CPU ~1 ms a step against ~3 ms for
    the foreach loop and 8 ms for torch's default per-tensor loop) where it applies, else foreach.

    The fused kernel walks parameter, gradient and state as flat memory, so all must share one layout: the model's
    parameters are contiguous (``_match_param_layout`` brings loaded state in line). A parameter that is not
    (some user module) gets the foreach loop, which follows strides."""
    flat = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    if device.type in ("cpu", "cuda") and all(p.is_contiguous() for p in flat):
        return {"fused": True}
    return {"foreach": True}


def _match_param_layout(optimizer: torch.optim.Optimizer) -> None:
    """Gives loaded optimizer state its parameter's memory layout. A checkpoint keeps each tensor's strides, and an
    older run's state could be column-major where the parameter now is row-major: the fused Adam kernel would then
    pair each element with another's moments (exact resume caught this as a drift)."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _numpy_rng_state() -> dict:
    """numpy's global RNG state as a tensor and plain numbers: ``np.random.get_state()`` holds an ndarray, which a
    ``weights_only`` load would have to allow-list."""
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {"bit_generator": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def _set_numpy_rng_state(state: dict | tuple) -> None:
    """Restores numpy's global RNG from ``_numpy_rng_state`` (or from the tuple a version-1 checkpoint holds)."""
    if isinstance(state, dict):
        state = (state["bit_generator"], state["key"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                 state["cached_gaussian"])
    np.random.set_state(state)


def _resolve_train_defaults(config: RunConfig, saved: RunConfig | None) -> RunConfig:
    """``config`` with an unset batch size, learning rate and KL warm-up filled in: from the checkpoint's config
    ``saved`` when resuming (a run started before a change of those defaults resumes as it was trained), else from
    the model's defaults (``TrainConfig.resolved_for``)."""
    train = config.train
    if saved is not None:
        unset = ("batch_size", "lr", "kl_warmup_fraction")
        train = replace(train, **{k: getattr(saved.train, k) for k in unset if getattr(train, k) is None})
    return replace(config, train=train.resolved_for(config.model))


class Trainer:
    """Trains a totalVI model on a collection of stores.

    Args:
        config: the run configuration.
        run_dir: where checkpoints, metrics and the final model go.
        resume: continue from the newest checkpoint in ``run_dir`` (starts fresh when there is none).
        collection: an already-open collection (else opened from ``config.data.stores``).
        surgery: query mapping (``streamtotal.surgery.map_query.QuerySurgery``): train its prebuilt, partly
            frozen ``model`` with the optimiser param groups its ``param_groups(weight_decay)`` gives.

    Raises:
        RunDirError: ``run_dir`` already holds checkpoints and ``resume`` is False.
        CheckpointError: the checkpoint does not match this config or data.
    """

    def __init__(self, config: RunConfig, run_dir: str | Path, *, resume: bool = False,
                 collection: Collection | None = None, surgery=None) -> None:
        tc = config.train
        self.device = resolve_device(tc.device)
        self.dist = DistContext.from_environment(self.device)
        if self.device.type == "cuda" and self.dist.world_size > 1:
            self.device = torch.device("cuda", self.dist.local_rank)
        if tc.threads:  # process-wide, so only on request (0 = leave torch's setting alone)
            torch.set_num_threads(tc.threads)
        # The glibc allocator tuning (cpu_allocator.py) is process-wide too: the CLI makes it
        # (cli/process_settings.py), a library caller calls retain_freed_memory() if it wants it.
        # The data first: a store that cannot be opened must leave no new, empty run directory behind.
        self.collection = collection if collection is not None else open_collection(config.data)
        self.run_dir = RunDir(run_dir)
        self.registry: Registry = self.collection.registry

        checkpoint = None
        if self.run_dir.has_checkpoints():
            if not resume:
                raise RunDirError(
                    f"{self.run_dir.path} already holds checkpoints; pass --resume to continue that run, "
                    "or choose another --out"
                )
            checkpoint = load_latest_checkpoint(self.run_dir.path)[1]  # past a damaged newest one, warning
        saved = RunConfig.from_dict(checkpoint["config"], where="checkpoint config") if checkpoint is not None else None
        self.config = config = _resolve_train_defaults(config, saved)
        tc = config.train
        if checkpoint is not None:
            self._check_compatible(checkpoint, saved)

        # Checkpoints written before validation blocks existed (no key) held out single cells: keep their split.
        self.validation_block = (checkpoint.get("validation_block", 1) if checkpoint is not None
                                 else validation_block(self.collection.n_obs))
        self.train_ids, self.val_ids = split_validation(self.collection.n_obs, tc.validation_fraction, tc.seed,
                                                        block=self.validation_block)
        self._seed_everything(tc.seed)
        self.loader = StreamLoader(
            self.collection,
            self.train_ids,
            StreamConfig(batch_size=tc.batch_size, chunk_size=tc.chunk_size, io_chunks=tc.io_chunks, shuffle=True,
                         seed=tc.seed, num_workers=tc.num_workers,
                         prefetch_batches=resolve_prefetch_batches(tc.prefetch_batches, self.device),
                         read_threads=tc.read_threads,
                         pin_memory=self.device.type == "cuda"),
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        # Validation re-evaluates the same cells every epoch: read them once (see ValidationBatches).
        self.validation_batches = ValidationBatches(
            self.collection, self.val_ids, dist=self.dist, batch_size=max(tc.batch_size, 1024), seed=tc.seed,
            max_bytes=tc.validation_cache_mb << 20) if len(self.val_ids) else None
        self.epochs = tc.epochs_for(len(self.train_ids))
        self.steps_per_epoch = len(self.loader)
        self.total_steps = self.epochs * self.steps_per_epoch

        if checkpoint is None and not tc.init_from and surgery is None:
            protein_prior, library_prior = estimate_priors(
                self.collection, self.train_ids, self.registry.n_batch, seed=tc.seed,
                progress=tc.progress and self.dist.is_main,
            )
        else:
            protein_prior = library_prior = None  # the checkpoint's (or --from run's) weights hold them
        if surgery is not None:
            self.model = surgery.model
        else:
            self.model = TotalVAE(config.model, self.registry.n_genes, self.registry.n_proteins,
                                 self.registry.n_batch, protein_prior=protein_prior, library_prior=library_prior,
                                 n_labels=self.registry.n_labels)
        if checkpoint is None and tc.init_from:
            initialise_from(self.model, self.registry, tc.init_from)
        self.model = self.model.to(self.device)
        self.precision = resolve_precision(tc.precision, self.device)
        self.ddp_model = self.dist.wrap(self.model)
        # The training forward may run compiled; validation, checkpoints and inference use the plain module.
        self.step_model = compile_model(self.ddp_model, self.device) if tc.compile else self.ddp_model
        params = surgery.param_groups(tc.weight_decay) if surgery is not None else self.model.vae_parameters()
        self.optimizer = torch.optim.Adam(params, lr=tc.effective_lr(self.dist.world_size, config.model),
                                          eps=tc.eps, weight_decay=tc.weight_decay, **_adam_kernel(params, self.device))
        self.adv_optimizer = None
        if config.model.adversarial_classifier:
            self.adv_optimizer = torch.optim.Adam(self.model.classifier_parameters(), lr=tc.adversarial_lr,
                                                  eps=tc.eps, weight_decay=tc.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=tc.lr_factor, patience=tc.lr_patience, threshold=0.0)
        self.checkpoints = CheckpointWriter()
        self.metrics = MetricsLog(self.run_dir.metrics_path, enabled=self.dist.is_main)

        self.step = 0
        self.epoch = 0
        self.best_val = float("inf")
        self.epochs_without_improvement = 0
        self.stopped_early = False
        self.last_validation: dict = {}
        self._resume_mid_epoch = False
        if checkpoint is not None:
            self._restore(checkpoint)
        elif self.dist.is_main:
            self.run_dir.write_config(config, self.registry)

    # ---------------------------------------------------------------- checkpoint state
    def _check_compatible(self, ckpt: dict, saved: RunConfig) -> None:
        if ckpt.get("world_size", 1) != self.dist.world_size:
            raise CheckpointError(
                f"the checkpoint in {self.run_dir.path} was written by a job of {ckpt.get('world_size', 1)} "
                f"process(es) and this job has {self.dist.world_size}: each rank's share of the data order depends "
                "on the world size, so resume with the same number of processes (nodes x processes per node)"
            )
        changed = config_differences(saved.to_dict(), self.config.to_dict(), ignore={"train": _RESUMABLE_CHANGES})
        if changed:
            raise CheckpointError(
                f"cannot resume {self.run_dir.path}: its checkpoint was trained with other settings:\n  "
                + "\n  ".join(changed)
                + f"\n[data] and [model] must match, and so must the [train] settings that change the data order or "
                f"the optimisation; resume with the run's own {self.run_dir.path / 'config.toml'}, or start a new run "
                "directory"
            )
        if Registry.from_dict(ckpt["registry"]) != self.registry:
            raise CheckpointError(
                f"the data in {list(self.config.data.stores)} no longer match the checkpoint's registry (genes, "
                "proteins, batches or labels changed); resume on the same stores"
            )

    def _state(self) -> dict:
        return {
            "format": "streamtotal-checkpoint",
            "version": 2,  # 2: numpy's RNG state as tensors and numbers (loadable with weights_only=True)
            "step": self.step,
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "adv_optimizer": self.adv_optimizer.state_dict() if self.adv_optimizer else None,
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": _numpy_rng_state(),
                "python": random.getstate(),
            },
            "train_state": {
                "best_val": self.best_val,
                "epochs_without_improvement": self.epochs_without_improvement,
                "stopped_early": self.stopped_early,
                "last_validation": self.last_validation,
            },
            "config": self.config.to_dict(),
            "registry": self.registry.to_dict(),
            "world_size": self.dist.world_size,
            "validation_block": self.validation_block,
        }

    def _restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        _match_param_layout(self.optimizer)
        if self.adv_optimizer is not None and ckpt["adv_optimizer"] is not None:
            self.adv_optimizer.load_state_dict(ckpt["adv_optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.loader.load_state_dict(ckpt["loader"])
        self.step, self.epoch = ckpt["step"], ckpt["epoch"]
        ts = ckpt["train_state"]
        self.best_val = ts["best_val"]
        self.epochs_without_improvement = ts["epochs_without_improvement"]
        self.stopped_early = ts["stopped_early"]
        self.last_validation = ts["last_validation"]
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        _set_numpy_rng_state(rng["numpy"])
        random.setstate(rng["python"])
        self._resume_mid_epoch = ckpt["loader"]["epoch"] == self.epoch
        self.metrics.truncate_after(self.step)

    def _checkpoint(self, wait: bool = False) -> None:
        """Checkpoints the current step, written in the background (``wait``: on disk before returning)."""
        if self.dist.is_main:
            self.metrics.flush()  # object storage keeps records in memory: persist those up to this checkpoint
            self.checkpoints.submit(self.run_dir.path, self.step, self._state(),
                                    keep=self.config.train.keep_checkpoints)
            if wait:
                self.checkpoints.wait()
        self.dist.barrier()

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    # ---------------------------------------------------------------- the loop
    def fit(self, stop_after_steps: int | None = None) -> TrainSummary:
        """Trains until ``max_epochs`` (or early stopping), checkpointing as configured.

        Args:
            stop_after_steps: stop (without a checkpoint, as a killed job would) once this many optimiser steps
                have been taken in total. For tests of resumption.

        Returns:
            A TrainSummary.
        """
        tc = self.config.train
        start_step, start_time, cells = self.step, time.perf_counter(), 0
        logger.info("likelihoods and layers computed by %s", native.describe())
        preemption = PreemptionFlag().install()
        fail_at = fail_at_step()
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc="train",
                   disable=not (tc.progress and self.dist.is_main), dynamic_ncols=True)
        self.model.train()
        collector = ManualGC(every=100).start()
        try:
            while self.epoch < self.epochs and not self.stopped_early:
                if self._resume_mid_epoch:
                    self._resume_mid_epoch = False  # the loader already skips the batches this epoch consumed
                else:
                    self.loader.set_epoch(self.epoch)
                # Reading in the background, the next epoch's first reads start while this one's last batches train.
                self.loader.set_read_ahead(self.epoch + 1 if self.epoch + 1 < self.epochs else None)
                # Sums of the logged terms since the last log line, kept on the training device: reading them every
                # step (.item()) would make each step wait for the GPU.
                window = torch.zeros(len(_WINDOW_TERMS), dtype=torch.float64, device=self.device)
                window_cells, window_start = 0, time.perf_counter()
                for batch in self.loader:
                    n = len(batch)
                    batch = batch.to(self.device, non_blocking=True)
                    weight = kl_weight(self.step, self.total_steps, tc.kl_warmup_fraction)
                    out = self._train_step(batch, weight)
                    self.step += 1
                    collector.step()
                    cells += n
                    window += torch.stack([out.loss.detach() * n, *(getattr(out, t).detach().sum()
                                                                     for t in _WINDOW_TERMS[1:])]).double()
                    window_cells += n
                    bar.update(1)
                    if self.step % tc.log_every_steps == 0:
                        rate = window_cells / max(time.perf_counter() - window_start, 1e-9)
                        self._log_train(window, window_cells, weight, rate, bar)
                        window.zero_()
                        window_cells, window_start = 0, time.perf_counter()
                    if stop_after_steps is not None and self.step >= stop_after_steps:
                        self.checkpoints.wait()
                        return self._summary(start_step, start_time, cells)
                    if fail_at is not None and self.step == fail_at:
                        raise InjectedFailure(f"injected failure after step {fail_at} (STREAMTOTAL_FAIL_AT_STEP)")
                    if self._stop_requested(preemption):
                        self._checkpoint(wait=True)
                        if self.dist.is_main:
                            logger.info("streamtotal: signal %s received; checkpointed step %d in %s; rerun with "
                                        "--resume to continue", preemption.signum or "on another rank", self.step,
                                        self.run_dir.path)
                        raise Preempted(preemption.signum or 15, self.step)
                    # The end-of-epoch checkpoint follows validation; one just before it would be redundant.
                    if self.step % tc.checkpoint_every_steps == 0 and self.loader.batches_remaining > 0:
                        self._checkpoint()
                self._end_epoch()
                collector.epoch_end()
        except BaseException:
            self.checkpoints.wait(raise_error=False)  # the write in progress still lands; the error goes up
            raise
        finally:
            collector.stop()
            bar.close()
            preemption.uninstall()
        if self.dist.is_main:
            self.run_dir.write_final_model(self.model, self.config, self.registry)
            self.metrics.flush()
        self.checkpoints.wait()
        return self._summary(start_step, start_time, cells)

    def _stop_requested(self, preemption: PreemptionFlag) -> bool:
        """Whether any rank received a stop signal (all ranks must stop at the same step, or DDP hangs)."""
        if not self.dist.is_distributed:
            return preemption.requested
        flag = torch.tensor([1.0 if preemption.requested else 0.0])
        return bool(self.dist.all_reduce_sum(flag)[0] > 0)

    def _train_step(self, batch, weight: float):
        with autocast(self.precision, self.device):
            out = self.step_model(batch, kl_weight=weight)
        loss = out.loss
        if self.adv_optimizer is not None:
            # As scvi-tools: the adversary pulls hardest early and fades out as the KL warm-up ends (1 - kl_weight).
            loss = loss + self.model.adversarial_fool_loss(out.z, batch.batch) * (1.0 - weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.adv_optimizer is not None:
            self.adv_optimizer.zero_grad(set_to_none=True)
            self.model.adversarial_classifier_loss(out.z.detach(), batch.batch).backward()
            self.adv_optimizer.step()
        return out

    def _log_train(self, window: torch.Tensor, cells: int, weight: float, rate: float, bar: tqdm) -> None:
        totals = self.dist.all_reduce_sum(torch.cat([window.cpu(), torch.tensor([float(cells)], dtype=torch.float64)]))
        n = max(float(totals[-1]), 1.0)
        record = {
            "kind": "train", "step": self.step, "epoch": self.epoch,
            **{term: float(total) / n for term, total in zip(_WINDOW_TERMS, totals.tolist())},
            "kl_weight": weight, "lr": self.optimizer.param_groups[0]["lr"],
            "cells_per_s": rate * self.dist.world_size,
        }
        self.metrics.write(record)
        bar.set_postfix(loss=f"{record['loss']:.1f}", kl_w=f"{weight:.2f}", cells_s=f"{record['cells_per_s']:.0f}")

    def _end_epoch(self) -> None:
        tc = self.config.train
        if len(self.val_ids):
            # In float32 whatever the training precision, so validation figures compare across precisions.
            self.last_validation = evaluate_elbo(self.model, self.collection, self.val_ids, dist=self.dist,
                                                 device=self.device, seed=tc.seed,
                                                 batches=self.validation_batches)
            self.metrics.write({"kind": "validation", "step": self.step, "epoch": self.epoch,
                                **{f"val_{k}": v for k, v in self.last_validation.items()}})
            value = self.last_validation["neg_elbo"]
            if tc.reduce_lr_on_plateau:
                self.scheduler.step(value)
            if value < self.best_val:
                self.best_val, self.epochs_without_improvement = value, 0
            else:
                self.epochs_without_improvement += 1
                if tc.early_stopping_patience and self.epochs_without_improvement >= tc.early_stopping_patience:
                    self.stopped_early = True
        self.epoch += 1
        self._checkpoint()

    def _summary(self, start_step: int, start_time: float, cells: int) -> TrainSummary:
        elapsed = max(time.perf_counter() - start_time, 1e-9)
        return TrainSummary(steps=self.step, epochs=self.epoch, cells_per_second=cells * self.dist.world_size / elapsed,
                            validation=self.last_validation, stopped_early=self.stopped_early)
