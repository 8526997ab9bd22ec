"""Write the sentiment task's second held-out prompt set, `prompts_ood.jsonl`.

The shipped prompts (`prompts_train.jsonl`, `prompts_eval.jsonl`) ask for diaries, descriptions,
letters, posts, reviews, stories and news items in a few fixed phrasings. This set asks for kinds
of writing those files never contain (speeches, product listings, poems, dialogues, recipes,
announcements, ...), worded differently, so that an evaluation on it shows whether a policy's gain
carries over to prompts unlike the ones it was trained on. Deterministic: the same file every run.

    python benchmarks/make_ood_prompts.py [--out src/rlhfkit/tasks/data/sentiment/prompts_ood.jsonl]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

KINDS = {
    "speech": ["Draft a short toast for {s}.", "Compose the opening lines of a speech about {s}.",
               "Prepare a few words to say at a gathering about {s}."],
    "listing": ["Write a product listing for {s}.", "Describe {s} for an online shop page.",
                "Write the back-of-the-box text for {s}."],
    "poem": ["Compose a short poem about {s}.", "Write four lines of verse on {s}.",
             "Put {s} into a little rhyme."],
    "dialogue": ["Write a brief exchange between two neighbours discussing {s}.",
                 "Script a short conversation at a bus stop about {s}.",
                 "Imagine two colleagues chatting about {s}; write their lines."],
    "recipe_intro": ["Write the introduction to a recipe that mentions {s}.",
                     "Before the ingredients list, write a paragraph connecting a family dish to {s}."],
    "announcement": ["Draft a notice for a community board about {s}.",
                     "Write an announcement for a school newsletter about {s}.",
                     "Compose a short message to all residents about {s}."],
    "email": ["Write an email to a coworker about {s}.", "Reply to a colleague who asked about {s}.",
              "Compose a quick work email mentioning {s}."],
    "caption": ["Write a caption for a photo of {s}.", "Suggest a line to go under a picture of {s}."],
}

SUBJECTS = [
    "a rainy Monday morning", "the new bicycle lane", "a broken umbrella", "the office coffee machine",
    "a delayed train", "a garden after the frost", "the first snow of winter", "a closing bakery",
    "a late-night bus ride", "the town's annual fair", "a second-hand sofa", "an old photo album",
    "a noisy construction site", "a small fishing village", "a power cut in the evening",
    "a lost set of keys", "the end of summer", "a crowded waiting room", "a tiny rented flat",
    "an empty football pitch", "a stray cat in the yard", "a queue at the post office",
    "a repaired wristwatch", "the library's new opening hours", "a hill walk in fog",
    "a homemade loaf of bread", "the village pond", "a worn pair of boots", "a parking ticket",
    "a school reunion", "a leaking kitchen tap", "the local swimming pool", "an autumn market",
    "a cancelled flight", "a quiet Sunday afternoon", "a mended fence", "a thunderstorm at night",
    "a board game evening", "a street musician", "a moving day",
]


def build(n: int = 320, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pool = [(kind, t, s) for kind, templates in KINDS.items() for t in templates for s in SUBJECTS]
    rng.shuffle(pool)
    seen, out = set(), []
    for kind, template, subject in pool:
        prompt = template.format(s=subject)
        if prompt not in seen:
            seen.add(prompt)
            out.append({"prompt": prompt, "category": kind})
        if len(out) == n:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "src/rlhfkit/tasks/data/sentiment/prompts_ood.jsonl"))
    ap.add_argument("--n", type=int, default=320)
    args = ap.parse_args()
    rows = build(args.n)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {args.out}: {len(rows)} prompts in {len({r['category'] for r in rows})} kinds")


if __name__ == "__main__":
    main()
