"""Hugging Face transformers coverage: small configs of common model types, converted through the
torch.export path (fx cannot trace them), checked and round-tripped.

    pip install -e ".[hf]"
    python benchmarks/hf_coverage.py                 # rows in results/hf_coverage.csv (resumable)
    python benchmarks/hf_coverage.py --summary

Each model type is built from its config class with small sizes (2 layers, width 64, 4 heads, random
weights, nothing downloaded) and fed random ids (text models, batch 2, length 7, with an attention mask
where the model takes one) or images (vision models, 2 x 3 x 32 x 32). A model passes when
`td.build_from_unstructured_module(model, None, inputs)` converts it, the DAG's outputs equal the
model's (every field of its output), it round-trips bitwise through save/load, and it runs at another
batch size and sequence length (batch 3, length 11; images: batch 3) with equal outputs. Each type runs
in a forked subprocess with a timeout.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

from _sweep import read_rows, sweep  # benchmarks/ is on sys.path when a script here runs

OUT = Path(__file__).resolve().parent / "results" / "hf_coverage.csv"
FIELDS = [
    "model",
    "status",
    "stage",
    "traced_with",
    "vertices",
    "outputs_equal",
    "roundtrip_equal",
    "other_sizes_equal",
    "seconds",
    "error_class",
    "error",
]
STAGES = ["start", "build", "convert", "compare", "roundtrip", "other sizes", "done"]
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
# model type -> (config class, model class, config overrides, kind)
TYPES = {
    "bert": ("BertConfig", "BertModel", {"vocab_size": 100}, "text"),
    "roberta": ("RobertaConfig", "RobertaModel", {"vocab_size": 100}, "text"),
    "distilbert": (
        "DistilBertConfig",
        "DistilBertModel",
        {"vocab_size": 100, "dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 128},
        "text",
    ),
    "albert": ("AlbertConfig", "AlbertModel", {"vocab_size": 100, "embedding_size": 32}, "text"),
    "electra": ("ElectraConfig", "ElectraModel", {"vocab_size": 100, "embedding_size": 32}, "text"),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {"vocab_size": 100, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 32, "use_cache": False},
        "causal",
    ),
    "opt": (
        "OPTConfig",
        "OPTModel",
        {
            "vocab_size": 100,
            "ffn_dim": 128,
            "word_embed_proj_dim": 64,
            "max_position_embeddings": 32,
            "use_cache": False,
        },
        "causal",
    ),
    "llama": (
        "LlamaConfig",
        "LlamaModel",
        {"vocab_size": 100, "num_key_value_heads": 2, "use_cache": False, "max_position_embeddings": 32},
        "causal",
    ),
    "mistral": (
        "MistralConfig",
        "MistralModel",
        {"vocab_size": 100, "num_key_value_heads": 2, "use_cache": False, "max_position_embeddings": 32},
        "causal",
    ),
    "t5_encoder": (
        "T5Config",
        "T5EncoderModel",
        {"vocab_size": 100, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4},
        "text",
    ),
    "vit": ("ViTConfig", "ViTModel", {"image_size": 32, "patch_size": 8}, "image"),
    "deit": ("DeiTConfig", "DeiTModel", {"image_size": 32, "patch_size": 8}, "image"),
    "swin": (
        "SwinConfig",
        "SwinModel",
        {
            "image_size": 32,
            "patch_size": 4,
            "embed_dim": 16,
            "depths": [1, 1],
            "num_heads": [2, 4],
            "window_size": 4,
        },
        "image",
    ),
    "convnext": (
        "ConvNextConfig",
        "ConvNextModel",
        {"image_size": 32, "hidden_sizes": [16, 32], "depths": [1, 1], "num_stages": 2},
        "image",
    ),
}


def check(name: str, stage) -> dict:
    import tempfile
    import time
    import warnings

    import torch
    import transformers

    import torch_dag as td
    from torch_dag.core.compare import bitwise_equal, compare_outputs

    def at(s: str) -> None:
        stage.value = STAGES.index(s)

    warnings.filterwarnings("ignore")
    config_class, model_class, overrides, kind = TYPES[name]
    at("build")
    torch.manual_seed(0)
    config_cls = getattr(transformers, config_class)
    small = {k: v for k, v in SMALL.items() if kind != "image" or name in ("vit", "deit")}
    config = config_cls(**{**small, **overrides})
    if kind != "image":
        config.pad_token_id = config.bos_token_id = config.eos_token_id = 0
    model = getattr(transformers, model_class)(config).eval()

    def inputs(batch: int, length: int) -> dict:
        if kind == "image":
            return {"pixel_values": torch.randn(batch, 3, 32, 32)}
        ids = {"input_ids": torch.randint(1, 100, (batch, length))}
        if "attention_mask" in model.forward.__code__.co_varnames:
            ids["attention_mask"] = torch.ones(batch, length, dtype=torch.long)
        return ids

    def equal(reference, out) -> bool:
        keys = [k for k in reference if reference[k] is not None]
        return set(keys) <= set(out) and all(compare_outputs(reference[k], out[k])[0] for k in keys)

    at("convert")
    t0 = time.perf_counter()
    example = inputs(2, 7)
    dag = td.build_from_unstructured_module(model, None, example)
    row = {
        "traced_with": dag.traced_with,
        "vertices": len(dag),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    at("compare")
    with torch.no_grad():
        reference, out = model(**example), dag(**example)
    row["outputs_equal"] = equal(reference, out)
    at("roundtrip")
    with tempfile.TemporaryDirectory() as tmp:
        td.save(dag, Path(tmp) / "m.dag")
        with torch.no_grad():
            row["roundtrip_equal"] = bitwise_equal(out, td.load(Path(tmp) / "m.dag")(**example))
    at("other sizes")
    other = inputs(3, 11)
    with torch.no_grad():
        row["other_sizes_equal"] = equal(model(**other), dag(**other))
    at("done")
    ok = row["outputs_equal"] and row["roundtrip_equal"]
    return {**row, "status": "ok" if ok else "mismatch"}


def summarize(rows: dict[str, dict[str, str]]) -> str:
    ok = [r for r in rows.values() if r["status"] == "ok"]
    other = [r for r in ok if r.get("other_sizes_equal") == "True"]
    lines = [
        f"model types: {len(rows)}; convert + equal + round trip: {len(ok)} / {len(rows)} = "
        f"{len(ok) / max(len(rows), 1):.0%}; also equal at batch 3, length 11: {len(other)} / {len(ok)}"
    ]
    causes = collections.Counter(
        f"{r['status']}: {r.get('error_class', '')}" for r in rows.values() if r["status"] != "ok"
    )
    for cause, count in causes.most_common():
        names = [n for n, r in rows.items() if f"{r['status']}: {r.get('error_class', '')}" == cause]
        lines.append(f"  {count}  {cause}  ({', '.join(names)})")
    for name, r in rows.items():
        lines.append(
            f"  {name:12s} {r['status']:10s} equal={r.get('outputs_equal', '')} "
            f"roundtrip={r.get('roundtrip_equal', '')} other_sizes={r.get('other_sizes_equal', '')} "
            f"{(r.get('error') or '')[:140]}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--types", nargs="+", default=list(TYPES))
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--summary", action="store_true", help="only print the summary of the CSV")
    args = parser.parse_args()
    if not args.summary:
        sweep(args.types, check, OUT, FIELDS, workers=args.workers, timeout=args.timeout, stages=STAGES)
    print(summarize(read_rows(OUT)))


if __name__ == "__main__":
    main()
