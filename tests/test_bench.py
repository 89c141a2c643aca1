"""The benchmarks' own code: SASRec's key/value cache scores as its full forward, the interleaved timing helper, and
each benchmark script's main path at tiny sizes (`--smoke`)."""

import importlib
import json

import pytest
import torch

from bench.sasrec import SASRec, SASRecConfig, SASRecKVCache
from bench import timing
from bench.timing import Ratio, alternating_call_seconds, interleaved_seconds, ratio

NUM_ITEMS, MAX_LEN = 30, 12


def sasrec():
    torch.manual_seed(0)
    config = SASRecConfig(num_items=NUM_ITEMS, max_len=MAX_LEN, hidden_size=16, num_hidden_layers=2,
                          num_attention_heads=2, hidden_dropout_prob=0.0)
    return SASRec(config).eval()


def last_position_logits(model, items, lengths):
    """The full forward's scores (B, I) at each user's last item, over their first lengths[b] items."""
    width = int(lengths.max())
    prefix = torch.where(torch.arange(width)[None, :] < lengths[:, None], items[:, :width], 0)
    return model(prefix, last_position_only=True).logits


@pytest.mark.parametrize("filled", [True, False], ids=["filled-from-histories", "from-empty"])
@torch.no_grad()
def test_sasrec_kv_step_equals_the_full_forward_at_the_last_position(filled):
    """Users of different lengths, cached from one right-padded batch (or from nothing), then one event each per
    call up to max_len: every step's scores are the full forward's at that prefix's last position."""
    model = sasrec()
    items = torch.randint(1, NUM_ITEMS + 1, (3, MAX_LEN), generator=torch.Generator().manual_seed(1))
    if filled:
        lengths = torch.tensor([1, 4, 2])
        out = model(torch.where(torch.arange(4)[None, :] < lengths[:, None], items[:, :4], 0), use_cache=True)
        cache = out.cache_params
        assert cache.lengths.tolist() == lengths.tolist()
    else:
        lengths, cache = torch.zeros(3, dtype=torch.long), SASRecKVCache(model.config, batch_size=3)
    while lengths.max() < MAX_LEN:
        step = model(items[torch.arange(3), lengths][:, None], cache_params=cache, last_position_only=True)
        lengths = lengths + 1
        torch.testing.assert_close(step.logits[:, 1:], last_position_logits(model, items, lengths)[:, 1:],
                                   rtol=1e-5, atol=1e-5)
    assert cache.lengths.tolist() == lengths.tolist()
    with pytest.raises(ValueError, match="already has max_len"):
        model(items[:, :1], cache_params=cache)


def test_sasrec_kv_step_refuses_the_seen_item_offset():
    """The offset scores every seen item, which the key/value cache does not keep."""
    model = SASRec(SASRecConfig(num_items=NUM_ITEMS, max_len=MAX_LEN, hidden_size=16, seen_item_bias=True)).eval()
    cache = model(torch.tensor([[3, 4]]), use_cache=True).cache_params
    with pytest.raises(ValueError, match="re-encode the history"):
        model(torch.tensor([[5]]), cache_params=cache)


def test_sasrec_loss_can_exclude_each_positions_seen_items():
    """The baseline takes M2Rec's `loss_excludes_history`, so both can train under the history-removed protocol."""
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=NUM_ITEMS, max_len=MAX_LEN, hidden_size=16, hidden_dropout_prob=0.0,
                                loss_excludes_history=True))
    input_ids = torch.tensor([[3, 4, 5, 3, 6], [7, 8, 9, 0, 0]])
    labels = torch.tensor([[4, 5, 3, 6, -100], [8, 9, -100, -100, -100]])  # a revisit: 3 after 5
    out = model(input_ids, labels=labels)
    masked = out.logits.clone()
    for b, t in (labels != -100).nonzero().tolist():
        for item in set(input_ids[b, : t + 1].tolist()) - {labels[b, t].item()}:
            masked[b, t, item] = float("-inf")
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(masked[labels != -100],
                                                                             labels[labels != -100]))


def test_interleaved_rounds_alternate_the_rows_and_ratios_are_per_round():
    calls = []
    interleaved_seconds({"A": lambda: calls.append("A"), "B": lambda: calls.append("B")}, rounds=3,
                        min_seconds=0.0)
    assert calls == ["A", "B"] + ["A", "B"] * 3  # one warm-up call each, then A, B per round
    value = ratio([2.0, 3.0, 8.0], [1.0, 1.0, 2.0])
    assert value == Ratio(median=3.0, low=2.0, high=4.0)
    assert value.within(4.0) and not value.within(3.5) and value.within(2.0, at_most=False)


