"""The embedded default dataset: deterministic, planted cycles, readable through the pipeline."""

import numpy as np

from m2rec.training.data import DataArguments, TrainDataset, prepare_dataset
from m2rec.training.synthetic import CATEGORIES, SLOT_HOURS, START_TIME, WEEKLY_SCHEDULE, generate_synthetic, item_category


def test_deterministic_for_a_seed():
    a, b = generate_synthetic(num_users=50, seed=3), generate_synthetic(num_users=50, seed=3)
    assert a == b
    assert generate_synthetic(num_users=50, seed=4).items != a.items


def test_planted_structure():
    data = generate_synthetic(num_users=200, seed=0, noise=0.2)
    lengths = np.unique(data.users, return_counts=True)[1]
    assert len(lengths) == 200 and lengths.min() >= 30 and lengths.max() <= 100
    # Every event's item belongs to the event's category, and its text names the category.
    assert all(item_category(int(i)) == c for i, c in zip(data.items, data.categories))
    assert CATEGORIES[3][0] in data.item_text["4"]
    # Categories follow the weekly schedule except for the noise (uniform, so sometimes right anyway).
    timestamps = np.array(data.timestamps)
    hours = (timestamps - START_TIME).astype(int) // 3600
    day, hour = hours // 24 % 7, hours % 24
    slot = np.searchsorted(SLOT_HOURS, hour)
    follows = np.mean(WEEKLY_SCHEDULE[day, slot] == np.array(data.categories))
    assert 0.8 < follows < 0.86  # 0.8 + 0.2 / 8 expected
    assert np.all(np.diff(timestamps)[np.array(data.users[1:]) == np.array(data.users[:-1])] > 0)


def test_prepared_through_the_pipeline(tmp_path):
    args = DataArguments(synthetic_users=100, synthetic_items=120, cache_dir=str(tmp_path))
    prepared = prepare_dataset(args)
    assert prepared.num_users == 100 and 0 < prepared.num_items <= 120
    assert all(text and "category:" in text for text in prepared.item_texts[1:])
    assert prepare_dataset(args).path == prepared.path  # cached
    windows = [-(-(len(s) - 1) // 50) for s in prepared.train_sequences()]  # ceil(labels / 50) per user
    assert len(TrainDataset(prepared, max_len=50)) == sum(windows) and min(windows) >= 1 and max(windows) == 2
