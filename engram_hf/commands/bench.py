"""`engram-hf bench`: speed and memory of an Engram model against its base, side by side in one process."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..bench import run_bench
from ..bundled import SHAPES


def _print_table(results: dict) -> None:
    s = results["speed"]
    print(f"\nmodel: {results['model']}   machine: {results['machine']['processor']}, "
          f"{results['machine']['torch_threads']} threads, torch {results['machine']['torch']}")
    print(f"{'':28}{'base':>12}{'engram':>12}{'ratio':>8}")
    print(f"{'prefill tokens/s':28}{s['base']['prefill_tok_s']:12.1f}{s['engram']['prefill_tok_s']:12.1f}"
          f"{s['prefill_ratio']:8.3f}")
    print(f"{'greedy decode tokens/s':28}{s['base']['decode_tok_s']:12.1f}{s['engram']['decode_tok_s']:12.1f}"
          f"{s['decode_ratio']:8.3f}")
    k = results["kernels_per_decode_step"]
    print(f"{'kernels per eager decode step':28}{k['base']:12d}{k['engram']:12d}  "
          f"(+{k['per_engram_layer']:.1f} per Engram layer)")
    print("\ntable rows per layer -> decode ms/token")
    for row in results["table_sweep"]:
        print(f"  2^{row['log2_rows']:<3} ({row['rows_per_layer']:>11,} rows) {row['decode_ms_per_token']:8.3f}")
    print(f"  ms(smallest) / ms(largest) = {results['table_sweep_ratio']:.3f}")
    h = results["hashing"]
    print(f"\nhashing per decode step: {h['decode_step_us_ctx128']:.1f} us (ctx 128), "
          f"{h['decode_step_us_ctx4096']:.1f} us (ctx 4096) from the raw id (compress, id cache, hash); "
          f"{h['decode_step_hash_only_us']:.1f} us the hashing alone")
    print(f"prefill hashing: {h['prefill_tok_s_torch']:,.0f} tok/s torch vs "
          f"{h['prefill_tok_s_numpy_reference']:,.0f} tok/s NumPy reference (x{h['prefill_speedup']:.1f})")
    print("memory: " + ", ".join(f"{k} = {v:.2f}" for k, v in results["memory"].items()))


def _plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    s = results["speed"]
    labels = ["prefill tok/s", "decode tok/s"]
    x = np.arange(2)
    left.bar(x - 0.2, [s["base"]["prefill_tok_s"], s["base"]["decode_tok_s"]], 0.4, label="base")
    left.bar(x + 0.2, [s["engram"]["prefill_tok_s"], s["engram"]["decode_tok_s"]], 0.4, label="engram")
    left.set_xticks(x, labels)
    left.set_yscale("log")
    left.legend()
    left.set_title(results["model"][:40])
    sweep = results["table_sweep"]
    right.plot([r["log2_rows"] for r in sweep], [r["decode_ms_per_token"] for r in sweep], marker="o")
    right.set_xlabel("log2(table rows per layer)")
    right.set_ylabel("decode ms / token")
    right.set_ylim(0, 1.2 * max(r["decode_ms_per_token"] for r in sweep))
    right.set_title("O(1) lookup: decode time vs table size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def run(args: argparse.Namespace) -> int:
    results = run_bench(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    _print_table(results)
    chart = _plot(results, out / "bench.png")
    print(f"\nwrote {out / 'bench.json'}" + (f" and {out / 'bench.png'}" if chart else " (no matplotlib: no chart)"))
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser("bench", help="speed and memory of Engram vs its base model")
    parser.add_argument("--model", help="local folder, .gguf file or Hub id (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--tiny", action="store_true", help="tiny random model (a smoke run)")
    parser.add_argument("--random-weights", action="store_true", help="the model's architecture with random weights")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a random-weight Llama of this shape (SmolLM2 vocabulary)")
    parser.add_argument("--device", default="cpu", help="compute device")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--compile", action="store_true",
                        help="static cache + torch.compile'd decode step, both models alike (CUDA graphs on a GPU)")
    parser.add_argument("--table-device", default="host", choices=["host", "device", "auto"],
                        help="where the Engram tables live (engram_table_device)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--hash-len", type=int, default=8192)
    parser.add_argument("--table-log2", type=int, nargs="+", default=[16, 20, 24, 26])
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(run=run)
