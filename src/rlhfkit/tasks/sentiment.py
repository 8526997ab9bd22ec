"""Task "sentiment": write short everyday texts; the gold judge is how positive they read.

Prompts are neutral requests (templates x topics: reviews, descriptions, letters, diary entries,
posts... about films, places, products, food and ordinary events), so the default model's replies
vary in tone and there is something to learn. The gold judge is VADER's compound score
(Hutto & Gilbert 2014) of the response, in [-1, 1]: a lexicon-and-rules scorer that nobody in
this project wrote or trains against, which is what a gold oracle must be (docs/concepts.md: Simulated human feedback).

The held-out split is 20% of the template x topic pairs, chosen by hash: no eval prompt is a
training prompt, though each template and topic also occurs in training in other pairings.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from rlhfkit.config.extras import require
from rlhfkit.tasks.base import Task

# (family, template). The family is the preference data's `category`.
TEMPLATES = [
    ("review", "Write a short review of {t}."),
    ("review", "Give your honest opinion of {t} in a few sentences."),
    ("review", "What do you think of {t}? Answer in two or three sentences."),
    ("review", "Rate {t} and explain your rating briefly."),
    ("description", "Describe {t} in a few sentences."),
    ("description", "Tell me about {t}."),
    ("description", "Write three sentences about {t}."),
    ("description", "Explain to a visitor what to expect from {t}."),
    ("letter", "Write a short letter to a friend about {t}."),
    ("letter", "Write a brief email to a coworker mentioning {t}."),
    ("letter", "Write a text message to your sister about {t}."),
    ("letter", "Write a postcard to your grandmother about {t}."),
    ("diary", "Write a short diary entry about {t}."),
    ("diary", "Write a few sentences about your experience with {t}."),
    ("post", "Write a short social media post about {t}."),
    ("post", "Write a two-sentence blog post about {t}."),
    ("post", "Write a short forum comment about {t}."),
    ("story", "Write a very short story involving {t}."),
    ("story", "Write the opening lines of a story set around {t}."),
    ("news", "Write a short news item about {t}."),
]

TOPICS = {
    "film and books": [
        "a movie you watched last weekend", "a new superhero film", "an old black-and-white film",
        "a documentary about the ocean", "a romantic comedy", "a mystery novel", "a cookbook",
        "a TV series that just ended", "a music album released this year", "a live concert",
        "a theatre play in a small venue", "a video game sequel", "a podcast about history",
    ],
    "food": [
        "a local pizza place", "a new vegetarian restaurant", "a street food market",
        "a family-run bakery", "a sushi bar downtown", "a hotel breakfast buffet",
        "a food truck", "a coffee shop near the station", "a fast food chain",
        "a homemade soup recipe", "a school cafeteria", "an expensive steakhouse", "a cooking class",
    ],
    "products": [
        "a new smartphone", "a pair of running shoes", "a budget laptop", "a coffee maker",
        "a pair of wireless headphones", "an electric scooter", "a winter jacket",
        "a vacuum cleaner", "a board game", "a camping tent", "a smartwatch", "an office chair",
        "a smart home speaker",
    ],
    "places": [
        "a small coastal town", "the city of Lisbon", "a busy airport", "a public library",
        "a mountain village", "a city park", "a shopping mall", "a museum of modern art",
        "a train station at night", "a university campus", "a hospital waiting room",
        "a neighbourhood you used to live in", "a hiking trail", "a secondhand bookshop",
    ],
    "everyday life": [
        "a day at the beach", "a rainy Monday morning", "a long train journey",
        "the first day at a new job", "moving to a new apartment", "a family dinner",
        "a visit to the dentist", "a weekend camping trip", "a power outage in the evening",
        "a traffic jam", "a job interview", "a birthday party", "a flight delay",
        "learning to ride a bicycle", "a neighbour's loud dog", "a week of exams", "a yoga class",
    ],
    "people and work": [
        "a new manager", "a customer service call", "an old school friend", "a group project",
        "a new neighbour", "a driving instructor", "a landlord", "a hairdresser",
        "a team meeting", "a volunteer day at a shelter",
    ],
}


class SentimentTask(Task):
    name = "sentiment"
    # VADER compound differences between two replies are typically 0.2-1.0: beta=5 labels a pair
    # 0.2 apart correctly 73% of the time, 0.5 apart 92% of the time (noisy but informative).
    default_beta = 5.0

    def __init__(self):
        self._vader = None

    def _all_prompts(self) -> list[dict]:
        topics = [t for group in TOPICS.values() for t in group]
        return [{"prompt": tmpl.format(t=topic), "category": family}
                for (family, tmpl), topic in itertools.product(TEMPLATES, topics)]

    def gold_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """VADER compound score of each response in [-1, 1] (the prompt is not looked at)."""
        if self._vader is None:
            vader = require("vaderSentiment.vaderSentiment", "tasks", "the sentiment task's gold judge (VADER)")
            self._vader = vader.SentimentIntensityAnalyzer()
        return [float(self._vader.polarity_scores(r)["compound"]) for r in responses]
