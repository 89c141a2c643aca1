"""The item vocabulary (M2RecItemTokenizer) and the sequential-recommendation pipeline, in process and as remote code
loaded offline in a fresh process."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoTokenizer, pipeline

from m2rec import M2RecItemTokenizer, SequentialRecommendationPipeline
from m2rec.training.evaluate import save_model_folder
from test_model import MAX_LEN, NUM_ITEMS, tiny_model

# Raw ids unlike the model ids, strings and integers mixed as catalogues have them.
ITEM_ID_MAP = {str(1000 + 7 * item): item for item in range(1, NUM_ITEMS)} | {"sku-x": NUM_ITEMS}
RAW_ID = {model_id: raw for raw, model_id in ITEM_ID_MAP.items()}


def vocabulary():
    return M2RecItemTokenizer(item_id_map=ITEM_ID_MAP, model_max_length=MAX_LEN)


def test_vocabulary_pads_right_keeps_the_most_recent_items_and_decodes():
    tokenizer = vocabulary()
    long_history = [1000 + 7 * item for item in range(1, MAX_LEN + 6)]  # ints match their decimal text
    batch = tokenizer([long_history, ["sku-x", "1007"]], return_tensors="pt")
    assert batch["input_ids"].shape == (2, MAX_LEN) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][0].tolist() == list(range(6, MAX_LEN + 6))  # the last MAX_LEN items
    assert batch["input_ids"][1, :3].tolist() == [NUM_ITEMS, 1, 0]  # right-padded
    assert batch["attention_mask"].sum(dim=1).tolist() == [MAX_LEN, 2]
    assert tokenizer(long_history, truncation=False)["input_ids"] == list(range(1, MAX_LEN + 6))
    assert tokenizer(["1007"], padding="max_length", max_length=4)["input_ids"] == [1, 0, 0, 0]
    assert tokenizer.batch_decode(batch["input_ids"])[1] == ["sku-x", "1007"]
    with pytest.raises(ValueError, match=r"model item ids \[41\] are outside 0..40"):
        tokenizer.decode([3, NUM_ITEMS + 1])


def test_unknown_raw_ids_are_refused_by_name_or_skipped_and_counted():
    tokenizer = vocabulary()
    with pytest.raises(ValueError, match=r"not in this model's catalogue of 40 items: \['nope', '5'\]"):
        tokenizer(["1007", "nope", 5])
    encoded = tokenizer([["1007", "nope", 5], ["1014"]], on_unknown="skip")
    assert encoded["input_ids"] == [[1], [2]] and encoded.skipped_items == [["nope", "5"], []]
    with pytest.raises(ValueError, match="history 0 has no item of this model's catalogue"):
        tokenizer(["nope"], on_unknown="skip")
    with pytest.raises(TypeError, match="a history is a list of raw ids"):
        tokenizer("1007")


def test_vocabulary_saves_item_id_map_as_before_and_loads_with_auto_tokenizer(tmp_path):
    vocabulary().save_pretrained(tmp_path)
    assert (tmp_path / "item_id_map.json").read_text() == json.dumps(ITEM_ID_MAP)  # what m2rec-train always wrote
    loaded = AutoTokenizer.from_pretrained(tmp_path)  # the installed package registered it
    assert isinstance(loaded, M2RecItemTokenizer) and loaded.model_max_length == MAX_LEN
    assert loaded(["sku-x"])["input_ids"] == [NUM_ITEMS]


@torch.no_grad()
def test_pipeline_options(tmp_path):
    model = tiny_model()
    save_model_folder(model, ITEM_ID_MAP, tmp_path)
    # In process, with the installed package's classes: naming the class stands in for trust_remote_code.
    recommender = pipeline("sequential-recommendation", model=str(tmp_path), device="cpu",
                           pipeline_class=SequentialRecommendationPipeline)
    assert isinstance(recommender.tokenizer, M2RecItemTokenizer)
    history = [RAW_ID[item] for item in range(1, MAX_LEN + 9)]  # longer than max_len: items 1..8 are not read
    recommended = recommender(history, k=NUM_ITEMS, exclude_seen=True)
    # exclude_seen leaves out the whole history, as evaluation's exclude_history does, not only the input.
    assert [entry["item"] for entry in recommended] == [RAW_ID[item] for item in model.recommend(
        torch.arange(9, MAX_LEN + 9)[None], k=NUM_ITEMS - (MAX_LEN + 8), exclude_ids=torch.arange(1, MAX_LEN + 9))[0][0]
        .tolist()]
    among = recommender([history, history[:2]], candidates=["1007", "sku-x", "1007"], k=5)
    assert [len(row) for row in among] == [2, 2]  # each candidate once; k capped at the candidates
    assert {entry["item"] for entry in among[1]} == {"1007", "sku-x"}
    assert among[1][0]["score"] >= among[1][1]["score"]
    histories = [history, history[:2], history[3:4]]  # batched: right-padded together, scored alike
    one_by_one, batched = recommender(histories, k=4), recommender(histories, k=4, batch_size=2)
    assert [[entry["item"] for entry in row] for row in batched] == [[entry["item"] for entry in row]
                                                                     for row in one_by_one]
    assert [entry["score"] for row in batched for entry in row] == pytest.approx(
        [entry["score"] for row in one_by_one for entry in row], abs=1e-5)
    with pytest.raises(TypeError, match="unknown options"):
        recommender(history, top_k=3)


def test_pipeline_loads_offline_as_remote_code_in_a_fresh_process(tmp_path):
    model = tiny_model(seen_item_bias=True)
    with torch.no_grad():
        model.seen_item_offset.fill_(-0.5)
    folder = tmp_path / "model"
    save_model_folder(model, ITEM_ID_MAP, folder)
    script = textwrap.dedent(f"""
        import json, sys
        from transformers import AutoTokenizer, pipeline
        recommender = pipeline("sequential-recommendation", model={str(folder)!r}, trust_remote_code=True)
        assert "m2rec" not in sys.modules, "the installed package was imported: not a remote-code load"
        assert type(recommender).__module__.startswith("transformers_modules"), type(recommender).__module__
        tokenizer = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(tokenizer).__module__.startswith("transformers_modules"), type(tokenizer).__module__
        outputs = {{
            "one": recommender(["1007", "sku-x", "1014"], k=3),
            "batch": recommender([["1007"], ["1014", "nope"]], k=2, exclude_seen=True, on_unknown="skip"),
            "inferred_task": pipeline(model={str(folder)!r}, trust_remote_code=True)(["1007"], k=1),
            "encoded": tokenizer([["1007", "sku-x"]], return_tensors="pt")["input_ids"].tolist(),
        }}
        print(json.dumps(outputs))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = json.loads(result.stdout.strip().splitlines()[-1])

    def expected(histories, **options):
        with torch.no_grad():
            items, scores = model.recommend(torch.tensor(histories), **options)
        return [[{"item": RAW_ID[item], "score": score} for item, score in zip(row, row_scores)]
                for row, row_scores in zip(items.tolist(), scores.tolist())]

    def assert_same(recommended, want):
        assert [entry["item"] for entry in recommended] == [entry["item"] for entry in want]
        assert [entry["score"] for entry in recommended] == pytest.approx([entry["score"] for entry in want], abs=1e-6)

    assert outputs["encoded"] == [[1, NUM_ITEMS]]
    assert_same(outputs["one"], expected([[1, NUM_ITEMS, 2]], k=3)[0])
    assert_same(outputs["batch"][0], expected([[1]], k=2, exclude_seen=True)[0])
    assert_same(outputs["batch"][1], expected([[2]], k=2, exclude_seen=True)[0])
    assert_same(outputs["inferred_task"], expected([[1]], k=1)[0])
