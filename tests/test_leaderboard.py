"""Leaderboards and publishing: deterministic builds, check, statistics, layout, and publish's refusals.

Result documents are made synthetically (valid per ``schema_problems``), never by training.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import pytest
from scipy import stats as st

import metabench.plugins
from metabench import MetabenchError, hookimpl
from metabench.episodes import episodes_sha256, eval_draws
from metabench.leaderboard import build, check, fmt_mean_ci, generate, holm
from metabench.results import result_filename, schema_problems, write_result
from metabench.stats import summarize

from conftest import TINY, TinySource, ToyLearner, error_line, host_with, run_cli

SHA_A, SHA_B = "a" * 64, "b" * 64


def make_doc(values, *, task="kanji-5w1s", learner="protonet", backbone="conv4", budget="quick", seed=0,
             version=1, sha=SHA_A, metric="accuracy", higher=True, config=None, transductive=False,
             trained_on=None) -> dict:
    doc = {
        "schema_version": 1, "metabench_version": "0.1.0",
        "task": {"name": task, "version": version, "ways": 5, "shots": 1, "queries": 15, "episodes": len(values),
                 "episodes_sha256": sha, "metric": metric, "higher_is_better": higher},
        "learner": {"name": learner, "plugin": learner, "version": "0.1.0", "config": config or {"lr": 0.1},
                    "transductive": transductive},
        "backbone": {"name": backbone, "options": {"width": 64}},
        "seed": seed, "budget": budget, "per_episode": [float(v) for v in values],
        "summary": summarize(values).to_dict(), "timing": {"meta_train_s": 12.0, "eval_s": 3.0},
        "environment": {"python": "3.11.7", "torch": "2.4.0", "device": "cpu", "git_commit": None},
    }
    if trained_on is not None:  # the task the learner was meta-trained on (``metabench eval``: another one)
        doc["trained_on"] = {"task": trained_on, "version": 1, "image_size": 28}
    assert schema_problems(doc) == []
    return doc


def spread(mean, n=20, width=0.1):
    """n values with the given mean, spread deterministically."""
    return [mean + width * ((i * 7) % n - (n - 1) / 2) / n for i in range(n)]


def board(out: Path, task: str) -> dict:
    return json.loads((out / f"{task}.json").read_text())


def rows(out: Path, task: str, section: int = 0) -> list[dict]:
    return board(out, task)["sections"][section]["rows"]


@pytest.fixture
def lb(tmp_path):
    """A leaderboard folder with results/ inside: returns (out, results)."""
    out = tmp_path / "leaderboards"
    (out / "results").mkdir(parents=True)
    return out, out / "results"


def standard(results: Path) -> None:
    for seed in (0, 1, 2):
        write_result(make_doc(spread(0.80 + 0.01 * seed), seed=seed), results / "kanji-5w1s" / "protonet")
    write_result(make_doc(spread(0.60), learner="maml", transductive=True), results / "kanji-5w1s" / "maml")
    write_result(make_doc(spread(0.9), task="kanji-5w5s"), results / "kanji-5w5s" / "protonet")


# -- build and check --------------------------------------------------------------------------
def test_build_is_byte_identical_twice(lb):
    out, results = lb
    standard(results)
    build([results], out, out / "published.toml")
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {"README.md", "kanji-5w1s.md", "kanji-5w1s.csv", "kanji-5w1s.json", "kanji-5w1s.svg",
            "kanji-5w1s.png"} <= set(first)
    for p in out.iterdir():
        if p.is_file():
            p.unlink()
    build([results], out, out / "published.toml")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == first
    assert generate([results], out) == first  # and in memory, without writing


def test_check_passes_then_fails_naming_the_file(lb):
    out, results = lb
    standard(results)
    build([results], out)
    assert check([results], out) == []
    table = out / "kanji-5w1s.md"
    table.write_text(table.read_text().replace("protonet", "pr0tonet", 1))
    assert check([results], out) == [f"{table}: differs from what the results regenerate"]
    build([results], out)
    assert check([results], out) == []
    write_result(make_doc(spread(0.7), learner="matchingnet"), results / "kanji-5w1s" / "matchingnet")
    problems = check([results], out)
    assert f"{out / 'kanji-5w1s.md'}: differs from what the results regenerate" in problems
    assert f"{out / 'README.md'}: differs from what the results regenerate" in problems
    write_result(make_doc(spread(0.7), task="kanji-20w1s"), results / "kanji-20w1s" / "protonet")
    assert f"{out / 'kanji-20w1s.md'}: missing" in check([results], out)


def test_check_cli_exits_1_and_build_removes_stale_tables(lb, capsys):
    out, results = lb
    standard(results)
    args = ["--results", str(results), "--out", str(out)]
    assert run_cli(capsys, "leaderboard", "build", *args)[0] == 0
    assert run_cli(capsys, "leaderboard", "check", *args)[0] == 0
    for p in (results / "kanji-5w5s").rglob("*.json"):
        p.unlink()
    code, _, err = run_cli(capsys, "leaderboard", "check", *args)
    assert code == 1 and f"{out / 'kanji-5w5s.md'}: no result backs it" in err
    code, stdout, _ = run_cli(capsys, "leaderboard", "build", *args)
    assert code == 0 and "removed" in stdout and not (out / "kanji-5w5s.md").exists()
    assert run_cli(capsys, "leaderboard", "check", *args)[0] == 0


def test_invalid_result_file_is_named(lb, capsys):
    out, results = lb
    (results / "broken.json").write_text("{}")
    code, _, err = run_cli(capsys, "leaderboard", "build", "--results", str(results), "--out", str(out))
    assert code == 2 and "broken.json" in err and "not a valid metabench result" in err


# -- statistics and layout --------------------------------------------------------------------
def test_holm_function_against_hand_values():
    # sorted p: 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04, raised to the running max 0.06)
    assert holm([0.04, 0.01, 0.03]) == pytest.approx([0.06, 0.03, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []


def test_paired_tests_are_holm_corrected_and_ties_marked(lb):
    out, results = lb
    n = 20
    best = spread(0.8, n)
    noise = [((i * 5) % 7 - 3) / 30 for i in range(n)]  # a fixed zero-ish-mean pattern
    mean_noise = math.fsum(noise) / n
    noise = [e - mean_noise for e in noise]
    sd = math.sqrt(math.fsum(e * e for e in noise) / (n - 1))
    targets = {"far": 1e-6, "near": 0.03, "nearer": 0.04}  # raw p-values before correction

    def shifted(p):  # best minus a constant chosen so the paired t-test gives p, plus the noise
        delta = st.t.ppf(1 - p / 2, n - 1) * sd / math.sqrt(n)
        return [b - delta + e for b, e in zip(best, noise)]

    write_result(make_doc(best, learner="best"), results)
    values = {name: shifted(p) for name, p in targets.items()}
    for name, v in values.items():
        write_result(make_doc(v, learner=name), results)
    build([results], out)
    got = {r["learner"]: r for r in rows(out, "kanji-5w1s")}
    raw = {name: float(st.ttest_rel(v, best).pvalue) for name, v in values.items()}
    assert raw["near"] < 0.05 and raw["nearer"] < 0.05  # each alone would be "worse"
    order = sorted(raw, key=raw.get)  # Holm by hand: k-th smallest times (m - k + 1), running maximum
    hand, running = {}, 0.0
    for k, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - k) * raw[name]))
        hand[name] = running
    for name in targets:
        assert got[name]["vs_best"]["p_value"] == pytest.approx(raw[name], rel=1e-5)
        assert got[name]["vs_best"]["p_holm"] == pytest.approx(hand[name], rel=1e-5)
    assert got["best"]["vs_best"]["status"] == "best" and got["best"]["rank"] == 1
    assert got["far"]["vs_best"]["status"] == "worse"
    assert got["near"]["vs_best"]["status"] == got["nearer"]["vs_best"]["status"] == "tied"
    md = (out / "kanji-5w1s.md").read_text()
    assert md.count("| tied (Holm p = ") == 2 and md.count("| worse (Holm p = ") == 1
    # the rank test beside it: scipy's Wilcoxon p-values of the same pairs, Holm-corrected on their own
    w_raw = {name: float(st.wilcoxon(v, best).pvalue) for name, v in values.items()}
    w_holm = dict(zip(w_raw, holm(list(w_raw.values()))))
    for name in targets:
        assert got[name]["vs_best"]["wilcoxon_p_value"] == pytest.approx(w_raw[name], rel=1e-5)
        assert got[name]["vs_best"]["wilcoxon_p_holm"] == pytest.approx(w_holm[name], rel=1e-5)
        assert got[name]["vs_best"]["wilcoxon_status"] == ("tied" if w_holm[name] >= 0.05 else "worse")
    assert got["best"]["vs_best"]["wilcoxon_p_value"] is None and got["best"]["vs_best"]["wilcoxon_status"] is None
    table = {r["learner"]: r for r in csv_rows(out, "kanji-5w1s")}
    assert list(table["far"])[-5:] == ["p_holm", "wilcoxon_vs_best", "wilcoxon_p_value", "wilcoxon_p_holm",
                                       "results"]
    assert float(table["far"]["wilcoxon_p_value"]) == pytest.approx(w_raw["far"], rel=1e-5)
    assert table["best"]["wilcoxon_p_value"] == table["best"]["wilcoxon_vs_best"] == ""


def test_multi_seed_row_and_unpaired_episode_set(lb):
    out, results = lb
    for seed, m in ((0, 0.70), (1, 0.74)):
        write_result(make_doc(spread(m), seed=seed), results)
    write_result(make_doc(spread(0.95, 10), learner="maml", sha=SHA_B), results)
    build([results], out)
    first, other = rows(out, "kanji-5w1s")
    assert first["learner"] == "protonet" and first["seeds"] == [0, 1] and first["rank"] == 1
    assert first["mean"] == pytest.approx(0.72) and first["seed_std"] == pytest.approx(0.04 / math.sqrt(2), rel=1e-5)
    assert first["ci95"] == pytest.approx(summarize(spread(0.72)).ci95, rel=1e-5)
    assert other["rank"] is None and other["vs_best"]["status"] == "unpaired"
    md = (out / "kanji-5w1s.md").read_text()
    assert "cannot be paired: 10 episodes, not the best row's 20" in md
    assert "0, 1 (std 2.83%)" in md and "72.00 ± " in md
    assert "[seed 0](results/kanji-5w1s__protonet__conv4__quick__seed0.json)" in md  # relative links


def test_regression_sorted_ascending(lb):
    out, results = lb
    for learner, m in (("a", 0.5), ("b", 0.2), ("c", 0.9)):
        write_result(make_doc(spread(m), task="sinusoid-5s", learner=learner, metric="mse", higher=False), results)
    build([results], out)
    got = rows(out, "sinusoid-5s")
    assert [r["learner"] for r in got] == ["b", "a", "c"] and [r["rank"] for r in got] == [1, 2, 3]
    assert "mse (lower is better)" in (out / "sinusoid-5s.md").read_text()


def test_budgets_are_separate_rankings(lb):
    out, results = lb
    write_result(make_doc(spread(0.9), budget="paper"), results)
    write_result(make_doc(spread(0.5), learner="maml", budget="smoke"), results)
    write_result(make_doc(spread(0.6), budget="smoke"), results)
    build([results], out)
    sections = board(out, "kanji-5w1s")["sections"]
    assert [s["budget"] for s in sections] == ["paper", "smoke"]
    assert [[(r["learner"], r["rank"]) for r in s["rows"]] for s in sections] == \
        [[("protonet", 1)], [("protonet", 1), ("maml", 2)]]
    md = (out / "kanji-5w1s.md").read_text()
    assert md.index("## Budget `paper`") < md.index("## Budget `smoke`")


def test_summary_blank_cells_and_published_only_on_matching_protocol(lb):
    out, results = lb
    write_result(make_doc(spread(0.8), learner="maml"), results)
    write_result(make_doc(spread(0.9), task="omniglot-5w1s", learner="maml"), results)
    write_result(make_doc(spread(0.85), task="omniglot-5w1s"), results)
    (out / "published.toml").write_text(
        '[[result]]\nlearner = "maml"\ntask = "omniglot-5w1s"\nvalue = 98.7\nci95 = 0.4\n'
        'source = "Finn et al. 2017, Table 1"\n'
        '[[result]]\nlearner = "maml"\ntask = "omniglot-5w5s"\nvalue = 99.9\nsource = "Finn et al. 2017, Table 1"\n')
    build([results], out, out / "published.toml")
    lines = (out / "README.md").read_text().splitlines()
    header = next(x for x in lines if x.startswith("| learner"))
    assert header.index("kanji-5w1s") < header.index("omniglot-5w1s")
    maml = next(x for x in lines if x.startswith("| maml |"))
    protonet = next(x for x in lines if x.startswith("| protonet |"))
    assert maml.split(" | ")[2] == "**80.00 ± 1.38%**"  # kanji: ours only (best: bold), no published number
    assert "(paper 98.7 ± 0.4% [1])" in maml.split(" | ")[3]
    assert protonet.split("|")[3].strip() == ""  # protonet has no kanji result: blank, not averaged
    assert "1. Finn et al. 2017, Table 1" in lines
    assert "98.7 ± 0.4% — Finn et al. 2017, Table 1" in (out / "omniglot-5w1s.md").read_text()
    assert "Finn" not in (out / "kanji-5w1s.md").read_text()


def test_duplicate_seed_is_refused(lb):
    out, results = lb
    write_result(make_doc(spread(0.8)), results / "x")
    write_result(make_doc(spread(0.7)), results / "y")
    with pytest.raises(MetabenchError, match="for seed 0 on the same episodes: .*x/.* and .*y/"):
        build([results], out)


# -- cross-task results ------------------------------------------------------------------------
def csv_rows(out: Path, task: str) -> list[dict]:
    return list(csv.DictReader((out / f"{task}.csv").read_text().splitlines()))


def test_cross_task_result_gets_its_own_section_naming_its_training_task(lb):
    out, results = lb
    write_result(make_doc(spread(0.80)), results / "same")
    write_result(make_doc(spread(0.60), learner="maml"), results / "same")
    # the same learner, seed, budget and test episodes, meta-trained on another task (and better)
    write_result(make_doc(spread(0.90), trained_on="omniglot-5w1s"), results / "cross")
    build([results], out)
    same, cross = board(out, "kanji-5w1s")["sections"]
    assert same["trained_on"] is None and cross["trained_on"] == "omniglot-5w1s"
    assert [(r["learner"], r["rank"], r["trained_on"]) for r in same["rows"]] == \
        [("protonet", 1, None), ("maml", 2, None)]  # ranked without the (better) cross-task row
    assert [(r["learner"], r["rank"], r["vs_best"]["status"], r["trained_on"], r["seeds"]) for r in cross["rows"]] == \
        [("protonet", 1, "best", "omniglot-5w1s", [0])]
    assert same["rows"][0]["mean"] == pytest.approx(0.80) and cross["rows"][0]["mean"] == pytest.approx(0.90)

    table = csv_rows(out, "kanji-5w1s")
    assert [(r["learner"], r["trained_on"], r["rank"]) for r in table] == \
        [("protonet", "", "1"), ("maml", "", "2"), ("protonet", "omniglot-5w1s", "1")]

    md = (out / "kanji-5w1s.md").read_text()
    heading = "## Cross-task: trained on omniglot-5w1s (budget `quick`) · task version 1"
    assert md.index("## Budget `quick` · task version 1") < md.index(heading)
    cross_lines = [x for x in md[md.index(heading):].splitlines() if x.startswith("| 1 |")]
    assert len(cross_lines) == 1 and "| protonet (trained on omniglot-5w1s) | conv4 | 90.00 ± " in cross_lines[0]
    same_part = md[:md.index(heading)]
    assert "| 1 | protonet | conv4 | 80.00 ± " in same_part and "trained on" not in same_part
    assert "protonet (trained on omniglot-5w1s)" in (out / "kanji-5w1s.svg").read_text()  # the plot's row label
    assert check([results], out) == []


def test_cross_task_results_of_two_training_tasks_get_two_sections(lb):
    out, results = lb
    write_result(make_doc(spread(0.80)), results)
    write_result(make_doc(spread(0.85), budget="paper"), results)
    write_result(make_doc(spread(0.70), trained_on="omniglot-5w1s"), results / "omniglot")
    write_result(make_doc(spread(0.75), trained_on="omniglot-5w1s", budget="paper"), results / "omniglot")
    write_result(make_doc(spread(0.65), trained_on="miniimagenet-5w1s"), results / "mini")
    write_result(make_doc(spread(0.50), learner="maml", trained_on="miniimagenet-5w1s"), results / "mini")
    build([results], out)
    sections = board(out, "kanji-5w1s")["sections"]
    assert [(s["trained_on"], s["budget"]) for s in sections] == [
        (None, "paper"), (None, "quick"),  # same-task first, as before
        ("miniimagenet-5w1s", "quick"), ("omniglot-5w1s", "paper"), ("omniglot-5w1s", "quick")]
    assert [[(r["learner"], r["rank"], r["trained_on"]) for r in s["rows"]] for s in sections[2:]] == [
        [("protonet", 1, "miniimagenet-5w1s"), ("maml", 2, "miniimagenet-5w1s")],
        [("protonet", 1, "omniglot-5w1s")], [("protonet", 1, "omniglot-5w1s")]]
    md = (out / "kanji-5w1s.md").read_text()
    assert md.count("## Cross-task: trained on ") == 3
    assert md.index("## Cross-task: trained on miniimagenet-5w1s (budget `quick`)") < \
        md.index("## Cross-task: trained on omniglot-5w1s (budget `paper`)")
    assert md.count("| maml (trained on miniimagenet-5w1s) |") == 1
    assert {r["trained_on"] for r in csv_rows(out, "kanji-5w1s")} == {"", "miniimagenet-5w1s", "omniglot-5w1s"}


def test_results_without_trained_on_or_trained_on_their_own_task_are_same_task(lb):
    out, results = lb
    standard(results)
    build([results], out)
    assert "trained_on" not in (out / "kanji-5w1s.json").read_text()  # the files of old boards are unchanged
    assert "trained_on" not in (out / "kanji-5w1s.csv").read_text().splitlines()[0]
    assert "Cross-task" not in (out / "kanji-5w1s.md").read_text() + (out / "README.md").read_text()
    for path in sorted(results.rglob("*.json")):  # all but seed 0 as ``metabench run`` now records them
        doc = json.loads(path.read_text())
        if doc["seed"] != 0:
            doc["trained_on"] = {"task": doc["task"]["name"], "version": 1, "image_size": 28}
            path.write_text(json.dumps(doc, indent=1))
    assert check([results], out) == []  # byte-identical tables: old and new files still share rows
    assert rows(out, "kanji-5w1s")[0]["seeds"] == [0, 1, 2]


def test_summary_lists_cross_task_results_apart_from_the_matrix(lb):
    out, results = lb
    write_result(make_doc(spread(0.80), learner="maml"), results)
    write_result(make_doc(spread(0.90), trained_on="omniglot-5w1s"), results)
    write_result(make_doc(spread(0.70), task="kanji-5w5s", trained_on="omniglot-5w1s"), results)
    build([results], out)
    text = (out / "README.md").read_text()
    matrix, listing = text.split("## Cross-task")
    header = next(x for x in matrix.splitlines() if x.startswith("| learner"))
    assert "kanji-5w1s" in header and "kanji-5w5s" not in header  # a task with cross-task results only: no column
    assert "| maml | conv4 | **80.00 ± " in matrix and "| protonet |" not in matrix
    ci = {m: fmt_mean_ci(m, summarize(spread(m)).ci95, "accuracy") for m in (0.9, 0.7)}
    assert [x for x in listing.splitlines() if x.startswith("| omniglot-5w1s")] == [
        f"| omniglot-5w1s | [kanji-5w1s](kanji-5w1s.md) | `quick` | protonet | conv4 | **{ci[0.9]}** |",
        f"| omniglot-5w1s | [kanji-5w5s](kanji-5w5s.md) | `quick` | protonet | conv4 | **{ci[0.7]}** |"]


def test_repository_published_numbers_load():
    from metabench.leaderboard import load_published

    entries = load_published(Path(__file__).resolve().parents[1] / "leaderboards" / "published.toml")
    assert entries and all(not p.task.startswith("kanji") for p in entries)


# -- publish ----------------------------------------------------------------------------------
def tiny_doc(n=5, **changes) -> dict:
    draws = eval_draws(TINY, TinySource(), TINY.eval_split, n)
    doc = make_doc(spread(0.6, n), task=TINY.name, learner="toy", backbone="pixels", sha=episodes_sha256(draws))
    doc["task"].update(ways=TINY.ways, shots=TINY.shots, queries=TINY.queries)
    for path, value in changes.items():
        *keys, last = path.split(".")
        target = doc
        for k in keys:
            target = target[k]
        target[last] = value
    return doc


def tiny_plugin_v(version: int):
    protocol, source = dataclasses.replace(TINY, version=version), TinySource()

    class Plugin:
        @hookimpl
        def metabench_register_tasks(self, register):
            register(protocol, source)

        @hookimpl
        def metabench_register_learners(self, register):
            register("toy", ToyLearner)

    return Plugin()


@pytest.fixture
def tiny_only(monkeypatch):
    host = host_with(("tiny", tiny_plugin_v(1)), builtins=False)
    monkeypatch.setattr(metabench.plugins, "_HOST", host)
    return host


def save(doc: dict, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(doc, indent=1))
    return path


def test_publish_copies_a_valid_result(tiny_only, tmp_path, capsys):
    src = save(tiny_doc(), tmp_path / "runs", "r.json")
    dest = tmp_path / "lb" / "results"
    code, stdout, err = run_cli(capsys, "publish", str(src), "--to", str(dest))
    assert code == 0, err
    (copied,) = (dest / "tiny-3w2s" / "toy").glob("*.json")
    assert copied.read_bytes() == src.read_bytes() and copied.name == result_filename(tiny_doc())
    before = copied.stat()
    code, stdout, err = run_cli(capsys, "publish", str(src), "--to", str(dest))  # the same result again: a no-op
    assert code == 0 and f"already published: {src} is {copied}" in stdout, err
    assert len(list(dest.rglob("*.json"))) == 1 and copied.stat().st_mtime_ns == before.st_mtime_ns
    other = save(tiny_doc(**{"timing.eval_s": 99.0}), tmp_path / "runs", "other.json")
    code, _, err = run_cli(capsys, "publish", str(other), "--to", str(dest))  # the same run with other values
    assert code == 2 and "already holds seed 0" in error_line(err)
    assert len(list(dest.rglob("*.json"))) == 1
    build([dest], tmp_path / "lb")
    assert check([dest], tmp_path / "lb") == []


@pytest.mark.parametrize("changes,fragment", [
    ({"task.episodes_sha256": "0" * 64}, "a different episode set"),
    ({"task.version": 0}, "an older version of task tiny-3w2s (v0; installed: v1)"),
    ({"task.shots": 5}, "shots 5 (installed: 2)"),
    ({"task.name": "tiny-9w9s"}, "unknown task"),
    ({"summary.mean": 0.99}, "is not the mean of per_episode"),
    ({"learner.name": "../escape"}, "not a plain lowercase name"),
])
def test_publish_refuses_with_the_reason_and_copies_nothing(tiny_only, tmp_path, capsys, changes, fragment):
    good = save(tiny_doc(), tmp_path / "runs", "good.json")
    bad = save(tiny_doc(**changes), tmp_path / "runs", "bad.json")
    dest = tmp_path / "results"
    code, _, err = run_cli(capsys, "publish", str(good), str(bad), "--to", str(dest))
    line = error_line(err)
    assert code == 2 and "bad.json: refused:" in line and fragment in line, line
    assert not dest.exists()


def test_publish_refuses_a_result_of_an_older_task_version(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(metabench.plugins, "_HOST", host_with(("tiny", tiny_plugin_v(2)), builtins=False))
    src = save(tiny_doc(), tmp_path, "old.json")  # made with v1
    code, _, err = run_cli(capsys, "publish", str(src), "--to", str(tmp_path / "results"))
    assert code == 2 and "older version of task tiny-3w2s (v1; installed: v2)" in error_line(err)
    assert not (tmp_path / "results").exists()


def test_publish_kanji_subset_hash_without_image_data(tmp_path):
    from metabench.plugins import get_host
    from metabench.publish import publish

    host = get_host()
    protocol, source, _ = host.task("kanji-5w1s")
    doc = make_doc(spread(0.5, 8), version=protocol.version,
                   sha=episodes_sha256(eval_draws(protocol, source, protocol.eval_split, 8)))
    (copied,) = publish([save(doc, tmp_path, "k.json")], host, tmp_path / "results")
    assert copied.parent == tmp_path / "results" / "kanji-5w1s" / "protonet"
    doc["task"]["episodes_sha256"] = episodes_sha256(eval_draws(protocol, source, protocol.eval_split, 7))
    with pytest.raises(MetabenchError, match="a different episode set"):
        publish([save(doc, tmp_path, "k7.json")], host, tmp_path / "results")


def test_publish_keeps_a_cross_task_result_apart_from_the_same_task_run(tiny_only, tmp_path, capsys):
    dest = tmp_path / "lb" / "results"
    same = save(tiny_doc(), tmp_path / "runs", "same.json")
    cross = save(tiny_doc(trained_on={"task": "other-3w2s", "version": 1, "image_size": 28}), tmp_path / "runs",
                 "cross.json")
    code, _, err = run_cli(capsys, "publish", str(same), str(cross), "--to", str(dest))
    assert code == 0, err
    assert len(list(dest.rglob("*.json"))) == 2  # the same learner and seed: not a duplicate
    code, stdout, err = run_cli(capsys, "publish", str(cross), "--to", str(dest))  # the cross-task result again
    assert code == 0 and "already published" in stdout, err
    again = save(tiny_doc(trained_on={"task": "other-3w2s", "version": 1, "image_size": 28},
                          **{"timing.eval_s": 99.0}), tmp_path / "runs", "again.json")
    code, _, err = run_cli(capsys, "publish", str(again), "--to", str(dest))  # that run with other values
    assert code == 2 and "already holds seed 0" in error_line(err)
    for bad, fragment in (({"task": "../x"}, "training task name '../x'"), ("other-3w2s", "trained_on must be")):
        path = save(tiny_doc(trained_on=bad), tmp_path / "runs", "bad.json")
        code, _, err = run_cli(capsys, "publish", str(path), "--to", str(dest))
        assert code == 2 and fragment in error_line(err)
    assert len(list(dest.rglob("*.json"))) == 2
    build([dest], tmp_path / "lb")
    sections = board(tmp_path / "lb", "tiny-3w2s")["sections"]
    assert [s["trained_on"] for s in sections] == [None, "other-3w2s"]


def test_each_row_shows_its_median_and_worst_episode_so_an_outlier_is_seen(lb):
    out, results = lb
    values = [0.3] * 40
    values[17] = 2000.0  # one diverging episode: the mean is 50.3, the median 0.3
    write_result(make_doc(values, task="sinusoid-10s", learner="anil", metric="mse", higher=False), results)
    write_result(make_doc([0.4] * 40, task="sinusoid-10s", learner="maml", metric="mse", higher=False), results)
    build([results], out)
    md = (out / "sinusoid-10s.md").read_text()
    assert "| median | worst |" in md and "the worst test episode (highest mse" in md
    anil = next(line for line in md.splitlines() if "| anil |" in line)
    assert "| 0.3000 | 2000 (#17) |" in anil
    (row,) = [r for r in rows(out, "sinusoid-10s") if r["learner"] == "anil"]
    assert row["median"] == 0.3 and row["worst"] == 2000.0 and row["worst_episode"] == 17


def test_a_row_says_where_the_rank_test_disagrees_with_the_t_test(lb):
    """Per-episode values built so that the paired t-test and the Wilcoxon signed-rank test disagree at
    alpha = 0.05, one section (budget) per case; each row says so, and a row where they agree does not."""
    out, results = lb
    n = 40
    best = [0.5 + 0.1 * ((i * 7) % n) / n for i in range(n)]
    noise = [0.01 * ((i * 5) % 7 - 3) for i in range(n)]
    mean_noise = math.fsum(noise) / n
    noise = [e - mean_noise for e in noise]  # zero mean, symmetric enough that the ranks balance
    # t: worse, ranks: tied: six episodes far worse drag the mean; the other 34 are alike
    dragged = [b + e for b, e in zip(best, noise)]
    for j in range(6):
        dragged[3 + 5 * j] += 0.5
    # t: tied, ranks: worse: every episode a little worse, one far worse widens the t interval (anil's case)
    shifted = [b + 0.02 + 0.2 * e for b, e in zip(best, noise)]
    shifted[17] += 3.0
    # t: tied, ranks: better: 39 episodes better, one diverging episode makes the mean worse
    hidden = [b - 0.05 + 0.2 * e for b, e in zip(best, noise)]
    hidden[17] += 10.0
    cases = {"paper": ("dragged", dragged), "quick": ("shifted", shifted), "smoke": ("hidden", hidden)}
    kw = dict(task="sinusoid-10s", metric="mse", higher=False)
    for budget, (name, values) in cases.items():
        write_result(make_doc(best, learner="best", budget=budget, **kw), results)
        write_result(make_doc(values, learner=name, budget=budget, **kw), results)
    write_result(make_doc([b + 1.0 for b in best], learner="agreed", budget="paper", **kw), results)
    build([results], out)

    got = {r["learner"]: r["vs_best"] for s in board(out, "sinusoid-10s")["sections"] for r in s["rows"]}
    expected = {"dragged": ("worse", "tied"), "shifted": ("tied", "worse"), "hidden": ("tied", "better"),
                "agreed": ("worse", "worse")}
    for name, (t_status, w_status) in expected.items():
        assert (got[name]["status"], got[name]["wilcoxon_status"]) == (t_status, w_status), name
        values = {"dragged": dragged, "shifted": shifted, "hidden": hidden}.get(name)
        if values is not None:  # Holm leaves the raw p-values: alone in its section, or (paper) beside
            # a row whose p-values are the smaller ones
            assert got[name]["p_holm"] == pytest.approx(st.ttest_rel(values, best).pvalue, rel=1e-5)
            assert got[name]["wilcoxon_p_holm"] == pytest.approx(st.wilcoxon(values, best).pvalue, rel=1e-5)
    md = (out / "sinusoid-10s.md").read_text()
    cell = {name: next(line for line in md.splitlines() if line.startswith("| ") and f"| {name} |" in line)
            for name in expected}
    t_part = "(Holm p = {:.3g})"
    for name, (t_status, w_status) in expected.items():
        t_text = f"{t_status} {t_part.format(got[name]['p_holm'])}"
        if t_status == w_status:
            assert f"| {t_text} |" in cell[name] and "rank test" not in cell[name]
        else:
            assert f"| {t_text}; rank test: {w_status} {t_part.format(got[name]['wilcoxon_p_holm'])} |" in cell[name]
    assert "`rank test`: a Wilcoxon signed-rank test" in md and "outlier episodes drag the mean" in md
    assert "`tied (…); rank test: worse` (or `better`)" in md
    table = {(r["budget"], r["learner"]): r for r in csv_rows(out, "sinusoid-10s")}
    assert table[("smoke", "hidden")]["wilcoxon_vs_best"] == "better"
    assert table[("paper", "dragged")]["vs_best"] == "worse" and table[("paper", "dragged")]["wilcoxon_vs_best"] == "tied"
    assert check([results], out) == []


def test_a_bf16_run_is_its_own_row_never_averaged_with_fp32_seeds(lb):
    """Results trained in bf16 (``precision``) and in fp32 (``precision`` fp32 or absent) of one learner,
    seed and settings are two rows: the bf16 row is labelled, its seeds kept apart, and the CSV gains a
    precision column only where a board has such a row."""
    out, results = lb
    for seed in (0, 1):
        write_result(make_doc(spread(0.80), seed=seed), results / "fp32")
    bf16 = make_doc(spread(0.70), seed=0)
    bf16["precision"] = "bf16"
    write_result(bf16, results / "bf16")
    write_result(make_doc(spread(0.9), task="kanji-5w5s"), results / "fp32")
    build([results], out)
    got = [(r["learner"], r.get("precision"), r["seeds"]) for r in rows(out, "kanji-5w1s")]
    assert got == [("protonet", None, [0, 1]), ("protonet", "bf16", [0])]
    assert rows(out, "kanji-5w1s")[0]["mean"] == pytest.approx(0.80)
    table = csv_rows(out, "kanji-5w1s")
    assert [(r["learner"], r["precision"]) for r in table] == [("protonet", "fp32"), ("protonet", "bf16")]
    assert "precision" not in csv_rows(out, "kanji-5w5s")[0]  # an all-fp32 board keeps its columns
    md = (out / "kanji-5w1s.md").read_text()
    assert "| 1 | protonet | conv4 | 80.00 ± " in md and "| 2 | protonet (bf16) | conv4 | 70.00 ± " in md
    summary = (out / "README.md").read_text()
    assert "| protonet | conv4 | **80.00 ± " in summary and "| protonet (bf16) | conv4 | 70.00 ± " in summary
    assert check([results], out) == []


def test_publish_keeps_a_bf16_run_apart_from_the_fp32_run_of_its_seed(tiny_only, tmp_path, capsys):
    dest = tmp_path / "lb" / "results"
    fp32 = save(tiny_doc(), tmp_path / "runs", "fp32.json")
    bf16 = save(tiny_doc(precision="bf16"), tmp_path / "runs", "bf16.json")
    code, _, err = run_cli(capsys, "publish", str(fp32), str(bf16), "--to", str(dest))
    assert code == 0, err
    assert len(list(dest.rglob("*.json"))) == 2  # the same learner and seed in another precision: not a duplicate
    again = save(tiny_doc(precision="bf16", **{"timing.eval_s": 99.0}), tmp_path / "runs", "again.json")
    code, _, err = run_cli(capsys, "publish", str(again), "--to", str(dest))  # the bf16 run with other values
    assert code == 2 and "already holds seed 0" in error_line(err)
