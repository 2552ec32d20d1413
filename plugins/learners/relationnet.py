"""The ``relationnet`` learner: Relation Networks.

Sung, Yang, Zhang, Xiang, Torr & Hospedales, "Learning to Compare: Relation Network for Few-Shot
Learning", CVPR 2018. An embedding module f maps images to feature *maps*; a class's feature map
is the element-wise sum of its support examples' maps; each (class, query) pair is concatenated
along the channels, C(f(x_class), f(x_query)), and a relation module g scores it:

    r_{q,c} = g(C(sum_{i: y_i = c} f(x_i), f(x_q))) in [0, 1]

g = 2 x [conv 3x3 (64 filters, padding 1), BatchNorm, ReLU, max-pool 2x2] -> FC 8 (ReLU) -> FC 1
(sigmoid). Training minimises the mean squared error between r and the one-hot match of the
query's class, with Adam; ``predict`` returns the relation scores r [Q, ways] as the logits.

The embedding module is the run's backbone without its flattening (``conv4`` flattens its last
block's output) and, as in the paper, without the max-pooling of its last two blocks
(``unpooled_blocks``): the paper's embedding is four conv blocks of which only the first two
pool, so that the relation module still has a map to convolve. With ``conv4`` this gives 64 x 7
x 7 maps at 28 px (28 -> 14 -> 7 -> 7 -> 7; with all four pools the map would be 1 x 1) and 64 x
21 x 21 at 84 px. The relation module's two max-pools then take 7 -> 3 -> 1 (28 px; the FC layer
sees 64 features, as in the paper's Omniglot model) and 21 -> 10 -> 5 (84 px). A relation block
whose input is already 1 x 1 skips its pool.

How the backbone is turned into a feature-map network: if it is an ``nn.Sequential``, trailing
``Flatten`` and adaptive-pooling layers are dropped (this covers ``conv4``, ``resnet12`` and
``wrn``), then the last ``unpooled_blocks`` children that are ``nn.Sequential`` blocks ending in
``MaxPool2d`` (conv4's blocks) lose that pool. The new network shares the backbone's layers (and
so its parameters). If the result does not output [B, C, H, W] (e.g. ``mlp``, or a torchvision
model), the backbone's flattened feature vector is used as a D x 1 x 1 map instead; the relation
convolutions then act as 1 x 1 (centre-tap) convolutions and nothing pools.

Differences from the paper: the embedding's convolutions are the backbone's (conv4: padding 1
everywhere), so the map sizes need not match the authors' exactly; BatchNorm uses its running
statistics at test time, so each query is scored independently of the others (inductive).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metabench import Learner, hookimpl, setting
from metabench.episodic import train_on_episodes
from metabench.inference import embed_episodes

from . import paper_config

_HEAD_LAYERS = (nn.Flatten, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)

#: ``predict_batch``: the most pair-tensor elements (float32: 1 GiB) sent through the relation
#: module in one forward; the pairs of more episodes than that go in several (always whole episodes)
RELATION_BATCH_ELEMENTS = 2 ** 28


def feature_map_network(module: nn.Module, unpooled_blocks: int) -> nn.Sequential | None:
    """The backbone as a feature-map network (sharing its layers), or None if it is not a Sequential.

    Drops trailing Flatten / adaptive pooling, then the MaxPool2d ending each of the last
    ``unpooled_blocks`` children that are Sequential blocks ending in MaxPool2d.
    """
    if not isinstance(module, nn.Sequential):
        return None
    children = list(module)
    while children and isinstance(children[-1], _HEAD_LAYERS):
        children.pop()
    remaining = unpooled_blocks
    for i in range(len(children) - 1, -1, -1):
        if remaining == 0:
            break
        block = children[i]
        if isinstance(block, nn.Sequential) and len(block) > 0 and isinstance(block[-1], nn.MaxPool2d):
            children[i] = nn.Sequential(*list(block)[:-1])
            remaining -= 1
    return nn.Sequential(*children)


class RelationModule(nn.Module):
    """g: [P, 2C, height, width] concatenated pairs -> relation scores [P] in [0, 1]."""

    def __init__(self, in_channels: int, height: int, width: int, channels: int = 64, hidden: int = 8):
        super().__init__()
        blocks = []
        for i in range(2):
            pool = min(height, width) >= 2  # a 1-pixel map is not pooled
            blocks.append(nn.Sequential(
                nn.Conv2d(in_channels if i == 0 else channels, channels, kernel_size=3, padding=1),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
                nn.MaxPool2d(2) if pool else nn.Identity(),
            ))
            if pool:
                height, width = height // 2, width // 2
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, hidden), nn.ReLU(),
                                nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(pairs)).squeeze(1)


def relation_pairs(support_maps: torch.Tensor, support_y: torch.Tensor, query_maps: torch.Tensor,
                   ways: int) -> torch.Tensor:
    """Class maps (sum over shots) paired with every query: [S, C, H, W], [S], [Q, C, H, W] -> [Q * ways, 2C, H, W].

    Row q * ways + c is C(class c's map, query q's map).
    """
    onehot = F.one_hot(support_y, ways).to(support_maps.dtype)  # [S, ways]
    class_maps = (onehot.t() @ support_maps.flatten(1)).view(ways, *support_maps.shape[1:])  # [ways, C, H, W]
    q = query_maps.shape[0]
    pairs = torch.cat([class_maps.unsqueeze(0).expand(q, -1, -1, -1, -1),
                       query_maps.unsqueeze(1).expand(-1, ways, -1, -1, -1)], dim=2)  # [Q, ways, 2C, H, W]
    return pairs.reshape(q * ways, *pairs.shape[2:])


def paper_train_queries(ways: int, shots: int, protocol_queries: int) -> int:
    """Sung et al.'s queries per class in a training episode (5w1s: 19, 5w5s: 15, 20w1s: 10, 20w5s: 5)."""
    return {(5, 1): 19, (5, 5): 15, (20, 1): 10, (20, 5): 5}.get((ways, shots), protocol_queries)


