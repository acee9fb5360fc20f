"""`Trainer(cfg).fit()`: the training loop on a DeepSpeed engine.

One optimizer step = grad_accum micro-batches per rank. After each applied step the experts' token counts are
summed over data-parallel ranks and the router biases move toward balance. Metrics are reduced across ranks
only every log_every steps; the one host sync per step is the finite-gradient check that decides whether the
update is applied (plus, on several ranks, one all-reduce of the stop flag: see train/preemption.py). Losses of
steps whose update was skipped as non-finite are counted, not averaged into the logged loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ondol.configs import RunConfig, config_dict, data_dir, model_dir, to_yaml, tokenizer_dir
from ondol.errors import ConfigError, DataError, TrainError
from ondol.files import LOCK, exclusive_lock, move_aside, write_atomic
from ondol.train import checkpoint, expert_parallel, phases, state_shards
from ondol.train.engine import build_engine, build_model, cpu_threads, deepspeed_zero_stage, init_distributed
from ondol.train.evaluation import InLoopBitsPerByte
from ondol.train.fast_paths import apply_compile_and_checkpointing, loss_chunk_tokens
from ondol.train.metrics import MetricsSink, detect_peak_tflops, memory_gib, plot_losses, read_metrics
from ondol.train.preemption import Preempted, StopRequest, stop_file
from ondol.train.qk_clip import QKClip
from ondol.train.schedule import phase_lr_at
from ondol.train.sequence_parallel import apply_sequence_parallel, data_parallel


class NonFiniteError(TrainError):
    """Too many optimizer steps in a row had non-finite loss or gradients."""


class NothingToTrain(TrainError):
    """The checkpoint to resume from is already past train.steps."""


class Trainer:
    def __init__(self, cfg: RunConfig) -> None:
        from ondol.data.loader import MixPhase, TokenLoader
        from ondol.data.shards import check_tokenizer, read_manifest
        from ondol.tokenizer.tokenizer import Tokenizer

        self.env = init_distributed(cfg)
        self.threads = (torch.get_num_threads(), "")  # (count, where from): set for CPU ranks
        if self.env.device.type == "cpu":
            self.threads = cpu_threads(cfg.train.cpu_threads)
            torch.set_num_threads(self.threads[0])
        tokenizer = Tokenizer.load(tokenizer_dir(cfg))
        if cfg.model.vocab_size == 0:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size))
        elif cfg.model.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                             f"{tokenizer.vocab_size} at {tokenizer_dir(cfg)}: set model.vocab_size=0 to take it")
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        manifest = read_manifest(data_dir(cfg))
        check_tokenizer(data_dir(cfg), manifest, tokenizer)

        _seed_everything(cfg.seed)
        self.model = build_model(cfg, self.env)  # only this rank's share materialised; the same for every layout
        self.sp = apply_sequence_parallel(self.model, cfg.deepspeed.sequence_parallel_size)  # None: size 1
        apply_compile_and_checkpointing(self.model, cfg.train)
        self.loss_kwargs = {"loss_chunk": loss_chunk_tokens(cfg.train, self.env.device, cfg.deepspeed.zero_stage),
                            "compile_loss": cfg.train.compile}
        self.engine, self.optimizer = build_engine(self.model, cfg, self.env)
        # the attention's largest logit, logged (and with optim.qk_clip clipped); flash-attn does not return it
        self.qk_clip = None
        if cfg.model.attn_backend != "flash":
            zero = None if self.engine.optimizer is self.optimizer else self.engine.optimizer
            self.qk_clip = QKClip(self.engine.module, cfg.optim.qk_clip, zero)
            if cfg.optim.qk_clip > 0:
                self.optimizer.after_update = self.qk_clip.after_update
        self.moe_layers = self.engine.module.moe_layers()
        self.moe_layer_ids = [i for i in range(cfg.model.n_layers) if cfg.model.is_moe_layer(i)]
        tr, env = cfg.train, self.env
        self.manifest = manifest
        self.plan = phases.resolve(cfg, _mixture_weights(cfg, manifest) or manifest["weights"])
        for i, phase in enumerate(self.plan):
            if unknown := sorted(set(phase.weights) - set(manifest["weights"])):
                raise DataError(f"train.phases[{i}].weights: {unknown} are not in {data_dir(cfg)} (prepared: "
                                f"{sorted(manifest['weights'])}): add them to data.sources and re-run `ondol data "
                                "prepare CONFIG`")
        chat = sorted({e["name"] for e in manifest["sources"] if "chat" in e
                       for p in self.plan if p.weights.get(e["name"], 0) > 0})
        if chat and not cfg.model.document_masking:
            raise ConfigError(f"chat sources {chat} are packed whole conversations that must not attend to each "
                              "other: set model.document_masking=true")
        # the ranks of a sequence-parallel group load the same rows and each keeps its shard of them
        dp_rank, dp_size = data_parallel(env.rank, env.world_size, cfg.deepspeed.sequence_parallel_size)
        self.sequences_per_step = tr.micro_batch_size * tr.grad_accum * dp_size
        self.loader = TokenLoader(data_dir(cfg), "train", cfg.data.seq_len, tr.micro_batch_size, dp_rank, dp_size,
                                  seed=cfg.seed,
                                  phases=[MixPhase(p.start * self.sequences_per_step, p.weights, p.seq_len)
                                          for p in self.plan])
        # what decides whether a checkpoint can continue this run (checkpoint.check_compatible)
        self.meta = {"model": config_dict(cfg.model), "tokenizer_fingerprint": tokenizer.fingerprint,
                     "data_hash": manifest["hash"], "phases": [p.to_dict() for p in self.plan], "plan_changes": [],
                     "zero_stage": deepspeed_zero_stage(cfg.deepspeed), "world_size": self.env.world_size,
                     "expert_parallel_size": cfg.deepspeed.expert_parallel_size,
                     "sequence_parallel_size": cfg.deepspeed.sequence_parallel_size,
                     "seed": cfg.seed, "precision": cfg.deepspeed.precision, "cpu_threads": self.threads[0],
                     "optimizer": cfg.optim.name}
        peak, self.peak_source = detect_peak_tflops(env.device, cfg.logging.peak_tflops, cfg.deepspeed.precision)
        self.peak_flops = self._sum_over_ranks(peak * 1e12)  # CPU ranks measured together: their shared cores
        self.bits_per_byte = (InLoopBitsPerByte(data_dir(cfg), tokenizer, tr.eval_bpb_tokens, cfg.data.seq_len,
                                                manifest["bos"]) if tr.eval_bpb_tokens else None)
        # every phase's validation mixture at its length, built now so a phase that cannot be read fails at start
        self.val_loaders = [TokenLoader(data_dir(cfg), "val", p.seq_len, tr.micro_batch_size, dp_rank, dp_size,
                                        seed=cfg.seed, weights=p.weights) for p in self.plan]
        self.phase = -1
        self._enter_phase(0)
        self.accepted: list[str] = []  # deliberate changes a resume made (checkpoint.check_compatible)
        self.step = 0
        self.tokens_seen = 0  # summed per step, so it stays exact when a resume changes the batch
        self.nonfinite = {"total": 0, "in_a_row": 0}
        self._reset_interval()

    # ---- phases ------------------------------------------------------------------------------------------
    def _continue_loader(self, state: dict) -> None:
        """The training loader where the checkpoint left it: the segments it drew from before its position are
        the checkpoint's (as they ran, also where train.allow_seq_len_change lengthens data.seq_len now); the
        rest are this plan's, placed from that position at this run's sequences per step (a resume may change
        the batch or the number of ranks)."""
        from ondol.data.loader import MixPhase, TokenLoader

        position = int(state["position"])
        drawn = [p for p in TokenLoader.saved_phases(state) if p.start < position]
        ahead = [MixPhase(position + max(p.start - self.step, 0) * self.sequences_per_step, p.weights, p.seq_len)
                 for p in self.plan if p.end > self.step]
        self.loader.set_phases(drawn + ahead)
        self.loader.load_state_dict(state)

    def _enter_phase(self, index: int) -> None:
        """Set what follows the phase (train/phases.py): the validation mixture and length, tokens and FLOPs
        per step, the context of bits per byte. The training loader switches by itself, at its global index."""
        from ondol.model.flops import train_flops_per_token

        if index == self.phase:
            return
        self.phase, phase = index, self.plan[index]
        self.val_loader = self.val_loaders[index]
        self.tokens_per_step = self.sequences_per_step * phase.seq_len
        self.flops_per_token = train_flops_per_token(self.cfg.model, phase.seq_len)
        if self.bits_per_byte is not None:
            self.bits_per_byte.context = phase.seq_len

    def plan_lines(self) -> list[str]:
        """The phase plan as the run header shows it: per phase its steps, length, rate and each source's
        expected share of its sequences with the epochs over that source's train sequences it draws."""
        from ondol.data.loader import planned_mix

        lines = []
        for i, p in enumerate(self.plan):
            mix = planned_mix(self.manifest, p.weights, p.seq_len, p.steps * self.sequences_per_step)
            shares = ", ".join(f"{n} {share:.1%} ({epochs:.2f} epochs)" for n, (share, epochs) in mix.items() if share)
            lines.append(f"phase {i + 1}/{len(self.plan)} {p.name}: steps {p.start} -> {p.end}, seq_len "
                         f"{p.seq_len}, lr {p.lr_text}; {shares}")
        return lines

    # ---- state -------------------------------------------------------------------------------------------
    def _reset_interval(self) -> None:
        """Sums over the steps since the last log line (kept in checkpoints so a resume logs the same)."""
        # loss and aux loss summed over finite micro-batches, their count, all micro-batches
        zeros = torch.zeros(4, dtype=torch.float64, device=self.env.device)
        loads = torch.zeros(len(self.moe_layers), self.cfg.model.n_experts, device=self.env.device)
        self.interval = {"sums": zeros, "loads": loads, "t0": time.perf_counter(), "untimed_steps": 0}

    def _sum_over_ranks(self, value: float) -> float:
        if self.env.world_size == 1:
            return value
        total = torch.tensor(value, dtype=torch.float64, device=self.env.device)
        dist.all_reduce(total)
        return float(total)

    def _client_state(self) -> dict:
        """Collective. Interval sums are stored summed over ranks (loads already are), so a resume on any number
        of ranks logs the same values."""
        sums = self.interval["sums"].clone()
        if self.env.world_size > 1:
            dist.all_reduce(sums)
        return {"step": self.step, "tokens_seen": self.tokens_seen, "loader": self.loader.state_dict(),
                "nonfinite": dict(self.nonfinite),
                "interval_sums": sums.cpu(), "interval_loads": self.interval["loads"].cpu()}

    def _resume(self, finished_ok: bool) -> None:
        mode = self.cfg.train.resume
        if mode == "never":
            if self.env.is_main and self.ckpt_dir.exists():
                aside = move_aside(self.ckpt_dir)
                print(f"train.resume=never: moved the earlier checkpoints to {aside} (delete it when no longer "
                      "needed)", flush=True)
            dist.barrier()
            return
        report = (lambda line: print(line, flush=True)) if self.env.is_main else None
        folder = checkpoint.latest_checkpoint(self.ckpt_dir, report) if mode == "auto" else Path(mode)
        if folder is None:
            return
        if not checkpoint.is_complete(folder):
            raise checkpoint.IncompatibleCheckpoint(f"train.resume={mode}: {folder} is not a complete checkpoint "
                                                    f"(no {checkpoint.META}); give a folder under {self.ckpt_dir}")
        if problem := checkpoint.damage(folder):
            raise checkpoint.IncompatibleCheckpoint(f"train.resume={mode}: {problem}: the checkpoint is damaged; "
                                                    f"point train.resume at another one under {self.ckpt_dir}")
        accepted = checkpoint.check_compatible(folder, self.meta, phases_declared=bool(self.cfg.train.phases),
                                               allow_seq_len_change=self.cfg.train.allow_seq_len_change)
        saved = checkpoint.read_meta(folder)
        saved_step, steps = int(saved["step"]), self.cfg.train.steps
        if saved_step > steps or (saved_step == steps and not finished_ok):
            where = "past" if saved_step > steps else "already at"
            raise NothingToTrain(f"{folder} is at step {saved_step}, {where} train.steps={steps}: nothing to train. "
                                 f"Set train.steps above {saved_step} to train further (the schedule stretches to "
                                 "the new length), or train.resume=never to start over")
        reshard = checkpoint.layout_changed(folder, self.meta)
        state = (checkpoint.load_resharded if reshard else checkpoint.load)(self.engine, folder, self.env.rank,
                                                                          self.cfg.seed)
        self.step = int(state["step"])
        # checkpoints written before tokens_seen was kept: as counted then, at this run's batch
        self.tokens_seen = int(state.get("tokens_seen", self.step * self.tokens_per_step))
        self._continue_loader(state["loader"])
        self._enter_phase(phases.phase_index(self.plan, self.step))
        self.accepted = accepted
        self.meta["plan_changes"] = [*saved.get("plan_changes", []), *({"step": self.step, "change": line}
                                                                       for line in accepted)]
        self.nonfinite = dict(state["nonfinite"])
        if self.env.device.type == "cpu" and saved.get("cpu_threads"):  # auto repeats the saved run's count
            self.threads = cpu_threads(self.cfg.train.cpu_threads, saved["cpu_threads"])  # (the same fp32 sums)
            torch.set_num_threads(self.threads[0])
            self.meta["cpu_threads"] = self.threads[0]
        if self.env.is_main:  # the other ranks start their share of the interval from zero
            self.interval["sums"].copy_(state["interval_sums"])
        self.interval["loads"].copy_(state["interval_loads"])
        if self.env.is_main:
            how = f" (resharded from its layout {checkpoint.describe_layout(folder)})" if reshard else ""
            print(f"resumed from {folder} at step {self.step}{how}", flush=True)
            if self.step == steps:
                print(f"already trained to train.steps={steps}: nothing to train, the final weights are written "
                      "again (set train.steps higher to continue)", flush=True)

    def _initialise(self) -> str:
        """train.init_from's weights in place of the fresh initialisation (a new run, not a resume)."""
        from ondol.train.init_from import keep_tokenizer, load_initial_weights

        if self.env.is_main:
            keep_tokenizer(tokenizer_dir(self.cfg), self.run_dir)
        return load_initial_weights(self.engine, self.optimizer, self.cfg.train.init_from, self.meta,
                                    tokenizer_dir(self.cfg))

    def _record_config(self) -> None:
        """RUN_DIR/config.yaml: the config of the latest attempt that started training (what `ondol eval` and
        `ondol generate` read, so it always matches the checkpoints); each attempt's is kept in RUN_DIR/configs."""
        text = to_yaml(self.cfg)
        history = self.run_dir / "configs"
        history.mkdir(parents=True, exist_ok=True)
        attempt = 1 + max((int(p.stem.split("-")[1]) for p in history.glob("attempt-*.yaml")
                           if p.stem.split("-")[1].isdigit()), default=0)
        write_atomic(history / f"attempt-{attempt}.yaml",
                     f"# attempt {attempt}, started {time.strftime('%Y-%m-%d %H:%M:%S')} at step {self.step}\n{text}")
        write_atomic(self.run_dir / "config.yaml", text)

    def save(self) -> Path:
        return checkpoint.save(self.engine, self.ckpt_dir, self.step, self._client_state(), self.meta,
                               self.env.rank, self.cfg.train.keep_last)

    # ---- loop --------------------------------------------------------------------------------------------
    def fit(self, finished_ok: bool = False) -> dict:
        """Train to train.steps; raises Preempted after saving when asked to stop (train/preemption.py). A run
        whose checkpoint is already at train.steps raises NothingToTrain, unless `finished_ok` (`ondol run`
        reuses finished stages): then only the final weights are written again."""
        cfg, tr = self.cfg, self.cfg.train
        # rank 0 writes checkpoints' meta.json and metrics: it alone holds the run directory's lock
        lock = exclusive_lock(self.run_dir / LOCK, TrainError) if self.env.is_main else contextlib.nullcontext()
        with lock, StopRequest(tr.stop_signals, stop_file(self.run_dir), self.env.device,
                               self.env.world_size) as stop:
            self._resume(finished_ok)
            initialised = self._initialise() if self.step == 0 and tr.init_from else None
            sink = None
            if self.env.is_main:
                if self.step < tr.steps:
                    self._record_config()
                sink = MetricsSink(self.run_dir, tr.steps, self.step, cfg.logging, cfg.logging.progress,
                                   config_dict(cfg))
                sink.header(cfg, self.env.world_size, self.flops_per_token, self.peak_flops, self.peak_source,
                            self.step)
                for line in self.plan_lines() if tr.phases else ():
                    sink.log(line)
                for line in self.accepted:
                    sink.log(f"resumed at step {self.step} with a deliberate change (recorded in its checkpoints): "
                             f"{line}")
                if self.env.device.type == "cpu":
                    sink.log(f"cpu threads: {self.threads[0]} per rank ({self.threads[1]}; train.cpu_threads "
                             "sets it)")
                if initialised:
                    sink.log(initialised)
            try:
                self._loop(sink, stop)
            finally:
                if sink is not None:
                    sink.close()
        return self._summary()

    def _loop(self, sink: MetricsSink | None, stop: StopRequest) -> None:
        tr = self.cfg.train
        if self.step == 0:
            self._emit(sink, self._evaluation())
        self.interval["t0"] = self.started = time.perf_counter()
        warming_up = tr.compile  # the first step compiles: its time and tokens stay out of tokens/s
        while self.step < tr.steps:
            started = time.perf_counter()
            self.train_step()
            if warming_up:
                self.interval["t0"] += time.perf_counter() - started
                self.interval["untimed_steps"] += 1
                warming_up = False
            last = self.step == tr.steps
            if self.step % tr.log_every == 0 or last:
                self._emit(sink, self._interval_metrics())
            paused = time.perf_counter()  # evaluation and checkpoint time is not training throughput
            if self.step % tr.eval_every == 0 or last:
                self._emit(sink, self._evaluation())
            saved = self.step % tr.save_every == 0 or last
            if saved:
                self.save()
            if not last and stop.agreed():
                if not saved:
                    self.save()
                stop.saved = True
                if self.env.is_main:
                    stop.stop_path.unlink(missing_ok=True)
                raise Preempted(self.step, stop.reason)
            self.interval["t0"] += time.perf_counter() - paused
            if sink is not None:
                sink.advance(self.step)
        self.save_final_weights()

    def train_step(self) -> None:
        self._enter_phase(phases.phase_index(self.plan, self.step))
        lr = phase_lr_at(self.step, self.plan, self.cfg.optim, self.cfg.train.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.applied = False
        # the update RMS per kind of parameter and the largest attention logit are measured at log steps only;
        # the logit at every step under QK-clip, which needs it, and never for compiled blocks without it (a
        # switch at log steps would compile each block twice)
        log_step = (self.step + 1) % self.cfg.train.log_every == 0 or self.step + 1 == self.cfg.train.steps
        self.optimizer.track_updates = log_step
        measure = self.qk_clip is not None and (self.qk_clip.threshold > 0 or
                                                (log_step and not self.cfg.train.compile))
        if self.qk_clip is not None:
            self.qk_clip.track(measure)
        accum = self.cfg.train.grad_accum
        step_sums = torch.zeros(2, dtype=torch.float64, device=self.env.device)
        for i in range(accum):
            out, loss, mtp_loss = self._forward(next(self.loader))
            self.engine.backward(loss + out.aux_loss + mtp_loss)  # mtp_loss: 0 without MTP
            if measure and i == accum - 1:  # before the step that updates (and clips)
                out.metrics.update(self.qk_clip.measure(self.env.world_size))
            self.engine.step()
            step_sums[0] += loss.detach()
            step_sums[1] += out.aux_loss.detach()
        self.last_lr, self.last_metrics = lr, out.metrics
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        self.interval["sums"][3] += accum
        if self.optimizer.applied:
            self.interval["sums"][:2] += step_sums
            self.interval["sums"][2] += accum
            self.nonfinite["in_a_row"] = 0
            self._update_router_biases()
            return
        for moe in self.moe_layers:
            moe.tokens_per_expert.zero_()
        self.nonfinite["total"] += 1
        self.nonfinite["in_a_row"] += 1
        if self.env.is_main:
            print(f"step {self.step}: non-finite loss or gradients, update skipped "
                  f"({self.nonfinite['in_a_row']} in a row, {self.nonfinite['total']} in total)", flush=True)
        if self.nonfinite["in_a_row"] >= self.cfg.train.max_nonfinite:
            raise NonFiniteError(
                f"stopping at step {self.step}: {self.nonfinite['in_a_row']} optimizer steps in a row had "
                f"non-finite loss or gradients (train.max_nonfinite={self.cfg.train.max_nonfinite}). The last good "
                f"checkpoint is kept in {self.ckpt_dir}; lower optim.lr or check the data, then resume")

    def _forward(self, batch: dict[str, torch.Tensor]):
        """(model output, LM loss, MTP loss) of one micro-batch on this rank; under sequence parallelism the
        forward on this rank's shard and its shares of the rows' mean losses (train/sequence_parallel.py)."""
        batch = {k: v.to(self.env.device, non_blocking=True) for k, v in batch.items()}
        if self.sp is None:
            out = self.engine(batch["input_ids"], labels=batch["labels"], doc_ids=batch["doc_ids"],
                              **self.loss_kwargs)
            return out, out.loss, out.mtp_loss
        shard = self.sp.shard(batch)
        with self.sp.sharded():
            out = self.engine(shard["input_ids"], labels=shard["labels"], doc_ids=shard["doc_ids"],
                              positions=shard["positions"], next_ids=shard.get("next_ids"),
                              next_labels=shard.get("next_labels"), **self.loss_kwargs)
        return out, *self.sp.losses(out, shard)

    def _update_router_biases(self) -> None:
        if not self.moe_layers:
            return
        loads = torch.stack([moe.tokens_per_expert for moe in self.moe_layers])
        if self.env.world_size > 1:
            dist.all_reduce(loads)
            for moe, load in zip(self.moe_layers, loads):
                moe.tokens_per_expert.copy_(load)
        self.interval["loads"] += loads
        self.engine.module.update_router_biases()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over eval_batches micro-batches per rank of the fixed validation order."""
        state = self.val_loader.state_dict()
        self.val_loader.load_state_dict({**state, "position": 0})
        self.engine.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.env.device)
        for _ in range(self.cfg.train.eval_batches):
            total += self._forward(next(self.val_loader))[1]
        self.engine.train()
        return self._sum_over_ranks(float(total)) / (self.cfg.train.eval_batches * self.env.world_size)

    def _evaluation(self) -> dict:
        """The validation loss, and bits per byte per source of held-out text unless train.eval_bpb_tokens=0."""
        record = {"step": self.step, "val_loss": self.evaluate()}
        if self.bits_per_byte is not None:
            record.update(self.bits_per_byte(self.engine.module))
        return record

    def _interval_metrics(self) -> dict:
        sums = self.interval["sums"].clone()
        if self.env.world_size > 1:
            dist.all_reduce(sums)
        sums = sums.tolist()
        finite = sums[2] or float("nan")  # an interval of skipped steps only has no loss to report
        elapsed = time.perf_counter() - self.interval["t0"]
        steps = sums[3] / (self.cfg.train.grad_accum * self.env.world_size)
        timed = steps - self.interval["untimed_steps"]
        tokens_per_s = timed * self.tokens_per_step / elapsed if timed else float("nan")
        grad_norm = self.engine.get_global_grad_norm()
        record = {"step": self.step, "loss": sums[0] / finite, "aux_loss": sums[1] / finite, "lr": self.last_lr,
                  "grad_norm": None if grad_norm is None else float(grad_norm), "tokens_per_s": tokens_per_s,
                  "steps_per_s": timed / elapsed if timed else float("nan"), "nonfinite_steps": self.nonfinite["total"],
                  "ms_per_step": 1000 * elapsed / max(timed, 1), "tokens_seen": self.tokens_seen,
                  "elapsed_s": time.perf_counter() - self.started,
                  "eta_s": (self.cfg.train.steps - self.step) * elapsed / max(timed, 1)}
        if self.peak_flops > 0:
            record["mfu"] = tokens_per_s * self.flops_per_token / self.peak_flops
        record.update({k: float(v) for k, v in self.last_metrics.items()})
        if self.cfg.train.phases:  # which phase, and the token share of each source in it so far (closed form)
            record["phase"] = self.phase + 1
            record.update({f"share/{name}": share for name, share in self.loader.realised_shares()[1].items()})
        record.update(_load_stats(self.interval["loads"], self.moe_layer_ids))
        record.update(self.optimizer.update_rms())
        record.update(memory_gib(self.env.device))
        record.update(expert_parallel.expert_parallel_metrics(self.engine.module, elapsed, steps))
        self._reset_interval()
        return record

    def _emit(self, sink: MetricsSink | None, record: dict) -> None:
        if sink is not None:
            sink.write(record)

    # ---- end of training ---------------------------------------------------------------------------------
    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights on every rank (collective): ZeRO partitions and bf16 copies are gathered from the
        optimizer's fp32 master weights."""
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.engine.module
        state = {}
        for name, p in module.named_parameters():
            full = safe_get_full_fp32_param(p)
            state[name] = (p.detach() if full is None else full).float().cpu()
        persistent = set(module.state_dict(keep_vars=True))  # router biases yes, load counters no
        state.update({name: b.detach().cpu() for name, b in module.named_buffers() if name in persistent})
        return expert_parallel.full_state_dict(module, state)  # experts gathered from their group, if sharded

    def save_final_weights(self) -> Path:
        """RUN_DIR/model: every rank writes the fp32 weights it owns (train/state_shards.py), then rank 0 the
        config and SHA256SUMS; no rank gathers the whole model."""
        from ondol.model.io import CHECKSUMS, CONFIG, write_checksums

        out = model_dir(self.cfg)
        if self.env.is_main and out.is_dir():  # an earlier run's files (another layout) must not mix in
            for stale in [out / CONFIG, out / CHECKSUMS, *out.glob("model*.safetensors"), *out.glob("*.index.json")]:
                stale.unlink(missing_ok=True)
        dist.barrier()
        state_shards.save(self.engine, self.optimizer, out, self.env.rank, self.env.world_size,
                          with_optimizer=False)
        if self.env.is_main:
            write_atomic(out / CONFIG, json.dumps(self.cfg.model.to_dict(), indent=2) + "\n")
            write_checksums(out, [p.name for p in out.iterdir() if p.is_file() and p.name != CHECKSUMS])
            plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png",
                        f"{self.cfg.logging.wandb_run_name or self.run_dir.resolve().name}: {self.step} steps")
        dist.barrier()
        return out

    def _summary(self) -> dict:
        """The same summary on every rank (rank 0 reads metrics.jsonl)."""
        records = [read_metrics(self.run_dir / "metrics.jsonl") if self.env.is_main else None]
        if self.env.world_size > 1:
            dist.broadcast_object_list(records, src=0)
        val = [r["val_loss"] for r in records[0] if "val_loss" in r]
        train = [r["loss"] for r in records[0] if "loss" in r]
        return {"steps": self.step, "first_val_loss": val[0] if val else None,
                "final_val_loss": val[-1] if val else None, "final_loss": train[-1] if train else None,
                "nonfinite_steps": self.nonfinite["total"], "model_dir": str(model_dir(self.cfg)),
                "run_dir": str(self.run_dir)}


