"""The ``protonet`` learner: Prototypical Networks.

Snell, Swersky & Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS 2017.
An embedding network f maps images to vectors; a class's prototype is the mean embedding of
its support examples, and a query's logit for class c is minus the squared Euclidean distance
to prototype c. The network is trained episodically with Adam on the cross-entropy of those
logits, halving the learning rate every ``lr_step`` episodes, as in the paper.

BatchNorm uses batch statistics during meta-training and its running statistics at test time,
so each query is classified independently of the others (inductive: ``transductive = False``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metabench import Learner, hookimpl, setting
from metabench.episodic import train_on_episodes
from metabench.inference import InferenceNet, embed_episodes

from . import paper_config


def prototype_logits(support_emb: torch.Tensor, support_y: torch.Tensor, query_emb: torch.Tensor, ways: int) -> torch.Tensor:
    """Logits -||q - mean_c||^2.

    support_emb: [S, D], support_y: [S] int64 in [0, ways), query_emb: [Q, D] -> logits [Q, ways].
    """
    onehot = F.one_hot(support_y, ways).to(support_emb.dtype)  # [S, ways]
    counts = onehot.sum(0)  # [ways]
    if bool((counts == 0).any()):
        raise ValueError("protonet: every class needs at least one support example")
    prototypes = onehot.t() @ support_emb / counts[:, None]  # [ways, D]
    diff = query_emb[:, None, :] - prototypes[None, :, :]  # [Q, ways, D]
    return -diff.pow(2).sum(-1)


@dataclass
class ProtoNetConfig:
    """ProtoNet hyper-parameters (defaults = the ``quick`` budget).

    meta_steps:    training episodes (one Adam step each)
    lr:            Adam learning rate (paper: 1e-3)
    lr_step:       halve the learning rate every this many episodes (paper: 2000); 0 = never
    lr_gamma:      the factor applied every ``lr_step`` episodes (paper: 0.5)
    train_ways:    ways of training episodes; 0 = the protocol's (paper, Omniglot: 60)
    train_shots:   shots of training episodes; 0 = the protocol's (paper: same as test)
    train_queries: queries per class in training episodes; 0 = the protocol's (paper, Omniglot: 5)
    weight_decay:  Adam weight decay (paper: none)
    episodes_per_step: training episodes per Adam step, their mean loss (paper: 1); under torchrun a
                   multiple of the process count, each process computing its share
    """

    meta_steps: int = setting(700, min=0)
    lr: float = setting(1e-3, min=0, min_exclusive=True)
    lr_step: int = setting(250, min=0)
    lr_gamma: float = 0.5
    train_ways: int = setting(20, min=0)
    train_shots: int = setting(0, min=0)
    train_queries: int = setting(5, min=0)
    weight_decay: float = 0.0
    episodes_per_step: int = setting(1, min=1)


class ProtoNet(Learner):
    """Prototypical Networks (Snell et al., NeurIPS 2017) on any registered backbone."""

    transductive = False
    any_ways = True  # nothing it learns is tied to the number of classes of an episode
    splits_meta_batch = True  # torchrun: each process computes its share of episodes_per_step episodes
    variable_episodes = True  # prototypes are class means: any way count, any shots per class
    precisions = frozenset({"fp32", "bf16"})  # --precision bf16: its training forward/backward under autocast
    Config = ProtoNetConfig
    reference = "Snell, Swersky & Zemel. Prototypical Networks for Few-shot Learning. NeurIPS 2017."
    paper_config = paper_config("protonet.toml")
    # quick: under a minute of meta-training + 600 test episodes of kanji-5w1s on 2 CPU cores.
    budgets = {
        "smoke": {"meta_steps": 5, "train_ways": 5, "train_queries": 2, "lr_step": 0},
        "quick": {"meta_steps": 700, "train_ways": 20, "train_queries": 5, "lr_step": 250},
        # The paper trained with early stopping on validation loss; with the learning rate halved
        # every 2000 episodes it is below 1e-6 after 20,000, so a fixed 20,000 episodes stands in.
        "paper": {"meta_steps": 20000, "lr": 1e-3, "lr_step": 2000, "lr_gamma": 0.5,
                  "train_ways": 60, "train_shots": 0, "train_queries": 5},
    }

    def __init__(self, config, backbone, protocol, device):
        super().__init__(config, backbone, protocol, device)
        self.net = backbone.module.to(device)
        self._inference = InferenceNet(self.net)  # predict()'s test-time copy, rebuilt when weights change

    def episode_logits(self, support_x, support_y, query_x, ways: int) -> torch.Tensor:
        """Embed support [S, C, H, W] and queries [Q, C, H, W] in one batch -> logits [Q, ways]."""
        emb = self.net(torch.cat([support_x, query_x]))  # [S + Q, D]
        n = support_x.shape[0]
        return prototype_logits(emb[:n], support_y, emb[n:], ways)

    def meta_train(self, ctx) -> None:
        c, p = self.config, self.protocol
        ways, shots, queries = c.train_ways or p.ways, c.train_shots or p.shots, c.train_queries or p.queries

        def episode_loss(ep):  # the episode's own way count (Meta-Dataset episodes vary; fixed ones: ``ways``)
            logits = self.episode_logits(ep.support_x, ep.support_y, ep.query_x, int(ep.support_y.max()) + 1)
            return F.cross_entropy(logits, ep.query_y), logits

        self.net.train()
        ctx.track("embedding", self.net)
        train_on_episodes(ctx, self.net.parameters(), episode_loss, steps=c.meta_steps, lr=c.lr, ways=ways,
                          shots=shots, queries=queries, lr_step=c.lr_step, lr_gamma=c.lr_gamma,
                          weight_decay=c.weight_decay, episodes_per_step=c.episodes_per_step)

    def predict(self, support_x, support_y, query_x):
        """support_x [S, C, H, W], support_y [S], query_x [Q, C, H, W] -> logits [Q, ways].

        The network runs as a test-time copy (:class:`metabench.inference.InferenceNet`):
        BatchNorm folded into the convolutions and, on CPU, channels_last and a frozen TorchScript
        graph; checked against the plain network on first use (benchmarks/RESULTS.md, section 4).
        """
        # in eval mode (InferenceNet sets it): running BatchNorm statistics, so queries do not
        # influence each other
        emb = self._inference(torch.cat([support_x, query_x]))  # [S + Q, D]
        n = support_x.shape[0]
        return prototype_logits(emb[:n], support_y, emb[n:], int(support_y.max()) + 1)  # the episode's ways

    def predict_batch(self, episodes):
        """:meth:`predict` of several episodes: every support and query image of all of them in one
        forward of the test-time network, then each episode's prototypes and distances on its own
        rows (eval-mode BatchNorm: an image's embedding does not depend on the others in the batch)."""
        return [prototype_logits(support_emb, support_y, query_emb, int(support_y.max()) + 1)
                for (support_emb, query_emb), (_, support_y, _) in zip(embed_episodes(self._inference, episodes),
                                                                     episodes)]


@hookimpl
def metabench_register_learners(register):
    register("protonet", ProtoNet)
