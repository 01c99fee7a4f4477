"""`engram-hf knowledge-bench`: fact injection, Engram-only vs LoRA vs LoRA + Engram."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..knowledge import LOSSES, MODES, run_knowledge_bench


def _print_table(report: dict) -> None:
    print(f"\n{'mode':<13}{'recall':>8}{'gen loss':>10}{'change':>9}{'train s':>9}{'peak GiB':>10}{'opt state MiB':>15}")
    for r in report["results"]:
        print(
            f"{r['mode']:<13}{r['recall']:>8.1%}{r['general_loss_after']:>10.4f}{r['general_loss_change']:>+9.2%}"
            f"{r['train_seconds']:>9.0f}{r['peak_rss_gib']:>10.2f}{r['optimizer_state_bytes'] / 2**20:>15.1f}"
        )


def run(args: argparse.Namespace) -> int:
    report = run_knowledge_bench(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "knowledge.json").write_text(json.dumps(report, indent=2))
    _print_table(report)
    print(f"\nwrote {out / 'knowledge.json'}")
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser("knowledge-bench", help="fact injection: Engram-only vs LoRA vs LoRA + Engram")
    parser.add_argument("--model", help="local folder, .gguf file or Hub id (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--tiny", action="store_true", help="tiny random model (a smoke run)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--facts", type=int, default=200)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="backbone / LoRA LR")
    parser.add_argument("--engram-lr", type=float, default=1e-2, help="dense Engram LR")
    parser.add_argument("--table-optimizer", default="rowwise_adagrad", choices=["adam", "rowwise_adagrad"])
    parser.add_argument("--table-first-step", default="damped", choices=["damped", "full"],
                        help="row-wise Adagrad: damp a row's first step (default) or let it move by the full LR")
    parser.add_argument("--table-lr-multiplier", type=float, default=100.0, help="table LR = --engram-lr x this")
    parser.add_argument("--train-engram", default="tables", choices=["all", "tables"],
                        help="which Engram parameters train: only the tables (default) or all")
    parser.add_argument("--table-rows-per-head", type=int, default=65_537)
    parser.add_argument("--loss", default="completion", choices=LOSSES,
                        help="a statement's labelled tokens: its second mention (the answer, or the entity where the "
                        "answer comes first; default), the answer wherever it stands, or every token")
    parser.add_argument("--replay", type=float, default=0.5,
                        help="general-text pieces mixed into training, per fact statement (other text than the probe)")
    parser.add_argument("--replay-target", default="base", choices=["base", "text"],
                        help="on replay text, keep the base model's predictions (KL, default) or learn the text itself")
    parser.add_argument("--replay-tables", default="frozen", choices=["frozen", "learn"],
                        help="KL replay rows train everything but the Engram tables (default) or the tables too")
    parser.add_argument("--memory-init", default="empty", choices=["empty", "graft"],
                        help="Engram start point: empty tables + random W_V (default) or the graft's random tables "
                        "+ zero W_V")
    parser.add_argument("--layers", type=int, nargs="+", help="Engram layers (default: 1 and half depth)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_out")
    parser.set_defaults(run=run)