@dataclass
class RelationNetConfig:
    """Relation Network hyper-parameters (defaults = the ``quick`` budget).

    meta_steps:        training episodes (one Adam step each)
    lr:                Adam learning rate (paper: 1e-3)
    lr_step:           halve (``lr_gamma``) the learning rate every this many episodes (paper:
                       100,000); 0 = never
    lr_gamma:          the factor applied every ``lr_step`` episodes (paper: 0.5)
    train_ways:        ways of training episodes; 0 = the protocol's (paper: the test setting)
    train_shots:       shots of training episodes; 0 = the protocol's (paper: the test setting)
    train_queries:     queries per class in training episodes; 0 = the paper's for the training
                       ways/shots (5w1s 19, 5w5s 15, 20w1s 10, 20w5s 5; otherwise the protocol's)
    unpooled_blocks:   backbone blocks, counted from the last, whose max-pool is removed (paper: 2)
    relation_channels: filters of the relation module's convolutions (paper: 64)
    relation_hidden:   width of the relation module's first FC layer (paper: 8)
    """

    meta_steps: int = setting(7000, min=0)
    lr: float = setting(1e-3, min=0, min_exclusive=True)
    lr_step: int = setting(2500, min=0)
    lr_gamma: float = 0.5
    train_ways: int = setting(5, min=0)
    train_shots: int = setting(0, min=0)
    train_queries: int = setting(5, min=0)
    unpooled_blocks: int = setting(2, min=0)
    relation_channels: int = setting(64, min=1)
    relation_hidden: int = setting(8, min=1)


