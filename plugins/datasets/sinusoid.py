"""Task plugin: ``sinusoid``, the few-shot regression problem of Finn et al. (MAML, ICML 2017).

A task is y = A sin(x - phi) with amplitude A ~ U[0.1, 5.0) and phase phi ~ U[0, pi); its points
have x ~ U[-5, 5). An episode gives K support points and asks for y at the query points; the
score is the mean squared error over the queries (lower is better).

Protocols ``sinusoid-5s``, ``sinusoid-10s``, ``sinusoid-20s``: K = 5, 10, 20 support points and 100
query points per test episode, 600 test episodes. Test episode i (A, phi, every x) is drawn from
its own seed, so its 100-point query set is fixed. Training episodes have whatever number of
support and query points the learner asks for. The three splits share the task distribution
(the problem has no held-out classes); only the random streams differ.

Everything random comes from the harness's SplitMix64 stream, so an episode is the same on
every machine: A, phi and the x are Python floats recorded in ``EpisodeDraw.extra`` (and so in
the episode-set SHA-256); y is computed from them in float64 and stored as float32.
"""
from __future__ import annotations

import math

import torch

from metabench import DataSource, Episode, EpisodeDraw, MetabenchError, Protocol, hookimpl
from metabench.rng import SplitMix64

VERSION = 1
EPISODES = 600
QUERIES = 100
SHOTS = (5, 10, 20)
AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)


def target(amplitude: float, phase: float, x: float) -> float:
    """y = A sin(x - phi), in float64."""
    return amplitude * math.sin(x - phase)


class SinusoidSource(DataSource):
    """Draws sine-wave tasks; an episode is (A, phi, K support x, Q query x).

    ``draw`` returns ``EpisodeDraw(classes=(), support=(0..K-1), query=(K..K+Q-1),
    extra=(A, phi, x_0, ..., x_{K+Q-1}))``: support and query hold the positions of their points'
    x in ``extra[2:]``. ``materialize`` gives support_x, support_y float32 [K, 1] and query_x,
    query_y float32 [Q, 1].
    """

    def draw(self, rng: SplitMix64, split: str, ways: int, shots: int, queries: int) -> EpisodeDraw:
        self.check_split(split)
        if ways != 1:
            raise MetabenchError(f"sinusoid has one output (ways=1), not {ways}")
        if shots < 1 or queries < 1:
            raise MetabenchError(f"sinusoid episodes need at least 1 support and 1 query point, "
                                 f"got {shots} and {queries}")
        amplitude = rng.uniform(*AMPLITUDE)
        phase = rng.uniform(*PHASE)
        xs = [rng.uniform(*X_RANGE) for _ in range(shots + queries)]  # support points first, then queries
        return EpisodeDraw((), tuple(range(shots)), tuple(range(shots, shots + queries)), (amplitude, phase, *xs))

    def materialize(self, draw: EpisodeDraw, split: str) -> Episode:
        amplitude, phase, *xs = draw.extra
        if len(xs) != len(draw.support) + len(draw.query):
            raise ValueError(f"sinusoid draw has {len(xs)} points; support and query name "
                             f"{len(draw.support) + len(draw.query)}")

        def points(positions: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
            x = [xs[i] for i in positions]
            y = [target(amplitude, phase, v) for v in x]
            return (torch.tensor(x, dtype=torch.float64).view(-1, 1).float(),
                    torch.tensor(y, dtype=torch.float64).view(-1, 1).float())

        support_x, support_y = points(draw.support)
        query_x, query_y = points(draw.query)
        return Episode(support_x, support_y, query_x, query_y)

    def info(self) -> dict:
        """Nothing is stored: every episode is computed from its draw."""
        return {split: {"cached": False, "classes": "-", "images": "computed"} for split in self.splits}


def protocols() -> list[Protocol]:
    return [Protocol(
        name=f"sinusoid-{k}s", version=VERSION, dataset="sinusoid", ways=1, shots=k, queries=QUERIES,
        episodes=EPISODES, image_size=1, channels=1, problem="regression", metric="mse", higher_is_better=False,
        description=f"{k}-shot sine regression (Finn et al. 2017), MSE on {QUERIES} query points",
        default_backbone="mlp",
    ) for k in SHOTS]


@hookimpl
def metabench_register_tasks(register):
    source = SinusoidSource()
    for protocol in protocols():
        register(protocol, source)