def _mixture_weights(cfg: RunConfig, manifest: dict) -> dict[str, float] | None:
    """The mixture weights of data.sources, applied when training (not when preparing), so the weights in the
    config are the ones that run; None when the config lists no sources (the manifest's weights apply)."""
    if not cfg.data.sources:
        return None
    weights = {s.name: s.weight for s in cfg.data.sources}
    if unprepared := sorted(set(weights) - set(manifest["weights"])):
        raise DataError(f"data.sources {unprepared} are not in {data_dir(cfg)} (prepared: "
                        f"{sorted(manifest['weights'])}): re-run `ondol data prepare CONFIG`")
    return weights


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _load_stats(loads: torch.Tensor, layer_ids: list[int]) -> dict[str, float]:
    """Per MoE layer: least and most loaded expert relative to the mean (1.0 = balanced), and the coefficient
    of variation of the loads over the steps since the last log."""
    if loads.numel() == 0 or float(loads.sum()) == 0:
        return {}
    mean = loads.mean(dim=1, keepdim=True).clamp_min(1e-9)
    rel = loads / mean
    cv = loads.std(dim=1, unbiased=False) / mean.squeeze(1)
    out = {}
    for i, lo, hi, c in zip(layer_ids, rel.min(1).values.tolist(), rel.max(1).values.tolist(), cv.tolist()):
        out.update({f"moe/layer{i}/load_min": lo, f"moe/layer{i}/load_max": hi, f"moe/layer{i}/load_cv": c})
    out["moe/load_cv_max"] = max(cv.tolist())
    return out
