"""m2rec-evaluate: items matched through the model's own item map, other data, strict model loading.

One tiny table-format run (the synthetic data written as CSV files) is trained once for the module.
"""

import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import run_cli

from m2rec.training.evaluate import EvaluateArguments, evaluation_data_arguments, load_trained_model, main
from m2rec.training.synthetic import generate_synthetic

# Without the text branch (no encoder to load): item identity is what these tests are about.
TABLE_RUN = ["--format", "table", "--max_len", "30", "--fusion", "none", "--train_batch_size", "64",
             "--eval_batch_size", "128", "--learning_rate", "0.003", "--seed", "0", "--num_train_epochs", "1"]


def write_rows(path, rows):
    path.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    synthetic = generate_synthetic(300, 120, seed=0)
    write_rows(root / "interactions.csv",
               zip(synthetic.users, synthetic.items, (int(t) for t in synthetic.timestamps)))
    (root / "items.csv").write_text("item_id,title\n" + "".join(
        f'{item},"{text}"\n' for item, text in synthetic.item_text.items()))
    run_cli("m2rec.training.train", TABLE_RUN + [
        "--data_path", str(root / "interactions.csv"), "--item_path", str(root / "items.csv"),
        "--output_dir", str(root / "run"), "--cache_dir", str(root / "cache")], root)
    return root


def evaluate_cli(run, *options):
    """m2rec-evaluate, in this process (faster than a subprocess); returns the printed JSON."""
    output = run / "eval.json"
    main(["--model", str(run / "run" / "best"), "--cpu", "true", "--eval_batch_size", "128", "--output", str(output),
          *options])
    return json.loads(output.read_text())


def read_rows(path):
    return [line.split(",") for line in path.read_text().splitlines()[1:]]


METRICS = ("HR@5", "NDCG@5", "MRR@5", "HR@10", "NDCG@10", "MRR@10", "HR@20", "NDCG@20", "MRR@20", "num_users")


def test_row_order_of_the_data_file_cannot_change_the_metrics(run):
    info = json.loads((run / "run" / "best" / "training_info.json").read_text())
    assert info["data_fingerprint"] == json.loads(next((run / "cache").glob("table-*/meta.json")).read_text())[
        "fingerprint"]
    as_trained = evaluate_cli(run)
    assert as_trained["NDCG@10"] == pytest.approx(info["metrics"]["test"]["NDCG@10"], abs=1e-12)
    assert as_trained["data"]["same_as_training"] is True and as_trained["data"]["unknown_items"] == 0

    # Shuffled rows number users and items differently; the model's item_id_map.json keeps each score on its item.
    rows = read_rows(run / "interactions.csv")
    random.Random(0).shuffle(rows)
    write_rows(run / "shuffled.csv", rows)
    shuffled = evaluate_cli(run, "--data_path", str(run / "shuffled.csv"), "--item_path", str(run / "items.csv"))
    assert shuffled["data"]["same_as_training"] is False
    assert shuffled["data"]["unknown_items"] == 0
    for name in METRICS:
        assert shuffled[name] == pytest.approx(as_trained[name], abs=1e-9), name


def test_other_data_counts_items_unknown_to_the_model(run):
    rows = read_rows(run / "interactions.csv")
    last_row = {user: index for index, (user, _, _) in enumerate(rows)}  # rows are in time order per user
    for user in [f"u{k}" for k in range(1, 7)]:  # an unknown test target: the user cannot be ranked
        rows[last_row[user]][1] = "new-a"
    for user in [f"u{k}" for k in range(11, 17)]:  # an unknown item inside the input: dropped from it
        index = last_row[user] - 5
        rows.insert(index, [user, "new-b", str(int(rows[index][2]) - 1)])
    write_rows(run / "other.csv", rows)
    other = evaluate_cli(run, "--data_path", str(run / "other.csv"))
    assert other["num_users"] == 294
    assert {key: other["data"][key] for key in ("unknown_items", "unknown_inputs_dropped",
                                                 "users_skipped_unknown_target", "users_skipped_no_known_input")} == {
        "unknown_items": 2, "unknown_inputs_dropped": 6, "users_skipped_unknown_target": 6,
        "users_skipped_no_known_input": 0}
    assert sorted(other["data"]["unknown_item_examples"]) == ["new-a", "new-b"]
    assert other["data"]["same_as_training"] is False


