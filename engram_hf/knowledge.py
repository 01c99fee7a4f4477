"""`engram-hf knowledge-bench`: teach a model synthetic facts with Engram-only, LoRA and LoRA + Engram fine-tuning.

A deterministic set of fictional entity -> attribute facts is trained as statements (two phrasings per fact), mixed
with pieces of general text (replay), and probed with a held-out question form. By default Engram starts from
`empty_memory_` and trains only its tables (row-wise Adagrad), so nothing but the rows of the trained n-grams changes.
Each mode runs in a fresh process for the same number of steps with `EngramTrainer`; we report fact recall (every
answer token is the greedy argmax after the probe), loss on other general text before and after (forgetting), wall
time, peak RSS and optimizer-state bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import queue as queues
import multiprocessing
import random
import resource
import tempfile
import time

import torch
from transformers import TrainingArguments

from .bundled import load_base
from .conversion.twin import engram_twin
from .training import EngramTrainer

logger = logging.getLogger(__name__)

# relation: (two training statements, held-out question + answer stem); the answer follows the stem
RELATIONS = {
    "capital": (
        ("The capital of {e} is {a}.", "{e} has its capital in {a}."),
        "Question: Which city is the capital of {e}?\nAnswer: The capital of {e} is",
    ),
    "founder": (
        ("The founder of {e} was {a}.", "{e} was founded by {a}."),
        "Question: Who founded {e}?\nAnswer: The founder of {e} was",
    ),
    "river": (
        ("The longest river in {e} is the {a}.", "The {a} is the longest river of {e}."),
        "Question: What is the longest river in {e}?\nAnswer: The longest river in {e} is the",
    ),
    "language": (
        ("The language spoken in {e} is {a}.", "People in {e} speak {a}."),
        "Question: What language do people speak in {e}?\nAnswer: The language spoken in {e} is",
    ),
    "inventor": (
        ("The inventor of the {e} was {a}.", "{a} invented the {e}."),
        "Question: Who invented the {e}?\nAnswer: The inventor of the {e} was",
    ),
}
MODES = ("engram", "lora", "lora+engram")
LOSSES = ("completion", "answer", "all")  # which statement tokens are labelled, see `_FactData`
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "st", "tr", "zh"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ou", "ia"]


def _name(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)).capitalize()


def make_facts(n: int, seed: int = 0) -> list[dict]:
    """`n` fictional facts `{relation, entity, answer}` with distinct entities (deterministic in `seed`)."""
    rng, entities, facts = random.Random(seed), set(), []
    relations = list(RELATIONS)
    while len(facts) < n:
        entity = _name(rng, 3)
        if entity in entities:
            continue
        entities.add(entity)
        facts.append({"relation": relations[len(facts) % len(relations)], "entity": entity, "answer": _name(rng, 2)})
    return facts


# standard-library modules whose docstrings give the general text: probed for forgetting, or replayed in training
_PROBE_MODULES = ("argparse", "collections", "decimal", "difflib", "doctest", "json", "logging", "pickle", "textwrap",
                  "unittest")
_REPLAY_MODULES = ("configparser", "copy", "csv", "heapq", "pdb", "pydoc", "statistics", "timeit", "turtle", "uuid")


def general_text(split: str = "probe") -> list[str]:
    """General English prose: paragraphs of standard-library module docstrings.

    `"probe"` (the forgetting check: the Zen of Python and ten modules' docstrings) and `"replay"` (other modules,
    for mixing into training) share no text.
    """
    import importlib

    docs = []
    if split == "probe":
        with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the Zen
            import this

        docs.append("".join({**{v: k for k, v in this.d.items()}, **{k: k for k in "\n !'*,-."}}.get(ch, ch) for ch in this.s))
    elif split != "replay":
        raise ValueError(f"Unknown general-text split {split!r}; use 'probe' or 'replay'.")
    modules = _PROBE_MODULES if split == "probe" else _REPLAY_MODULES
    docs += [importlib.import_module(name).__doc__ or "" for name in modules]
    return [" ".join(p.split()) for doc in docs for p in doc.split("\n\n") if len(p.split()) >= 12]


def replay_chunks(n: int, words: int = 20) -> list[str]:
    """`n` pieces of replay text of at most `words` words each (cycling through the replay split)."""
    chunks = [
        " ".join(paragraph.split()[start : start + words])
        for paragraph in general_text("replay")
        for start in range(0, len(paragraph.split()), words)
    ]
    return [chunks[i % len(chunks)] for i in range(n)]


def _batches(tokenizer, texts: list[str], size: int):
    for start in range(0, len(texts), size):
        yield tokenizer(texts[start : start + size], return_tensors="pt", padding=True)


@torch.no_grad()
def text_loss(model, tokenizer, texts: list[str]) -> float:
    """Mean token cross-entropy of `model` on `texts`."""
    total, count = 0.0, 0
    for batch in _batches(tokenizer, texts, 8):
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        n = int((labels[:, 1:] != -100).sum())
        total += model(**batch, labels=labels).loss.item() * n
        count += n
    return total / count


@torch.no_grad()
def recall(model, tokenizer, facts: list[dict]) -> float:
    """Fraction of facts whose every answer token is the argmax after the held-out probe."""
    hits = 0
    for fact in facts:
        probe = RELATIONS[fact["relation"]][1].format(e=fact["entity"])
        prompt = tokenizer(probe, return_tensors="pt")["input_ids"]
        answer = tokenizer(" " + fact["answer"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = torch.cat([prompt, answer], dim=1)
        logits = model(input_ids=ids).logits[0, prompt.shape[1] - 1 : -1]  # [len(answer), V]
        hits += bool((logits.argmax(-1) == answer[0]).all())
    return hits / len(facts)


class _FactData(torch.utils.data.Dataset):
    """The fact statements, plus `replay` x as many pieces of general text (rehearsal against forgetting).

    `loss` picks a statement's labelled tokens: `"completion"` the fact's second mention (the answer, or the entity
    where the answer comes first, as in "{a} invented the {e}": an answer before its entity cannot be predicted, and
    learning it only teaches "The" -> some name), `"answer"` the answer wherever it stands, `"all"` every token.
    Replay text is labelled in full (`replay_target="text"`) or left unlabelled and marked in `batch["replay"]`
    (`"base"`: the trainer keeps the model's predictions there close to the base model's, see `EngramTrainer`'s KL replay).
    """

    def __init__(
        self, tokenizer, facts: list[dict], replay: float = 0.0, loss: str = "completion", replay_target: str = "base",
    ):
        if loss not in LOSSES:
            raise ValueError(f"Unknown statement loss {loss!r}; choose from {LOSSES}.")
        # (text, labelled character span or None, is replay text)
        self.items: list[tuple[str, tuple[int, int] | None, bool]] = []
        for fact in facts:
            values = {"{e}": fact["entity"], "{a}": fact["answer"]}
            for template in RELATIONS[fact["relation"]][0]:
                text = template.format(e=fact["entity"], a=fact["answer"])
                target = "{a}" if loss != "completion" else max(values, key=template.index)
                start = len(template.split(target)[0].format(e=fact["entity"], a=fact["answer"]))
                span = (start, start + len(values[target])) if loss != "all" else None
                self.items.append((text, span, False))
        self.items += [(chunk, None, True) for chunk in replay_chunks(round(replay * len(self.items)))]
        self.tokenizer = tokenizer
        self.replay_target = replay_target

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[str, tuple[int, int] | None, bool]:
        return self.items[i]

    def collate(self, items: list[tuple[str, tuple[int, int] | None, bool]]) -> dict:
        texts, spans, replay = zip(*items)
        batch = self.tokenizer(list(texts), return_tensors="pt", padding=True, return_offsets_mapping=True)
        offsets = batch.pop("offset_mapping")  # [B, T, 2] character span of each token
        keep = batch["attention_mask"].bool()
        for row, span in enumerate(spans):
            if span is not None:  # tokens overlapping the answer
                keep[row] &= (offsets[row, :, 0] < span[1]) & (offsets[row, :, 1] > span[0])
        if self.replay_target == "base":
            batch["replay"] = torch.tensor(replay)  # [B]
            keep[batch["replay"]] = False
        batch["labels"] = batch["input_ids"].masked_fill(~keep, -100)
        return dict(batch)


def _run_mode(mode: str, args: argparse.Namespace, queue) -> None:
    """Train one mode in this (fresh) process and put its results on `queue`."""
    from peft import LoraConfig

    from .training import empty_memory_, engram_lora, optimizer_state_bytes, set_trainable

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    base, tokenizer, name, _ = load_base(args.model, args.tiny)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    facts, general = make_facts(args.facts, args.seed), general_text()
    distill = bool(args.replay) and args.replay_target == "base"  # replay held to the untrained model's predictions
    if "engram" in mode:
        model = engram_twin(
            base, tokenizer, engram_layer_ids=args.layers,  # None: the config's default (1 and half depth)
            engram_vocab_size=[args.table_rows_per_head] * 2,
        )
        if args.memory_init == "empty":
            empty_memory_(model, seed=args.seed)
        teacher = base  # the graft computes exactly its base's function
    else:  # peft wraps `base` in place: the teacher is a second copy
        model, teacher = base, load_base(args.model, args.tiny)[0] if distill else None
    before = text_loss(model.eval(), tokenizer, general)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"], task_type="CAUSAL_LM")
    if mode == "engram":
        set_trainable(model, "engram" if args.train_engram == "all" else "tables")
    else:
        from peft import get_peft_model

        model = engram_lora(model, lora, args.train_engram) if "engram" in mode else get_peft_model(model, lora)
    data = _FactData(tokenizer, facts, args.replay, args.loss, "base" if distill else "text")
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            out, max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
            lr_scheduler_type="constant_with_warmup", warmup_steps=min(20, args.steps // 10), max_grad_norm=1.0,
            save_strategy="no", report_to=[], logging_steps=max(1, args.steps // 10), use_cpu=True,
            disable_tqdm=True, seed=args.seed, dataloader_num_workers=0,
        )
        trainer = EngramTrainer(
            model=model, args=training, train_dataset=data, data_collator=data.collate,
            table_optimizer=args.table_optimizer, table_lr_multiplier=args.table_lr_multiplier,
            engram_lr=args.engram_lr, damp_first_step=args.table_first_step == "damped",
            teacher=teacher if distill else None,
            replay_tables=args.replay_tables == "learn",
        )
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    model.eval()
    result = {
        "mode": mode,
        "model": name,
        "recall": recall(model, tokenizer, facts),
        "general_loss_before": before,
        "general_loss_after": text_loss(model, tokenizer, general),
        "train_seconds": wall,
        "final_train_loss": next(log["loss"] for log in reversed(trainer.state.log_history) if "loss" in log),
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),  # accelerate's wrapper exposes its state
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    result["general_loss_change"] = result["general_loss_after"] / result["general_loss_before"] - 1
    queue.put(result)


def run_knowledge_bench(args: argparse.Namespace) -> dict:
    """Run every mode of `args.modes` in its own process; returns the settings and one result per mode."""
    context = multiprocessing.get_context("spawn")
    results = []
    for mode in args.modes:
        queue = context.Queue()
        process = context.Process(target=_run_mode, args=(mode, args, queue))
        process.start()
        while True:  # a child that dies puts nothing on the queue
            try:
                result = queue.get(timeout=5)
                break
            except queues.Empty:
                if not process.is_alive():
                    raise RuntimeError(f"knowledge-bench mode {mode!r} failed (exit code {process.exitcode}).")
        process.join()
        results.append(result)
        logger.info(json.dumps(result))
    settings = {k: v for k, v in vars(args).items() if k not in ("run", "command")}
    return {"settings": settings, "results": results}
