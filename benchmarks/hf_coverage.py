"""Hugging Face transformers coverage: 64 model types from their DEFAULT config classes, shrunk only in
size, converted without and with example inputs, run at batch 1 and 4, round-tripped, pruned to half
the FLOPs.

    pip install -e ".[hf]"
    python benchmarks/hf_coverage.py                      # rows in results/hf_default_configs.csv (resumable)
    python benchmarks/hf_coverage.py --types bert gpt2 t5 vit wav2vec2 --out /tmp/hf.csv
    python benchmarks/hf_coverage.py --types gpt2 --redo  # run types already in the CSV again
    python benchmarks/hf_coverage.py --summary            # convert % at batch 1 and 4, prune %, failures

Each type's config is `AutoConfig.for_model(type)` (the library's defaults) passed through one generic
`shrink`: every size attribute the config class takes (layers, width, heads, head and feed-forward
sizes, vocabulary, positions, image size, lists of stage widths and depths) is set small, nothing else,
and no type is edited by name. The model is `AutoModel.from_config(config)` (random weights, nothing
downloaded). Inputs follow the model's `main_input_name`: token ids of length 8 (plus an all-ones
attention mask and, for encoder-decoders, decoder ids where `forward` takes them), images at the shrunk
`image_size` (64 where the config has none), 4000 audio samples, or `num_mel_bins` x 2
`max_source_positions` log-mel features. Groups in the summary: encoder, decoder, encoder-decoder,
vision, audio (TYPES below). The previous 14-type sweep's rows stay in results/hf_coverage.csv.

Stages, each recorded on its own (`<stage>_status` ok / mismatch / error with the error's class and
message):
1. noinput: `td.build_from_unstructured_module(model)` (the seed call); outputs equal to the model's at
   batch 1 and 4 (inputs shaped from the DAG's `input_meta` with the batch replaced, else the ones
   above), bitwise round trip through save / load;
2. dict: the same call given a dict of batch-1 inputs as `example_inputs`; equal on fresh inputs at
   batch 1 and 4, round trip;
3. prune: `td.prune(dag, 0.5, inputs)` on the DAG of stage 2 (else 1); FLOPs within 2 points of half,
   the pruned DAG runs at batch 1 and 4 with the unpruned DAG's output shapes, round trip.
Every output field that is not None is compared; cache objects (`past_key_values`) are not, since the
DAG may drop them (see the README). Each type runs in a forked subprocess with a timeout (`_sweep.py`).
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path
from typing import Any

from _sweep import attempt, cause, read_rows, sweep  # benchmarks/ is on sys.path when a script here runs

OUT = Path(__file__).resolve().parent / "results" / "hf_default_configs.csv"
PARTS = ("noinput", "dict", "prune")
FIELDS = [
    "model",
    "group",
    "status",
    "stage",
    "params_m",
    "main_input",
    "noinput_status",
    "noinput_meta",
    "noinput_equal_b1",
    "noinput_equal_b4",
    "noinput_roundtrip",
    "noinput_error_class",
    "noinput_error",
    "dict_status",
    "traced_with",
    "vertices",
    "dict_equal_b1",
    "dict_equal_b4",
    "dict_roundtrip",
    "dict_error_class",
    "dict_error",
    "prune_status",
    "flops_ratio",
    "pruned_runs_b1",
    "pruned_runs_b4",
    "pruned_roundtrip",
    "prune_error_class",
    "prune_error",
    "seconds",
    "error_class",
    "error",
]
STAGES = ["start", "build", "convert without inputs", "convert with a dict", "prune", "done"]
TARGET = 0.5
LENGTH, SAMPLES, IMAGE = 8, 4000, 64  # text length; audio samples; image size where the config has none
# model type (as AutoConfig.for_model spells it) per group; the group is for the summary only
TYPES = {
    "encoder": "bert roberta distilbert albert electra deberta deberta-v2 xlm-roberta mpnet camembert ernie "
    "roformer convbert squeezebert rembert big_bird nystromformer modernbert megatron-bert",
    "decoder": "gpt2 gpt_neo gptj opt llama mistral qwen2 qwen3 phi phi3 gemma gemma2 falcon bloom gpt_neox "
    "codegen olmo stablelm starcoder2",
    "encoder-decoder": "t5 mt5 bart mbart marian pegasus",
    "vision": "vit deit beit swin convnext convnextv2 resnet regnet mobilenet_v2 efficientnet segformer dinov2 "
    "poolformer mobilevit levit",
    "audio": "wav2vec2 hubert wavlm data2vec-audio whisper",
}
GROUP = {name: group for group, names in TYPES.items() for name in names.split()}
# size attribute -> its small value; set (or the default, if smaller) wherever a config class takes the
# attribute and its default is a number (None means "derived from the others" and stays None)
SIZES = (
    (2, "num_hidden_layers num_layers n_layer n_layers encoder_layers decoder_layers num_decoder_layers"),
    (64, "hidden_size d_model n_embd dim embed_dim decoder_hidden_size word_embed_proj_dim embedding_size"),
    (4, "num_attention_heads n_head n_heads num_heads encoder_attention_heads decoder_attention_heads"),
    (2, "num_key_value_heads num_kv_heads"),
    (16, "head_dim d_kv d_head rotary_dim"),
    (128, "intermediate_size ffn_dim d_ff d_inner n_inner ffn_hidden_size encoder_ffn_dim"),
    (128, "decoder_ffn_dim vocab_size decoder_vocab_size"),
    (64, "max_position_embeddings n_positions n_ctx max_target_positions image_size"),
    (32, "max_source_positions"),
    (8, "groups_width"),
    (2, "window_size"),
    (1.0, "depth_coefficient"),
)
SCALARS = {key: value for value, keys in SIZES for key in keys.split()}


def shrink_list(key: str, value: list) -> list | None:
    """Lists of per-stage sizes: depths to 1 each, widths to an eighth (a multiple of 8), heads to 2 at
    most; None for any other list (left as it is)."""
    if not value or not all(type(v) is int for v in value):
        return None
    if key in ("depths", "block_sizes", "num_block_repeats"):
        return [1] * len(value)
    if key in ("hidden_sizes", "neck_hidden_sizes", "conv_dim"):
        return [max(8, -(-v // 64) * 8) for v in value]
    if key in ("num_attention_heads", "num_heads"):
        return [min(v, 2) for v in value]
    return None


def shrink(config_class: type, defaults: Any) -> Any:
    """The config with every size attribute its class takes set small (see SCALARS, `shrink_list`);
    token ids beyond the shrunk vocabulary are moved inside it. Nothing else changes."""
    import inspect

    taken = set(inspect.signature(config_class.__init__).parameters)
    sizes: dict[str, Any] = {}
    for key in taken:
        value = getattr(defaults, key, None)
        if isinstance(value, (list, tuple)):
            small = shrink_list(key, list(value))
            if small is not None:
                sizes[key] = small
        elif key in SCALARS and type(value) is type(SCALARS[key]):
            sizes[key] = min(value, SCALARS[key])  # never larger than the default
    if "attention_types" in taken and isinstance(getattr(defaults, "attention_types", None), list):
        sizes["attention_types"] = [[kinds, 1] for kinds, _ in defaults.attention_types][:1]
    vocab = sizes.get("vocab_size")
    for key in taken:
        value = getattr(defaults, key, None)
        if vocab and key.endswith("token_id") and type(value) is int and value >= vocab:
            sizes[key] = vocab - 1
    return config_class(**sizes)


def build(name: str) -> Any:
    import torch
    import transformers

    torch.manual_seed(0)
    defaults = transformers.AutoConfig.for_model(name)
    config = shrink(type(defaults), defaults)
    return transformers.AutoModel.from_config(config).eval()


def standard_inputs(model: Any, batch: int, seed: int) -> dict:
    """The inputs `model.forward` reads, by its `main_input_name` (see the module docstring)."""
    import inspect

    import torch

    config, main = model.config, model.main_input_name
    params = inspect.signature(model.forward).parameters
    g = torch.Generator().manual_seed(seed)
    if main == "pixel_values":
        size = getattr(config, "image_size", IMAGE)
        size = size if isinstance(size, int) else size[0]
        channels = getattr(config, "num_channels", 3)
        return {main: torch.randn(batch, channels, size, size, generator=g)}
    if main == "input_values":
        return {main: torch.randn(batch, SAMPLES, generator=g)}
    made = {}
    if main == "input_features":
        shape = (batch, config.num_mel_bins, 2 * config.max_source_positions)
        made[main] = torch.randn(*shape, generator=g)
    else:
        made[main] = torch.randint(1, config.vocab_size, (batch, LENGTH), generator=g)
        if "attention_mask" in params:
            made["attention_mask"] = torch.ones(batch, LENGTH, dtype=torch.long)
    if config.is_encoder_decoder and "decoder_input_ids" in params:
        vocab = getattr(config, "decoder_vocab_size", None) or config.vocab_size
        made["decoder_input_ids"] = torch.randint(1, vocab, (batch, LENGTH), generator=g)
    return made


def dag_inputs(dag: Any, model: Any, batch: int, seed: int) -> dict:
    """Inputs for each of the DAG's inputs: shaped from its `input_meta` with the batch replaced (ids
    within the vocabulary, masks all ones), else the model's standard input of that name."""
    import torch

    from torch_dag.core.dag import DTYPES

    standard = standard_inputs(model, batch, seed)
    g = torch.Generator().manual_seed(seed)
    made = {}
    for name in dag.input_names:
        meta = dag.input_meta.get(name) or {}
        if "shape" not in meta:
            if name not in standard:
                raise KeyError(f"the DAG's input {name!r} has no recorded shape and no standard input")
            made[name] = standard[name]
            continue
        shape, dtype = [batch, *meta["shape"][1:]], DTYPES.get(meta.get("dtype", "float32"), torch.float32)
        if dtype.is_floating_point:
            made[name] = torch.randn(shape, generator=g).to(dtype)
        elif name.endswith("mask"):
            made[name] = torch.ones(shape, dtype=dtype)
        else:
            made[name] = torch.randint(1, model.config.vocab_size, shape, generator=g, dtype=dtype)
    return made