def test_a_relative_data_path_not_found_from_here_says_how_to_point_at_the_data(run, tmp_path, monkeypatch):
    info = json.loads((run / "run" / "best" / "training_info.json").read_text())
    info["train_config"]["data_path"] = "data/interactions.csv"
    monkeypatch.chdir(tmp_path)
    message = (r"data_path='data/interactions.csv' \(training_info.json, a path relative to where training ran\) is "
               r"not found from .* pass --data_path")
    with pytest.raises(FileNotFoundError, match=message):
        evaluation_data_arguments(info, EvaluateArguments(model="unused"))
    (tmp_path / "data").mkdir()
    shutil.copy(run / "interactions.csv", tmp_path / "data")
    assert evaluation_data_arguments(info, EvaluateArguments(model="unused")).data_path == "data/interactions.csv"
    moved = EvaluateArguments(model="unused", data_path=str(run / "interactions.csv"))
    assert evaluation_data_arguments(info, moved).data_path == str(run / "interactions.csv")


def test_a_folder_holding_another_model_type_is_refused(run, tmp_path):
    # Today's failure: transformers' type warning, 46 keys reported, then an untrained model's metrics and exit 0.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.sasrec import SASRec, SASRecConfig

    folder = tmp_path / "sasrec"
    SASRec(SASRecConfig(num_items=120, max_len=30)).save_pretrained(folder)
    for name in ("item_id_map.json", "training_info.json"):
        shutil.copy(run / "run" / "best" / name, folder / name)
    with pytest.raises(ValueError, match="config.json: model_type 'sasrec-bench', not 'm2rec'"):
        main(["--model", str(folder), "--cpu", "true"])


def truncate(weights):
    weights.write_bytes(weights.read_bytes()[:-1000])


def edit_tensors(edit):
    def apply(weights):
        tensors = load_file(weights)
        edit(tensors)
        save_file(tensors, weights, metadata={"format": "pt"})
    return apply


def edit_config(key, value):
    def apply(weights):
        config = json.loads((weights.parent / "config.json").read_text())
        (weights.parent / "config.json").write_text(json.dumps({**config, key: value}))
    return apply


@pytest.mark.parametrize("damage, message", [
    (truncate, r"cannot read .*model\.safetensors: it is truncated"),
    (edit_tensors(lambda t: t.pop("m2rec.layers.0.mixer.D")), r"'missing_keys': \['m2rec\.layers\.0\.mixer\.D'\]"),
    (edit_tensors(lambda t: t.update(extra=torch.zeros(2))), r"'unexpected_keys': \['extra'\]"),
    (edit_config("num_items", 130), r"'mismatched_keys': \[\('m2rec\.item_embeddings\.weight'"),
    (edit_tensors(lambda t: t["m2rec.layers.0.mixer.D"].fill_(float("nan"))),
     r"holds NaN or infinite weights: m2rec\.layers\.0\.mixer\.D \(128 of 128 values\)"),
], ids=["truncated", "missing", "unexpected", "mismatched", "nan"])
def test_weights_that_do_not_load_exactly_are_refused(run, tmp_path, damage, message):
    folder = shutil.copytree(run / "run" / "best", tmp_path / "best")
    damage(folder / "model.safetensors")
    with pytest.raises(ValueError, match=message) as error:
        load_trained_model(folder)
    assert str(folder) in str(error.value)


def test_scores_are_ranked_in_blocks_of_rows_with_the_same_metrics(run, monkeypatch):
    """With at most 500 scores per block (4 users of the 121-column catalogue per block, batches of 128 users),
    every metric is the one of whole batches: the blocks bound memory for large catalogues without changing the
    numbers."""
    from m2rec.training import evaluate as evaluate_module

    whole = evaluate_cli(run, "--exclude_history", "true")
    monkeypatch.setattr(evaluate_module, "EVAL_SCORES_PER_BLOCK", 500)
    blocks = []
    real_rank_block = evaluate_module.rank_block
    monkeypatch.setattr(evaluate_module, "rank_block",
                        lambda model, batch, exclude: blocks.append(len(batch["target"])) or real_rank_block(
                            model, batch, exclude))
    in_blocks = evaluate_cli(run, "--exclude_history", "true")
    assert max(blocks) == 4 and sum(blocks) == whole["num_users"]
    for name, value in whole.items():
        if isinstance(value, float):
            assert in_blocks[name] == pytest.approx(value, abs=1e-12), name
