"""Check a learner's test-time copy (metabench.inference.InferenceNet) on a full run.

Trains LEARNER as the leaderboard grid did (budget quick, seed 0, one thread), then predicts every
evaluation episode twice, interleaved: through the learner's ``_inference`` (the test-time copy
its ``predict`` uses) and through the plain eval-mode network. Prints, as JSON: the queries
whose predicted class differs, the largest output difference, the seconds each way took over
all episodes, the form the copy took, and how many per-episode results (of the copy's path)
equal the stored leaderboard result of that seed, if there is one.

    python benchmarks/check_inference.py matchingnet [--task kanji-5w1s] [--seed 0] [--budget quick] [--episodes N]

Works for learners whose ``predict`` embeds through ``self._inference`` (protonet, matchingnet,
baseline, baseline++). A run takes the learner's quick training time (2-8 minutes here).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from metabench.plugins import get_host  # noqa: E402
from metabench.runner import RunRequest, execute  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("learner")
    p.add_argument("--task", default="kanji-5w1s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", default="quick", help="training budget (default quick, as the leaderboard)")
    p.add_argument("--episodes", type=int, help="only the first N evaluation episodes (default all)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    host = get_host()
    cls = host.learners.get(args.learner).obj
    own_predict = cls.predict
    stats = {"learner": args.learner, "episodes": 0, "queries": 0, "predicted_class_differs": 0,
             "max_abs_output_difference": 0.0, "copy_s": 0.0, "plain_s": 0.0, "form": None}

    def both(self, support_x, support_y, query_x):
        if not hasattr(self, "_inference"):
            raise SystemExit(f"{args.learner}: predict does not embed through self._inference")
        copy = self._inference

        def plain(x):
            with torch.no_grad():
                return self.net.eval()(x)

        timed = {}
        for name, embed in (("copy", copy), ("plain", plain)):
            self._inference = embed
            start = time.perf_counter()
            timed[name] = own_predict(self, support_x, support_y, query_x)
            stats[f"{name}_s"] += time.perf_counter() - start
        self._inference = copy
        a, b = timed["copy"], timed["plain"]
        stats["episodes"] += 1
        stats["queries"] += a.shape[0]
        stats["predicted_class_differs"] += int((a.argmax(1) != b.argmax(1)).sum())
        stats["max_abs_output_difference"] = max(stats["max_abs_output_difference"], float((a - b).abs().max()))
        stats["form"] = copy.form
        return a

    cls.predict = both
    doc = execute(RunRequest(learner=args.learner, task=args.task, budget=args.budget, seed=args.seed,
                             episodes=args.episodes), host)
    stored = sorted((ROOT / "leaderboards" / "results" / args.task / args.learner).glob(
        f"*__{args.budget}__seed{args.seed}__*.json"))
    if stored:
        published = json.loads(stored[-1].read_text())["per_episode"]
        stats["per_episode_equal_to_stored"] = f"{sum(x == y for x, y in zip(doc['per_episode'], published))}/{len(published)}"
        stats["stored"] = stored[-1].name
    stats["copy_s"], stats["plain_s"] = round(stats["copy_s"], 2), round(stats["plain_s"], 2)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