def fields(output: Any) -> dict:
    """An output's fields to compare: every one that is not None and not a cache object."""
    items = (
        output.items()
        if hasattr(output, "items")
        else enumerate(output if isinstance(output, tuple) else [output])
    )
    return {k: v for k, v in items if v is not None and not type(v).__name__.endswith("Cache")}


def equal(model: Any, dag: Any, inputs: dict) -> bool:
    import torch

    from torch_dag.core.compare import compare_outputs

    with torch.no_grad():
        reference, out = fields(model(**inputs)), fields(dag(**inputs))
    return set(reference) <= set(out) and all(compare_outputs(reference[k], out[k])[0] for k in reference)


def roundtrip(dag: Any, inputs: dict) -> bool:
    import tempfile

    import torch

    import torch_dag as td
    from torch_dag.core.compare import bitwise_equal

    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        loaded = td.load(td.save(dag, Path(tmp) / "m.dag"))
        return bitwise_equal(dag(**inputs), loaded(**inputs))


def convert(row: dict, part: str, model: Any, example: dict | None) -> Any:
    """Stage 1 (`example` None) or 2: convert, compare at batch 1 and 4 on fresh inputs, round trip."""
    import torch_dag as td

    def run() -> Any:
        dag = td.build_from_unstructured_module(model, example)
        if example is None:
            row["noinput_meta"] = ";".join(
                f"{n}:{'x'.join(map(str, m.get('shape', '?')))}" for n, m in dag.input_meta.items()
            )
        else:
            row.update(traced_with=dag.traced_with, vertices=len(dag))
        for batch in (1, 4):
            row[f"{part}_equal_b{batch}"] = equal(model, dag, dag_inputs(dag, model, batch, seed=batch))
        row[f"{part}_roundtrip"] = roundtrip(dag, dag_inputs(dag, model, 1, seed=1))
        checks = (row[f"{part}_equal_b1"], row[f"{part}_equal_b4"], row[f"{part}_roundtrip"])
        row[f"{part}_status"] = "ok" if all(checks) else "mismatch"
        return dag

    dag = attempt(row, part, run)
    return dag if row.get(f"{part}_status") == "ok" else None


