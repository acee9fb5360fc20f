"""Downstream tasks through lm-evaluation-harness (`pip install 'ondol[eval]'`): an lm-eval model on Ondol's own
weights, and the tasks by their lm-eval names (kobest_copa, haerae_general_knowledge, kmmlu_..., click_...).

A task given a local file (`--task-data kobest_copa=copa.jsonl`) keeps lm-eval's own definition (prompt, choices,
metrics) with its dataset replaced by the JSON Lines file, every row evaluated zero-shot: clusters are often
offline. Log-likelihoods come from the same scorer as bits per byte (`token_logprobs`), so a context longer
than the run's seq_len is cut on the left exactly as a long document is.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from lm_eval.api.model import TemplateLM

from ondol.errors import ConfigError
from ondol.train.evaluation import document_start, token_logprobs


class OndolLM(TemplateLM):
    """lm-eval's model interface on a run's final weights or one of its checkpoints."""

    def __init__(self, run_dir: str, checkpoint: str | None = None, batch_tokens: int = 8192,
                 verify: bool = True) -> None:
        super().__init__()
        from ondol.configs import load_run_config
        from ondol.train.evaluation import load_model, load_tokenizer

        cfg = load_run_config(run_dir)
        self.tokenizer = load_tokenizer(cfg)
        self.model = load_model(cfg.run_dir, checkpoint, verify)
        self.context, self.batch_tokens = cfg.data.seq_len, batch_tokens
        self.start = document_start(self.tokenizer, cfg.data.bos)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.start

    def tok_encode(self, string: str, add_special_tokens: bool = True, **kwargs) -> list[int]:
        """A context starts like a training document (bos, or the eos before it); a continuation does not."""
        return [self.start] * add_special_tokens + self.tokenizer.encode(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        scored = token_logprobs(self.model, [(ctx + cont, len(ctx)) for _, ctx, cont in requests], self.context,
                                batch_tokens=self.batch_tokens)
        for (key, _, _), s in zip(requests, scored):
            self.cache_hook.add_partial("loglikelihood", key, (s.logprob, s.greedy))
        return [(s.logprob, s.greedy) for s in scored]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        scored = token_logprobs(self.model, [([self.start, *ids], 1) for ids in self.tokenizer.encode_batch(texts)],
                                self.context, batch_tokens=self.batch_tokens)
        return [s.logprob for s in scored]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from ondol.model.generate import generate

        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else until
            ids = generate(self.model, self.tok_encode(context)[-self.context:],
                           max_new_tokens=int(kwargs.get("max_gen_toks", 64)), eos_id=self.tokenizer.eos_id)
            text = self.tokenizer.decode(ids)
            cut = min([text.find(u) for u in until if u in text], default=len(text))
            out.append(text[:cut])
        return out


def local_task_yaml(name: str, data_file: str, folder: Path) -> Path:
    """A task file for `name` that includes lm-eval's own definition with the dataset read from `data_file`."""
    source = _task_yaml(name)
    if not Path(data_file).is_file():
        raise ConfigError(f"--task-data {name}={data_file}: no such file (give a JSON Lines file with the "
                                f"fields of {name}'s dataset, one item a line)")
    override = {"include": str(source), "task": name, "dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}},
                "training_split": None, "validation_split": None, "fewshot_split": None, "test_split": "test"}
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(override, ensure_ascii=False), encoding="utf-8")  # JSON is YAML
    return path


def _task_yaml(name: str) -> Path:
    """lm-eval's YAML file that defines task `name` (its family's folder first, then every task folder): a scan
    of the files for `task: NAME`, much faster than building lm-eval's whole task index."""
    import re

    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    line = re.compile(rf"^task:\s*[\"']?{re.escape(name)}[\"']?\s*$", re.MULTILINE)
    family = root / name.split("_")[0]
    for folder in ([family] if family.is_dir() else []) + [root]:
        for path in sorted(folder.rglob("*.yaml")):
            if line.search(path.read_text(encoding="utf-8", errors="replace")):
                return path
    raise ConfigError(f"--task-data: lm-eval has no task '{name}' (Korean ones: kobest_boolq, kobest_copa, "
                   "kobest_hellaswag, kobest_sentineg, kobest_wic, haerae_general_knowledge, kmmlu_..., click_...)")


def run_tasks(run_dir: str, tasks: list[str], task_data: dict[str, str], checkpoint: str | None = None,
              limit: int | None = None, verify: bool = True) -> dict[str, dict[str, float]]:
    """Each task's metrics (acc, acc_norm, ... as lm-eval reports them) for the run's model, zero-shot."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    unknown_data = sorted(set(task_data) - set(tasks))
    if unknown_data:
        raise ConfigError(f"--task-data names {unknown_data}, which --tasks does not list")
    named = [name for name in tasks if name not in task_data]
    manager = TaskManager() if named else TaskManager(include_defaults=False)
    missing = [name for name in named if name not in manager.all_tasks and name not in manager.all_groups]
    if missing:
        raise ConfigError(f"--tasks: lm-eval has no task '{missing[0]}' (Korean ones: kobest_boolq, kobest_copa, "
                       "kobest_hellaswag, kobest_sentineg, kobest_wic, haerae, kmmlu, click)")
    with tempfile.TemporaryDirectory() as tmp:
        specs = [str(local_task_yaml(name, task_data[name], Path(tmp))) if name in task_data else name
                 for name in tasks]
        results = simple_evaluate(model=OndolLM(run_dir, checkpoint, verify=verify), tasks=specs, task_manager=manager,
                                  num_fewshot=0, limit=limit, bootstrap_iters=0, log_samples=False)
    return {task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k}
            for task, metrics in results["results"].items()}


def print_tasks(results: dict[str, dict[str, float]]) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    table = Table(title="lm-evaluation-harness, zero-shot")
    metrics = sorted({k for m in results.values() for k in m})
    for col in ("task", *metrics):
        table.add_column(col, justify="left" if col == "task" else "right")
    for task, m in results.items():
        table.add_row(task, *[f"{m[k]:.4f}" if k in m else "" for k in metrics])
    Console(width=None if sys.stdout.isatty() else 120).print(table)
