"""The merge worker: a long-lived worker (role=merge) that runs the method's jobs.

It is the user's script, re-run: when the script reaches `fit(...)` the model object it
built is the factory for fresh copies, its loaders are the data. It then waits for
`assign` commands, each one job:

* merge   — swa | fisher_soup | distill | adapter_fuse over parent checkpoints
* gate    — train a switch_softmax router over frozen experts -> an MoE run
* compare — loss of every run on every slice (its own data, the others', val, test)
* export_model — a plain model or the MoE as one weights_only-loadable file

Results are new runs: their checkpoints, evals and `finished` messages carry the new
run's id. Nothing is pickled across processes.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from onthefly_proto import onthefly_pb2 as pb
from onthefly_worker import checkpoint as ckpt
from onthefly_worker import env as wenv
from onthefly_worker import merge_math as mm
from onthefly_worker import moe as moe_mod
from onthefly_worker.config import TrainerConfig
from onthefly_worker.connection import PROTOCOL_VERSION, WorkerConnection
from onthefly_worker.data import batch_len, data_fingerprint, dataset_size, split_batch, to_device
from onthefly_worker.errors import OnTheFlyError
from onthefly_worker.evaluation import evaluate_model, preserved_rng
from onthefly_worker.losses import PerSampleLoss
from onthefly_worker.recorder import Recorder
from onthefly_worker.trainer import connect


def _batch_fn(batch: Any) -> tuple[Any, Any]:
    return split_batch(batch)


class MergeWorker:
    def __init__(
        self,
        cfg: TrainerConfig,
        env: wenv.WorkerEnv,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Any,
        train_loader: DataLoader,
        val_loader: DataLoader | None,
        test_loader: DataLoader | None,
    ) -> None:
        self.cfg = cfg
        self.env = env
        self.template = model
        self.opt_template = optimizer
        self.loss = PerSampleLoss(loss_fn)
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.test_loader = test_loader
        self.device = cfg.torch_device()
        self.conn: WorkerConnection | None = None
        self.bs = int(train_loader.batch_size or 64)

    # -- plumbing ----------------------------------------------------------------------------
    def serve(self) -> None:
        hello = pb.Hello(
            role=pb.ROLE_MERGE,
            pid=os.getpid(),
            run_id=self.env.run_id,
            project=self.cfg.project,
            run_name="merge worker",
            dataset_size=dataset_size(self.train_loader),
            config_json=json.dumps(self.cfg.to_dict()),
            device=str(self.device),
            data_fingerprint=data_fingerprint(self.train_loader),
            protocol_version=PROTOCOL_VERSION,
            framework="native",
        )
        self.conn = conn = connect(self.env, hello)
        conn.start_heartbeat(1.0, lambda: 0)
        conn.send(
            status=pb.StatusUpdate(
                run_id=self.env.run_id, state=pb.WORKER_STATE_RUNNING, message="merge worker ready"
            )
        )
        try:
            while not conn.closed.is_set():
                conn.command_event.wait(1.0)
                conn.command_event.clear()
                while conn.commands:
                    cmd = conn.commands.popleft()
                    if cmd.kind == "stop":
                        conn.ack(cmd.command_id, True, "merge worker stopping")
                        return
                    if cmd.kind != "assign":
                        conn.ack(
                            cmd.command_id, False, f"the merge worker does not take {cmd.kind!r}"
                        )
                        continue
                    job = json.loads(cmd.args.get("spec_json") or "{}")
                    try:
                        with preserved_rng():
                            result = self.run_job(job)
                        conn.ack(cmd.command_id, True, str(result.pop("message", "done")), result)
                    except Exception as e:  # a failed job fails its run, not the worker
                        out_run = str(job.get("out_run", ""))
                        if out_run:
                            conn.send_error(e)
                            conn.send(
                                finished=pb.RunFinished(
                                    run_id=out_run,
                                    status=pb.RUN_STATUS_FAILED,
                                    summary_json=json.dumps({"error": f"{type(e).__name__}: {e}"}),
                                )
                            )
                        conn.ack(cmd.command_id, False, f"{type(e).__name__}: {e}")
        finally:
            conn.close()

    # -- helpers -----------------------------------------------------------------------------
    def fresh(self, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        m = copy.deepcopy(self.template).to(self.device)
        if state is not None:
            m.load_state_dict(state)
        m.eval()
        return m

    def load(self, rel: str) -> dict[str, Any]:
        return ckpt.load(os.path.join(self.env.session_dir, rel), map_location=self.device)

    def subset_loader(self, indices_file: str | None, shuffle: bool = False) -> DataLoader:
        ds = self.train_loader.dataset
        if indices_file:
            idx = np.load(os.path.join(self.env.session_dir, indices_file)).tolist()
            ds = Subset(ds, idx)
        g = torch.Generator().manual_seed(0)
        return DataLoader(
            ds,
            batch_size=self.bs,
            shuffle=shuffle,
            generator=g,
            collate_fn=self.train_loader.collate_fn,
        )

    def per_sample(self, out: Any, y: Any) -> torch.Tensor:
        _, per = self.loss(out, y, batch_len(out) if isinstance(out, torch.Tensor) else len(y))
        return per

    def loss_fn_with_grad(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample loss that keeps the graph (Fisher, gate training)."""
        if self.loss.by_rows:
            return self.loss.rows_of(out, y)
        if self.loss._none is not None:
            raw = self.loss._none(out, y)
        elif self.loss._kwarg:
            raw = self.loss.user(out, y, reduction="none")
        else:
            raw = self.loss.user(out, y)
        if raw.dim() == 0:  # a loss that only returns scalars: adopt (or refuse) its rows
            with torch.no_grad():
                self.loss(out.detach(), y, batch_len(out))
            return self.loss.rows_of(out, y)
        return raw.reshape(raw.shape[0], -1).mean(dim=1) if raw.dim() > 1 else raw

    def evaluate(self, model: nn.Module, loader: DataLoader) -> tuple[float, float, int]:
        return evaluate_model(model, loader, self.loss, self.device)

    def report(self, run_id: str, model: nn.Module, step: int = 0) -> dict[str, float]:
        conn = self.conn
        assert conn is not None
        out: dict[str, float] = {}
        for split, loader in (("val", self.val_loader), ("test", self.test_loader)):
            if loader is None:
                continue
            loss, acc, n = self.evaluate(model, loader)
            out[f"{split}_loss"] = loss
            conn.send(
                eval=pb.EvalResult(
                    run_id=run_id,
                    split=split,
                    step=step,
                    epoch=0,
                    loss=loss,
                    accuracy=acc,
                    samples=n,
                )
            )
        return out

    def save(
        self,
        run_id: str,
        model_state: dict[str, torch.Tensor],
        base: dict[str, Any],
        extra: dict[str, Any] | None = None,
    ) -> str:
        conn = self.conn
        assert conn is not None
        state = {
            "format": ckpt.FORMAT,
            "version": ckpt.VERSION,
            "run_id": run_id,
            "role": "merge",
            "model": {k: v.detach().cpu() for k, v in model_state.items()},
            "optimizer": base.get("optimizer"),
            "scheduler": None,
            "scaler": None,
            "rng": base["rng"],
            "cursor": {"epoch": 0, "batch": 0, "seed": int(base.get("cursor", {}).get("seed", 0))},
            "counters": {"step": 0, "sample_steps": 0},
            "config": self.cfg.to_dict(),
            "spec": extra or {},
        }
        rel = os.path.join("checkpoints", run_id, "step-00000000.pt")
        sha, n = ckpt.write_atomic(state, os.path.join(self.env.session_dir, rel))
        conn.send(
            checkpoint=pb.CheckpointSaved(
                run_id=run_id,
                path=rel,
                sha256=sha,
                step=0,
                epoch=0,
                batch=0,
                reason="final",
                bytes=n,
            )
        )
        return rel

    def finish(self, run_id: str, rel: str, summary: dict[str, Any]) -> None:
        assert self.conn is not None
        self.conn.send(
            finished=pb.RunFinished(
                run_id=run_id,
                status=pb.RUN_STATUS_COMPLETED,
                final_checkpoint=rel,
                summary_json=json.dumps(summary),
            )
        )

    def build_run_model(self, entry: dict[str, Any]) -> nn.Module:
        """A run's model: a plain checkpoint, or an MoE rebuilt from its experts and gate."""
        state = self.load(entry["checkpoint"])
        gate = state.get("spec", {}).get("moe")
        if gate:
            experts = [self.fresh(self.load(e)["model"]) for e in gate["expert_checkpoints"]]
            g = moe_mod.SwitchGate(**gate["gate_config"])
            m = moe_mod.MoE(experts, g, gate_input=gate["gate_input"])
            m.gate.load_state_dict(state["model"])
            return m.to(self.device).eval()
        return self.fresh(state["model"])

    # -- jobs --------------------------------------------------------------------------------
    def run_job(self, job: dict[str, Any]) -> dict[str, Any]:
        kind = job.get("job")
        if kind == "merge":
            return self.merge(job)
        if kind == "gate":
            return self.gate(job)
        if kind == "compare":
            return self.compare(job)
        if kind == "export_model":
            return self.export_model(job)
        if kind == "embed":
            return self.embed(job)
        raise OnTheFlyError(f"unknown merge-worker job {kind!r}")

    def embed(self, job: dict[str, Any]) -> dict[str, Any]:
        """The penultimate-layer embedding of a run that has no live worker (it ended), from
        its latest checkpoint, over the whole training set in order (embed.py)."""
        from onthefly_worker import embed as em

        entry = job["run"]
        if entry.get("kind") == "moe":
            raise OnTheFlyError("an MoE run has no single penultimate layer; embed an expert")
        state = self.load(entry["checkpoint"])
        model = self.fresh(state["model"])
        step = int((state.get("counters") or {}).get("step", 0))
        ok, message, payload = em.embed_to_session(
            model,
            self.train_loader,
            self.device,
            self.env.session_dir,
            str(entry["run_id"]),
            step,
            int(job.get("max_dims") or em.MAX_DIMS),
        )
        if not ok:
            raise OnTheFlyError(message)
        return {"message": message, **payload}

    def merge(self, job: dict[str, Any]) -> dict[str, Any]:
        method = job["method"]
        out_run = job["out_run"]
        parents = job["parents"]
        opts = job.get("options", {})
        loaded = [self.load(p["checkpoint"]) for p in parents]
        states = [s["model"] for s in loaded]
        base = loaded[0]
        info: dict[str, Any] = {"method": method, "parents": [p["run_id"] for p in parents]}
        if method == "swa":
            merged = mm.swa_average(states)
        elif method == "fisher_soup":
            fishers = []
            n_samples = int(opts.get("fisher_samples", 256))
            how: dict[str, Any] = {}
            for p, st in zip(parents, states, strict=True):
                m = self.fresh(st)
                fishers.append(
                    mm.diagonal_fisher(
                        m,
                        self.subset_loader(p.get("indices_file")),
                        self.loss_fn_with_grad,
                        self.device,
                        n_samples,
                        batch_fn=_batch_fn,
                        info=how,
                    )
                )
            merged = mm.fisher_soup(states, fishers)
            info["fisher_samples_per_model"] = n_samples
            info["fisher_gradients"] = how.get("method", "")
            # Each sample's gradient is one forward + backward: a training step's worth.
            info["sample_steps"] = n_samples * len(parents)
        elif method == "adapter_fuse":
            deltas = []
            for p, s in zip(parents, loaded, strict=True):
                d = s.get("adapters")
                if not d:
                    raise OnTheFlyError(
                        f"run {p['run_id']} was not trained with adapters (use `onthefly fork --adapters RANK`)"
                    )
                deltas.append({k: (v["A"], v["B"], float(v["scale"])) for k, v in d.items()})
            base_rel = parents[0].get("base_checkpoint") or parents[0]["checkpoint"]
            base = self.load(base_rel)
            merged = mm.adapter_fuse(base["model"], deltas, opts.get("weights"))
            info["base_checkpoint"] = base_rel
        elif method == "distill":
            experts = [self.fresh(st) for st in states]
            probe, target = self._probe_output(experts[0])
            # A classifier ([batch, classes] logits, class-id targets, as the recorder tells
            # them) distills the ensemble's mean probabilities by KL; anything else is a
            # regression, fit to the ensemble's mean output by MSE.
            classifier = Recorder.classification(probe, target) is not None
            if not isinstance(probe, torch.Tensor):
                raise OnTheFlyError(
                    f"distill needs the model to return a tensor, got {type(probe).__name__}"
                )

            def teacher(x: Any) -> torch.Tensor:
                if not classifier:
                    return torch.stack([e(x) for e in experts]).mean(0)
                probs = torch.stack([torch.softmax(e(x), dim=1) for e in experts]).mean(0)
                return torch.log(probs.clamp_min(1e-12))

            student = self.fresh(states[0])
            final = mm.distill(
                student,
                teacher,
                self.subset_loader(None, shuffle=True),
                int(opts.get("steps", 200)),
                float(opts.get("lr", 1e-3)),
                float(opts.get("temperature", 2.0)),
                self.device,
                batch_fn=_batch_fn,
                objective="kl" if classifier else "mse",
            )
            merged = {k: v.detach() for k, v in student.state_dict().items()}
            info["objective"] = "kl" if classifier else "mse"
            info["final_kl" if classifier else "final_mse"] = final
            # Student training steps plus the teachers' forward passes (1/3 of a step each).
            info["sample_steps"] = int(opts.get("steps", 200)) * self.bs * (3 + len(experts)) // 3
        else:
            raise OnTheFlyError(f"unknown merge method {method!r}")
        model = self.fresh(merged)
        if method in ("swa", "fisher_soup", "adapter_fuse") and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
        ):
            bn: dict[str, Any] = {}
            info["bn_batches"] = mm.recalibrate_batchnorm(
                model,
                self.subset_loader(None),
                self.device,
                max_batches=50,
                batch_fn=_batch_fn,
                info=bn,
            )
            merged = {k: v.detach() for k, v in model.state_dict().items()}
            # Forward-only work, counted as the gate counts its expert forwards: 1/3 of a
            # training step per sample.
            info["bn_samples"] = int(bn.get("samples", 0))
            info["sample_steps"] = int(info.get("sample_steps", 0)) + math.ceil(
                info["bn_samples"] / 3
            )
        rel = self.save(out_run, merged, base, {"merge": info})
        info.update(self.report(out_run, model))
        self.finish(out_run, rel, info)
        return {"message": f"{out_run}: {method} of {', '.join(info['parents'])}", **info}

    def _probe_output(self, model: nn.Module) -> tuple[Any, Any]:
        """The model's output on the first training batch, and that batch's target."""
        raw = next(iter(self.subset_loader(None)))
        x, y = split_batch(raw)
        with torch.no_grad():
            return model(to_device(x, self.device)), y

    def gate(self, job: dict[str, Any]) -> dict[str, Any]:
        out_run = job["out_run"]
        parents = job["parents"]
        opts = job.get("options", {})
        loaded = [self.load(p["checkpoint"]) for p in parents]
        experts = [self.fresh(s["model"]) for s in loaded]
        raw = next(iter(self.subset_loader(None)))
        x, _ = split_batch(raw)
        gate_input = (
            "input" if isinstance(x, torch.Tensor) and x.is_floating_point() else "expert_outputs"
        )
        if gate_input == "input":
            in_features = int(x[0].numel())
        else:
            with torch.no_grad():
                in_features = sum(int(e(to_device(x, self.device))[0].numel()) for e in experts)
        expert_params = min(sum(p.numel() for p in e.parameters()) for e in experts)
        hidden = opts.get("hidden")
        cfg: dict[str, Any] = {
            "in_features": in_features,
            "n_experts": len(experts),
            "hidden": (
                int(hidden)
                if hidden is not None
                else moe_mod.router_hidden(in_features, len(experts), expert_params)
            ),
            "temperature": float(opts.get("temperature", 1.0)),
        }
        g = moe_mod.SwitchGate(**cfg)
        moe = moe_mod.MoE(experts, g, gate_input=gate_input).to(self.device)  # type: ignore[arg-type]
        hist = moe_mod.train_gate(
            moe,
            self.subset_loader(None, shuffle=True),
            self.loss_fn_with_grad,
            # Measured on examples/regimes.py: 300 steps leave the router near "always the
            # generalist"; ~1000 let it learn the hard region.
            int(opts.get("steps", 1000)),
            float(opts.get("lr", 1e-2)),
            float(opts.get("balance_weight", 0.01)),
            self.device,
            batch_fn=_batch_fn,
        )
        spec = {
            "moe": {
                "experts": [p["run_id"] for p in parents],
                "expert_checkpoints": [p["checkpoint"] for p in parents],
                "gate_config": cfg,
                "gate_input": gate_input,
                "kind": "switch_softmax",
            }
        }
        rel = self.save(
            out_run, {k: v.detach() for k, v in moe.gate.state_dict().items()}, loaded[0], spec
        )
        info: dict[str, Any] = {
            "experts": spec["moe"]["experts"],
            "gate_input": gate_input,
            "final_loss": hist.task_loss[-1] if hist.task_loss else None,
            "usage": hist.usage,
            "router_hidden": cfg["hidden"],
            "cached_expert_outputs": hist.cached,
            # Compute in training-step equivalents, for the matched-compute comparison: the
            # frozen experts' forwards (1/3 of a training step each) plus the router's steps.
            "sample_steps": moe_mod.gate_sample_steps(moe, hist),
        }
        moe.eval()
        info.update(self.report(out_run, moe))
        self.finish(out_run, rel, info)
        return {"message": f"{out_run}: gate over {', '.join(info['experts'])}", **info}

    def compare(self, job: dict[str, Any]) -> dict[str, Any]:
        runs = job["runs"]
        slices = job["slices"]  # [{name, indices_file|None, split?}]
        models = [self.build_run_model(r) for r in runs]
        losses: list[float] = []
        for m in models:
            for s in slices:
                if s.get("split") == "val":
                    loader = self.val_loader
                elif s.get("split") == "test":
                    loader = self.test_loader
                else:
                    loader = self.subset_loader(s.get("indices_file"))
                losses.append(self.evaluate(m, loader)[0] if loader is not None else math.nan)
        return {
            "message": f"compared {len(runs)} run(s) on {len(slices)} slice(s)",
            "runs": [r["run_id"] for r in runs],
            "slices": [s["name"] for s in slices],
            "losses": losses,
        }

    def export_model(self, job: dict[str, Any]) -> dict[str, Any]:
        model = self.build_run_model(job["run"])
        path = job["path"]
        factory = job.get("factory") or None
        try:
            if isinstance(model, moe_mod.MoE):
                moe_mod.export_moe(model, path, [factory] * len(model.experts) if factory else None)
            else:
                moe_mod.export_model(model, path, factory=factory)
        except moe_mod.UnsupportedModule as e:
            # This job is the CLI's `export-model` (and the dashboard's): say it their way.
            raise OnTheFlyError(
                f"{e.summary}. Give `onthefly export-model` a factory that rebuilds it: "
                "--factory package.module:callable (an importable function returning the "
                "model); onthefly.load_model(path, allow_import=True) then calls it"
            ) from None
        return {"message": f"wrote {path}", "path": path}
