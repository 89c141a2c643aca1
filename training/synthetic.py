"""Embedded default dataset: users with planted daily and weekly cycles, and item text.

Every user lives through consecutive time slots, three a day (morning, midday, evening), seven days
a week, starting at a random point of the week. The category of each event is fixed by a weekly
schedule (a 7 x 3 table below) except with probability `noise`, where it is uniform. So:
- the next category follows from the position in the cycle. The daily part is visible from the
  last item alone, but Friday evening and the weekend are only predictable by counting back over
  the last ~21 events: a periodic (FFT) component has something to find;
- within a category, a user picks one of their few favourite items half of the time and otherwise
  an item by popularity (Zipf-like), so item choice is partly predictable too.
Item text names the category and when it is typical ("Morning coffee blend, category: breakfast,
typical on weekday mornings"), so text embeddings carry the category.

`prepare_dataset` reads it with `format="synthetic"`: no files, the generator output goes through
the same preprocessing as any reader's output. Deterministic for a given seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SLOTS_PER_DAY = 3
SLOT_HOURS = (8, 13, 19)  # hour of the morning, midday and evening slots
START_TIME = 1_325_462_400  # Monday 2012-01-02 00:00 UTC: the week every user's clock counts from

# name, when it is typical (for the text), adjectives, nouns: items are "adjective noun".
CATEGORIES = (
    ("breakfast", "weekday mornings",
     ("Morning", "Classic", "Organic", "Honey", "Golden", "Sunrise", "Hearty", "Light"),
     ("coffee blend", "granola", "croissant", "omelette", "pancakes", "smoothie", "bagel", "porridge")),
    ("office lunch", "weekday middays",
     ("Quick", "Fresh", "Spicy", "Grilled", "Garden", "Deli", "Express", "Warm"),
     ("salad bowl", "sandwich", "wrap", "noodle box", "soup", "burrito", "sushi set", "panini")),
    ("dinner", "weekday evenings",
     ("Homestyle", "Roast", "Family", "Slow-cooked", "Herb", "Rustic", "Savory", "Braised"),
     ("chicken", "pasta", "stew", "curry", "fish fillet", "risotto", "meatloaf", "casserole")),
    ("movie night", "Friday evenings",
     ("Blockbuster", "Cult", "Indie", "Classic", "Animated", "Thriller", "Comedy", "Sci-fi"),
     ("double feature", "film pass", "popcorn combo", "screening", "marathon", "premiere", "cinema ticket",
      "movie rental")),
    ("brunch", "weekend mornings",
     ("Lazy", "Sunday", "Bottomless", "Farmhouse", "Brioche", "Avocado", "Maple", "Benedict"),
     ("eggs", "waffles", "french toast", "mimosa", "hash browns", "crepes", "shakshuka", "brunch platter")),
    ("outdoor activity", "weekend middays",
     ("Mountain", "River", "City", "Coastal", "Forest", "Park", "Canyon", "Lakeside"),
     ("hike", "bike tour", "kayak trip", "picnic", "climbing day", "walking tour", "fishing trip", "run")),
    ("nightlife", "Saturday evenings",
     ("Rooftop", "Jazz", "Neon", "Underground", "Karaoke", "Cocktail", "Dance", "Live"),
     ("bar", "club night", "lounge", "concert", "party", "gig", "pub crawl", "show")),
    ("home cooking", "Sunday evenings",
     ("Grandma's", 'Simple', 'Comfort', 'One-pot', 'Weekend', 'Homemade', 'Hearty', 'Batch'),
     ("soup kit", "pie", "lasagna", "roast dinner", "bread", "dumplings", "chili", "meal prep")),
)

# WEEKLY_SCHEDULE[day, slot] = category index; day 0 = Monday.
WEEKLY_SCHEDULE = np.array(
    [[0, 1, 2]] * 4  # Monday-Thursday: breakfast, office lunch, dinner
    + [[0, 1, 3]]  # Friday: movie night
    + [[4, 5, 6]]  # Saturday: brunch, outdoor activity, nightlife
    + [[4, 5, 7]]  # Sunday: brunch, outdoor activity, home cooking
)


@dataclass
class SyntheticData:
    """Interactions in time order per user (users one after another) and item text.

    users, items: raw ids as strings ("u1", "17"); timestamps: seconds; categories: category index
    of each event (for analysis); item_text: raw item id -> text.
    """

    users: list[str]
    items: list[str]
    timestamps: list[float]
    categories: list[int]
    item_text: dict[str, str]


def item_category(item: int) -> int:
    """Category of synthetic item `item` (raw id, 1-based): items go round-robin over categories."""
    return (item - 1) % len(CATEGORIES)


def _item_text(item: int) -> str:
    name, when, adjectives, nouns = CATEGORIES[item_category(item)]
    rank = (item - 1) // len(CATEGORIES)  # 0, 1, ... within the category
    title = f"{adjectives[rank % len(adjectives)]} {nouns[rank // len(adjectives) % len(nouns)]}"
    if rank >= len(adjectives) * len(nouns):  # more items than name combinations
        title += f" no. {rank // (len(adjectives) * len(nouns)) + 1}"
    return f"{title}, category: {name}, typical on {when}"


def generate_synthetic(
    num_users: int = 1000,
    num_items: int = 500,
    seed: int = 0,
    min_length: int = 30,
    max_length: int = 100,
    noise: float = 0.2,
    favourite_prob: float = 0.5,
    favourites_per_category: int = 3,
) -> SyntheticData:
    """Generate the dataset (see module docstring). ~65k interactions at the defaults."""
    num_categories = len(CATEGORIES)
    if num_items < num_categories * favourites_per_category:
        raise ValueError(f"num_items={num_items} is too small: need at least "
                         f"{num_categories * favourites_per_category}")
    rng = np.random.default_rng(seed)

    item_ids = np.arange(1, num_items + 1)
    members = [item_ids[(item_ids - 1) % num_categories == c] for c in range(num_categories)]
    # Popularity inside a category: Zipf-like over a random order of its items.
    popularity = []
    for m in members:
        weights = 1.0 / np.arange(1, len(m) + 1) ** 0.8
        popularity.append(rng.permutation(weights / weights.sum()))

    cumulative = [np.cumsum(p) for p in popularity]
    users, items, timestamps, categories = [], [], [], []
    for user in range(num_users):
        length = int(rng.integers(min_length, max_length + 1))
        favourites = np.stack(
            [rng.choice(m, size=favourites_per_category, replace=False, p=p) for m, p in zip(members, popularity)]
        )  # (num_categories, favourites_per_category)
        slot = int(rng.integers(0, 7 * SLOTS_PER_DAY)) + np.arange(length)  # (length,) slots since a Monday
        day, slot_of_day = slot // SLOTS_PER_DAY, slot % SLOTS_PER_DAY
        category = WEEKLY_SCHEDULE[day % 7, slot_of_day]
        noisy = rng.random(length) < noise
        category[noisy] = rng.integers(0, num_categories, size=int(noisy.sum()))

        chosen = favourites[category, rng.integers(0, favourites_per_category, size=length)]
        by_popularity = rng.random(length) >= favourite_prob
        uniform = rng.random(length)
        for c in range(num_categories):  # inverse-CDF sampling by popularity, one category at a time
            rows = by_popularity & (category == c)
            picks = np.searchsorted(cumulative[c], uniform[rows], side="right")
            chosen[rows] = members[c][np.minimum(picks, len(members[c]) - 1)]

        hours = day * 24 + np.asarray(SLOT_HOURS)[slot_of_day]
        seconds = START_TIME + hours * 3600 + rng.integers(0, 60, size=length) * 60  # jitter never reorders slots
        users += [f"u{user + 1}"] * length
        items += [str(i) for i in chosen.tolist()]
        timestamps += seconds.astype(float).tolist()
        categories += category.tolist()
    item_text = {str(i): _item_text(i) for i in range(1, num_items + 1)}
    return SyntheticData(users, items, timestamps, categories, item_text)