def test_alternating_calls_take_each_rounds_median_call(monkeypatch):
    """Rows alternate call by call; a row's time in a round is the median of its calls there, so one slow call (an
    interrupt, a garbage collection) does not move it; a row slower than min_seconds gets one call per round."""
    clock, calls = [0.0], []
    durations = {"A": iter([0.1] + [1.0, 1.0, 50.0] * 2), "B": iter([0.1] + [2.0, 2.0, 2.0] * 2), "slow": iter([9.0] * 3)}

    def row(name):
        def call():
            calls.append(name)
            clock[0] += next(durations[name])
        return call

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    seconds = alternating_call_seconds({name: row(name) for name in ("A", "B", "slow")}, rounds=2, min_seconds=0.3)
    assert calls == ["A", "B", "slow"] + (["A", "B", "slow"] + ["A", "B"] * 2) * 2  # warm-ups, then call by call
    assert seconds == {"A": [1.0, 1.0], "B": [2.0, 2.0], "slow": [9.0, 9.0]}
    assert ratio(seconds["A"], seconds["B"]) == Ratio(median=0.5, low=0.5, high=0.5)


@pytest.mark.parametrize("script", ["bench_streaming", "bench_scan", "bench_efficiency", "bench_filter"])
def test_each_benchmark_runs_at_tiny_sizes(script, capsys):
    table = importlib.import_module(f"bench.{script}").main(["--smoke"])
    assert "(" in table and "–" in table  # ratios come with their range
    assert table in capsys.readouterr().out



def test_efficiency_benchmark_trains_at_the_batch_it_is_given(capsys):
    """--train-batch-size sets the training batch of the epoch it times (the shipped ML-1M recipe trains at 64)."""
    module = importlib.import_module("bench.bench_efficiency")
    table = module.main(["--smoke", "--train-batch-size", "2"])
    assert "| epoch s, batch 2 |" in table
    assert "| epoch s, batch 4 |" in module.main(["--smoke"])

@pytest.mark.slow
def test_large_catalogue_benchmark_runs_at_tiny_sizes(tmp_path, capsys):
    """bench_large_catalogue's children (one per loss) at 2,000 items: the table, and the JSON with each loss's step
    time, its ratio to the full softmax of the same round and the peak memory."""
    module = importlib.import_module("bench.bench_large_catalogue")
    table = module.main(["--smoke", "--steps", "1", "--losses", "full softmax", "sampled, mixed", "--out",
                         str(tmp_path / "out.json")])
    assert "(" in table and "–" in table and table in capsys.readouterr().out
    report = json.loads((tmp_path / "out.json").read_text())
    assert [row["loss"] for row in report["rows"]] == ["full softmax", "sampled, mixed"]
    for row in report["rows"]:
        assert row["step_seconds_median"] > 0 and row["peak_rss_mb_max"] > row["step_growth_mb_max"] >= 0
        assert row["loss_last_step"] > 0
    assert report["rows"][0]["time_vs_full"] == {"median": 1.0, "low": 1.0, "high": 1.0}


def test_cold_start_benchmark_on_a_tiny_synthetic_run(tmp_path, capsys):
    """Items held out of training and added by text: the id+text head ranks them far better than the id head and
    random; popularity cannot rank them at all; the warm models never saw them."""
    cold_start = importlib.import_module("bench.cold_start")
    table = cold_start.main(["synthetic", "--runs-root", str(tmp_path), "--cold-share", "0.2",
                             "--synthetic_users", "200", "--synthetic_items", "60", "--max_len", "20",
                             "--num_train_epochs", "3", "--train_batch_size", "64"])
    assert table in capsys.readouterr().out
    (row,) = [json.loads(line) for line in (tmp_path / "cold_start.jsonl").read_text().splitlines()]
    results = row["results"]
    assert row["num_cold_items"] == 12 and row["num_cold_test_users"] > 20
    id_text, id_only = results["M2Rec, id+text head"], results["M2Rec, id head"]
    assert results["popularity (warm training data)"]["HR@20"] == 0
    assert id_text["NDCG@10"] > max(id_only["NDCG@10"], results["random"]["NDCG@10"]) + 0.1, results
    warm_ids = json.loads((tmp_path / "synthetic" / "id+text" / "best" / "item_id_map.json").read_text())
    assert set(row["warm_test"]) == {"id", "id+text"} and 0 <= row["warm_test"]["id"]["NDCG@10"] <= 1
    assert len(warm_ids) == 48 and "--num_train_epochs 3" in row["command"]


def test_cold_items_by_time_are_the_late_newcomers():
    from m2rec.training.data import PreparedDataset

    cold_start = importlib.import_module("bench.cold_start")
    data = PreparedDataset.from_sequences([[1, 2, 3], [2, 4, 5]], user_ids=["u", "v"], item_id_map={},
                                          item_texts=["", "a", "b", "c", "d", None],
                                          timestamps=[[0.0, 10.0, 95.0], [1.0, 50.0, 100.0]])
    assert cold_start.cold_items(data, "time", 0.1, seed=0) == [3]  # 5 came late too, but has no text
    assert len(cold_start.cold_items(data, "random", 0.4, seed=0)) == 2
