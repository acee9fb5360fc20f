"""`ondol run`: the whole pipeline in one process (tokenizer -> data -> train -> eval -> generate), and
`ondol generate`: a continuation of a prompt from a finished run.

Each stage is the package's own API; finished stages are reused (the tokenizer and the shards are kept in the
run directory and checked by hash, training resumes from its latest checkpoint), so an interrupted run picks up
where it stopped.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ondol.configs import (
    ConfigError,
    RunConfig,
    add_config_command,
    data_dir,
    load_config,
    load_run_config,
    model_dir,
    tokenizer_dir,
)


def _stage(index: int, name: str) -> float:
    print(f"\n== [{index}/5] {name}", flush=True)
    return time.perf_counter()


def _done(start: float, what: str) -> None:
    print(f"   {what} ({time.perf_counter() - start:.1f} s)", flush=True)


def prompt_from_validation(cfg: RunConfig, tokenizer) -> str:
    """The first words of the first held-out document: a real Korean prompt the model never trained on."""
    from ondol.data.shards import first_documents

    (text,) = first_documents(data_dir(cfg), "val", tokenizer, 1)
    return " ".join(text.split()[: cfg.generate.prompt_words])


def chat_prompt_from_validation(cfg: RunConfig, tokenizer) -> str:
    """The first user message of the held-out conversations (generate.chat)."""
    from ondol.data.chat import END_OF_TURN, chat_ids
    from ondol.data.shards import split_shards

    ids = chat_ids(tokenizer)
    for shards in split_shards(data_dir(cfg), "val").values():
        for shard in (s for s in shards if s.mask is not None):
            for doc in (shard.document(i).tolist() for i in range(shard.docs)):
                if ids["user"] in doc:
                    start = doc.index(ids["user"]) + 1
                    return tokenizer.decode(doc[start:doc.index(ids[END_OF_TURN], start)])
    raise ConfigError(f"{data_dir(cfg)} holds no held-out conversation to take a chat prompt from: give --prompt "
                      "or generate.prompt")


def continue_prompt(cfg: RunConfig, prompt: str | None = None, checkpoint: str | None = None) -> tuple[str, str]:
    """Greedy (or sampled, per `generate`) continuation of `prompt` by the run's final model, or by `checkpoint`
    (step_N, a checkpoint folder or a model folder: train.evaluation.load_model); with generate.chat, the
    assistant's answer to it as a user's message, up to the end of its turn."""
    from ondol.data.chat import END_OF_TURN, chat_ids, encode_conversations
    from ondol.model.generate import generate
    from ondol.train.evaluation import load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg.run_dir, checkpoint).eval()
    if cfg.generate.speculative and (cfg.generate.temperature > 0 or not model.cfg.mtp_layers):
        raise ConfigError(f"generate.speculative=true needs generate.temperature=0 and a model trained with "
                          f"model.mtp_layers >= 1 ({model_dir(cfg)} has {model.cfg.mtp_layers})")
    chat = cfg.generate.chat
    if prompt is None:
        prompt = cfg.generate.prompt or (chat_prompt_from_validation if chat else prompt_from_validation)(cfg,
                                                                                                       tokenizer)
    if chat:  # a tokenizer without the chat tokens is refused (exit 4)
        (prompt_ids, _), = encode_conversations(tokenizer, [[("user", prompt)]], cfg.data.bos, generation_prompt=True)
        stop = chat_ids(tokenizer)[END_OF_TURN]
    else:  # as training documents began
        prompt_ids, stop = [tokenizer.bos_id] * cfg.data.bos + tokenizer.encode(prompt), tokenizer.eos_id
    ids = generate(
        model,
        prompt_ids,
        max_new_tokens=cfg.generate.max_new_tokens,
        temperature=cfg.generate.temperature,
        top_k=cfg.generate.top_k,
        eos_id=stop,
        min_new_tokens=cfg.generate.min_new_tokens,
        speculative=cfg.generate.speculative,
        compile=cfg.generate.compile,
    )
    return prompt, tokenizer.decode(ids)


def continuation_lines(prompt: str, continuation: str, indent: str = "") -> str:
    """The prompt and the model's continuation on labelled lines, so it shows where the prompt ends (a
    continuation may go on mid-word)."""
    return f"{indent}prompt:       {prompt}\n{indent}continuation: {continuation}"


def run_pipeline(cfg: RunConfig) -> dict:
    """Run every stage of a tiny-to-large training job described by one config; returns the summary."""
    from ondol.data.preparation import prepare
    from ondol.tokenizer.tokenizer import Tokenizer
    from ondol.tokenizer.train import train_tokenizer
    from ondol.train.trainer import Trainer

    started = time.perf_counter()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"Ondol run -> {run_dir.resolve()}")

    t = _stage(1, "tokenizer")
    if cfg.tokenizer.path:
        tokenizer = Tokenizer.load(tokenizer_dir(cfg))
    else:
        tokenizer = train_tokenizer(cfg.tokenizer, cfg.tokenizer.sources or cfg.data.sources, tokenizer_dir(cfg),
                                    cfg.seed)
    _done(t, f"vocabulary {tokenizer.vocab_size} at {tokenizer_dir(cfg)}")

    t = _stage(2, "data")
    manifest = prepare(cfg.data, tokenizer, data_dir(cfg), cfg.seed)
    totals = manifest["totals"]
    _done(t, f"{totals['train_tokens']:,} train / {totals['val_tokens']:,} validation tokens at {data_dir(cfg)}")

    t = _stage(3, "train")
    summary = Trainer(cfg).fit(finished_ok=True)
    _done(t, f"{summary['steps']} steps, metrics in {run_dir / 'metrics.jsonl'}, plot {run_dir / 'loss.png'}")

    t = _stage(4, "evaluate")
    first, final = summary["first_val_loss"], summary["final_val_loss"]
    _done(t, f"validation loss {first:.3f} -> {final:.3f}")

    t = _stage(5, "generate")
    prompt, continuation = continue_prompt(cfg)
    print(continuation_lines(prompt, continuation, indent="   "))
    _done(t, "greedy decoding" if cfg.generate.temperature == 0 else "sampling")

    summary.update(prompt=prompt, continuation=continuation, wall_s=time.perf_counter() - started)
    print(f"\nDone in {summary['wall_s']:.0f} s. Export: ondol export hf {run_dir} {run_dir}/hf")
    return summary


def _run(args: argparse.Namespace) -> int:
    from ondol.train.preemption import PREEMPTED_EXIT, Preempted

    try:
        run_pipeline(load_config(args.config, args.overrides))
    except Preempted as e:
        print(f"ondol run: {e}", file=sys.stderr)
        return PREEMPTED_EXIT
    return 0


def _generate(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.run_dir, [*args.overrides, *["generate.chat=true"] * args.chat])
    prompt, continuation = continue_prompt(cfg, args.prompt, args.checkpoint)
    print(continuation_lines(prompt, continuation))
    if not continuation.strip():  # blanks, or nothing before eos, would look like no output at all
        print(f"(the continuation is only whitespace: {continuation!r})", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    add_config_command(
        sub, "run", _run,
        help="the whole pipeline: train a tokenizer, prepare data, train, evaluate, generate",
        description="Train a tokenizer, prepare packed data, train the model with DeepSpeed (one process), "
        "evaluate it and print a continuation of a prompt. Finished stages are reused; training resumes.",
    )

    g = sub.add_parser(
        "generate",
        help="continue a prompt with a finished run's model",
        description="Continue a prompt with RUN_DIR's final model (greedy unless generate.temperature > 0).",
    )
    g.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `ondol run` or `ondol train` "
                   "(every file is read from it), or the run's config YAML")
    g.add_argument("--prompt", help="text to continue (default: generate.prompt, else a held-out document's start)")
    g.add_argument("--chat", action="store_true", help="answer the prompt as a user's message through the chat "
                   "template, stopping at the end of the turn (generate.chat=true; a chat fine-tuned run)")
    g.add_argument("--checkpoint", help="step_N, a checkpoint folder, or a model folder (such as one `ondol "
                   "average` wrote) instead of the run's final weights")
    g.add_argument("overrides", nargs="*", help="overrides such as generate.max_new_tokens=80")
    g.set_defaults(func=_generate)