class RelationNet(Learner):
    """Relation Networks (Sung et al., CVPR 2018) on a registered backbone's feature maps."""

    transductive = False
    any_ways = True  # nothing it learns is tied to the number of classes of an episode
    Config = RelationNetConfig
    paper_config = paper_config("relationnet.toml")
    reference = ("Sung, Yang, Zhang, Xiang, Torr & Hospedales. Learning to Compare: Relation Network "
                 "for Few-Shot Learning. CVPR 2018.")
    # quick: about 3.5 minutes of meta-training + 600 test episodes of kanji-5w1s on 2 CPU cores.
    budgets = {
        "smoke": {"meta_steps": 5, "train_ways": 5, "train_queries": 2, "lr_step": 0},
        "quick": {"meta_steps": 7000, "train_ways": 5, "train_queries": 5, "lr_step": 2500},
        # The paper halves the learning rate every 100,000 episodes; it does not state the episode
        # count in the text: 1,000,000 (ten halvings) stands in.
        "paper": {"meta_steps": 1_000_000, "lr": 1e-3, "lr_step": 100_000, "lr_gamma": 0.5, "train_ways": 0,
                  "train_shots": 0, "train_queries": 0, "unpooled_blocks": 2, "relation_channels": 64,
                  "relation_hidden": 8},
    }

    def __init__(self, config, backbone, protocol, device):
        super().__init__(config, backbone, protocol, device)
        backbone.module.to(device)
        maps = feature_map_network(backbone.module, config.unpooled_blocks)
        shape = self._output_shape(maps, protocol) if maps is not None else None
        if shape is None or len(shape) != 3:
            self.embed, self.flat = backbone.module, True  # fallback: the feature vector as a D x 1 x 1 map
            shape = (backbone.out_features, 1, 1)
        else:
            self.embed, self.flat = maps, False
        self.map_shape = tuple(shape)  # (C, H, W) of one image's feature map
        channels, height, width = shape
        self.relation = RelationModule(2 * channels, height, width, config.relation_channels,
                                       config.relation_hidden).to(device)

    def _output_shape(self, net: nn.Module, protocol) -> tuple[int, ...] | None:
        """Shape of one image's output, from a dummy forward in eval mode (running statistics untouched)."""
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                x = torch.zeros(2, protocol.channels, protocol.image_size, protocol.image_size, device=self.device)
                return tuple(net(x).shape[1:])
        except RuntimeError:
            return None
        finally:
            net.train(was_training)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] images -> [B, C, h, w] feature maps."""
        out = self.embed(x)
        return out.view(out.shape[0], -1, 1, 1) if self.flat else out

    def train_mode(self, on: bool) -> None:
        self.embed.train(on)
        self.relation.train(on)

    def scores(self, support_x, support_y, query_x, ways: int) -> torch.Tensor:
        """Relation scores [Q, ways] in [0, 1] (support and queries embedded in one batch)."""
        maps = self.feature_maps(torch.cat([support_x, query_x]))
        n = support_x.shape[0]
        pairs = relation_pairs(maps[:n], support_y, maps[n:], ways)
        return self.relation(pairs).view(query_x.shape[0], ways)

    def meta_train(self, ctx) -> None:
        c, p = self.config, self.protocol
        ways, shots = c.train_ways or p.ways, c.train_shots or p.shots
        queries = c.train_queries or paper_train_queries(ways, shots, p.queries)

        def episode_loss(ep):
            scores = self.scores(ep.support_x, ep.support_y, ep.query_x, ways)
            return F.mse_loss(scores, F.one_hot(ep.query_y, ways).to(scores.dtype)), scores

        self.train_mode(True)
        ctx.track("embedding", self.embed)
        ctx.track("relation", self.relation)
        train_on_episodes(ctx, list(self.embed.parameters()) + list(self.relation.parameters()), episode_loss,
                          steps=c.meta_steps, lr=c.lr, ways=ways, shots=shots, queries=queries, lr_step=c.lr_step,
                          lr_gamma=c.lr_gamma)

    def predict(self, support_x, support_y, query_x):
        """support_x [S, C, H, W], support_y [S], query_x [Q, C, H, W] -> relation scores [Q, ways]."""
        self.train_mode(False)  # running BatchNorm statistics: queries do not influence each other
        with torch.no_grad():
            return self.scores(support_x, support_y, query_x, self.protocol.ways)

    def predict_batch(self, episodes):
        """:meth:`predict` of several episodes: every support and query image of all of them in one
        forward of the embedding module, then every episode's (class, query) pairs through the relation
        module together (eval-mode BatchNorm: each row is scored on its own, as alone).

        episodes: [(support_x [S_i, C, H, W], support_y [S_i], query_x [Q_i, C, H, W]), ...]
        -> [relation scores [Q_i, ways], ...] in episode order. The pairs ([Q_i * ways, 2C, h, w] per
        episode) are concatenated along the rows, up to ``RELATION_BATCH_ELEMENTS`` elements per
        relation forward (whole episodes; one episode over the limit goes alone), and the scores
        split back per episode.
        """
        ways = self.protocol.ways
        self.train_mode(False)
        with torch.no_grad():
            pairs = [relation_pairs(support_maps, support_y, query_maps, ways)  # [Q_i * ways, 2C, h, w]
                     for (support_maps, query_maps), (_, support_y, _) in
                     zip(embed_episodes(self.feature_maps, episodes), episodes)]
            chunks, size = [[]], 0  # consecutive episodes' pairs, one relation forward per chunk
            for p in pairs:
                if chunks[-1] and size + p.numel() > RELATION_BATCH_ELEMENTS:
                    chunks.append([])
                    size = 0
                chunks[-1].append(p)
                size += p.numel()
            out = []
            for chunk in chunks:
                scores = self.relation(torch.cat(chunk))  # [sum_i Q_i * ways]
                out += [r.view(-1, ways) for r in torch.split(scores, [p.shape[0] for p in chunk])]
            return out


@hookimpl
def metabench_register_learners(register):
    register("relationnet", RelationNet)