def prune(row: dict, model: Any, dag: Any) -> None:
    """Stage 3: half the FLOPs; the pruned DAG runs at batch 1 and 4 with the same output shapes."""
    import torch

    import torch_dag as td

    def shapes(value: Any) -> Any:
        return {k: tuple(getattr(v, "shape", ())) for k, v in fields(value).items()}

    def run() -> None:
        inputs = dag_inputs(dag, model, 1, seed=0)
        pruned = td.prune(dag, TARGET, tuple(inputs[n] for n in dag.input_names))
        before, after = td.count_flops(dag, **inputs), td.count_flops(pruned, **inputs)
        row["flops_ratio"] = round(after.total_flops / before.total_flops, 4)
        for batch in (1, 4):
            fresh = dag_inputs(dag, model, batch, seed=batch)
            with torch.no_grad():
                row[f"pruned_runs_b{batch}"] = shapes(dag(**fresh)) == shapes(pruned(**fresh))
        row["pruned_roundtrip"] = roundtrip(pruned, inputs)
        within = abs(row["flops_ratio"] - TARGET) <= 0.02
        ok = within and row["pruned_runs_b1"] and row["pruned_runs_b4"] and row["pruned_roundtrip"]
        row["prune_status"] = "ok" if ok else "off_target" if not within else "mismatch"

    attempt(row, "prune", run)


def check(name: str, stage: Any) -> dict:
    import time
    import warnings

    def at(s: str) -> None:
        stage.value = STAGES.index(s)
        stage.report(**row)

    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    row: dict[str, Any] = {"group": GROUP.get(name, "")}
    at("build")
    try:
        model = build(name)
    except Exception as e:
        return {**row, "status": "build_error", "error_class": type(e).__name__, "error": str(e)[:300]}
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
    row["main_input"] = model.main_input_name
    at("convert without inputs")
    without = convert(row, "noinput", model, None)
    at("convert with a dict")
    with_dict = convert(row, "dict", model, standard_inputs(model, 1, seed=0))
    at("prune")
    dag = with_dict if with_dict is not None else without
    if dag is None:
        row["prune_status"] = "not_converted"
    else:
        prune(row, model, dag)
    at("done")
    row["seconds"] = round(time.perf_counter() - start, 1)
    return {**row, **overall(row)}


def overall(row: dict) -> dict:
    """`status` ok when every stage is; else the first failing stage's error as the row's error."""
    failed = [p for p in PARTS if row.get(f"{p}_status") != "ok"]
    if not failed:
        return {"status": "ok", "error_class": "", "error": ""}
    part = failed[0]
    return {
        "status": f"{part}_failed" if row.get(f"{part}_status") != "not_converted" else "not_converted",
        "error_class": row.get(f"{part}_error_class") or row.get(f"{part}_status", ""),
        "error": row.get(f"{part}_error", ""),
    }


def percent(count: int, total: int) -> str:
    return f"{count}/{total} {100 * count / total:.0f}%" if total else "-"


def summarize(rows: dict[str, dict[str, str]]) -> str:
    """Per group and in all: converted with outputs equal at batch 1 and 4 (without inputs, with a
    dict, either), pruned to half the FLOPs among the convertible; then the failures by cause."""
    lines = [
        f"{'group':16s} {'types':>5s} {'no inputs':>10s} {'dict':>10s} {'either':>10s} {'prune/conv':>11s}"
    ]
    groups: dict[str, list] = {group: [] for group in (*TYPES, "all")}
    for row in rows.values():
        groups.setdefault(row.get("group", ""), []).append(row)
        groups["all"].append(row)
    for group, members in groups.items():
        if not members:
            continue
        n = len(members)
        convertible = [r for r in members if "ok" in (r.get("noinput_status"), r.get("dict_status"))]
        lines.append(
            f"{group:16s} {n:5d} {percent(sum(r.get('noinput_status') == 'ok' for r in members), n):>10s} "
            f"{percent(sum(r.get('dict_status') == 'ok' for r in members), n):>10s} "
            f"{percent(len(convertible), n):>10s} "
            f"{percent(sum(r.get('prune_status') == 'ok' for r in convertible), len(convertible)):>11s}"
        )
    lines.append("(a conversion counts when outputs are equal at batch 1 and at batch 4 and it round-trips)")
    for part, title in zip(PARTS, ("without inputs", "with a dict", "prune (convertible types)")):
        failing = [r for r in rows.values() if r.get(f"{part}_status") not in ("ok", "not_converted")]
        causes = collections.Counter(cause(r, part) for r in failing)
        lines.append(f"failures {title}: {len(failing)}")
        for reason, count in causes.most_common():
            names = [r["model"] for r in failing if cause(r, part) == reason]
            lines.append(
                f"  {count:3d}  {reason}  ({', '.join(names[:8])}{', ...' if len(names) > 8 else ''})"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--types", nargs="+", default=list(GROUP), help="model types (AutoConfig.for_model names)"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--redo", action="store_true", help="run the chosen types again even if in the CSV")
    parser.add_argument("--summary", action="store_true", help="only print the summary of the CSV")
    parser.add_argument(
        "--verbose", action="store_true", help="show what the models print (quiet by default)"
    )
    args = parser.parse_args()
    if not args.summary:
        import torch  # noqa: F401  (imported once here; children are forked)
        import transformers  # noqa: F401

        import torch_dag  # noqa: F401

        sweep(
            args.types,
            check,
            args.out,
            FIELDS,
            workers=args.workers,
            timeout=args.timeout,
            stages=STAGES,
            retry=(lambda row: True) if args.redo else None,
            quiet=not args.verbose,
        )
    print(summarize(read_rows(args.out)))


if __name__ == "__main__":
    main()
