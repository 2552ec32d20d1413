"""Fast test-time copies of a trained network (used by learners whose ``predict`` is a plain forward).

At test time BatchNorm uses its running statistics, so it is an affine map per channel and can be
folded into the convolution right before it: one operation less per block, the same function up to
float rounding. On CPU the folded network then runs in ``channels_last`` memory format and, where
TorchScript can freeze it, as a frozen graph whose oneDNN convolutions have their weights
pre-packed and the ReLU fused in (``torch.jit.freeze`` + ``torch.jit.optimize_for_inference``).

On a GPU the plain network runs unchanged: there a test episode's forward is bound by kernel
launches rather than arithmetic, and TF32 convolutions (PyTorch's default on CUDA, 10 mantissa
bits per operand) can move a folded network's output further than the check below allows. On an
H200 the folded network was rejected by that check and channels_last was slower than eager
(benchmarks/RESULTS.md, section 6); what pays there is several episodes per forward
(``Learner.predict_batch`` with :func:`embed_episodes`, ``--eval-batch``).

Every faster form is checked against the plain eval-mode network on the first batch it sees; one
that disagrees (or fails to build) is dropped for the next simpler one, so a backbone this module
does not understand still runs, just unaccelerated. The copy is rebuilt (and checked again)
whenever a parameter or buffer of the source network changes (a training step bumps the tensors'
version counters) and whenever the input's per-example shape or dtype changes: a traced graph
keeps the branches its first input took, so each shape is checked before it is trusted. A new batch
size alone (variable-size episodes) is checked against the plain network without rebuilding, and
rebuilt only if it disagrees. (A fixed protocol's test episodes all have one shape: one build per
evaluation.)
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

#: how far a faster form's output may be from the plain network's, relative to its largest entry
AGREEMENT = 1e-4


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An eval-mode deep copy of ``module`` where every ``Conv2d`` directly followed by a
    ``BatchNorm2d`` with running statistics, inside an ``nn.Sequential``, is replaced by one
    convolution (and the BatchNorm by ``nn.Identity``). Anything else is left as it is."""
    folded = copy.deepcopy(module).eval()
    for seq in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.track_running_stats
                    and bn.running_mean is not None and bn.num_features == conv.out_channels):
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded


def _weights_signature(module: nn.Module) -> tuple:
    return tuple((id(t), t._version) for t in (*module.parameters(), *module.buffers()))


def _agrees(out: torch.Tensor, ref: torch.Tensor) -> bool:
    if out.shape != ref.shape or not bool(torch.isfinite(out).all()):
        return False
    scale = ref.abs().max().item() or 1.0
    return (out - ref).abs().max().item() <= AGREEMENT * scale


class InferenceNet:
    """``InferenceNet(net)(x)``: ``net.eval()(x)`` under ``no_grad``, computed by the fastest form
    that agrees with it. x: [N, C, H, W] (or any input ``net`` takes) -> ``net``'s output.

    ``form`` names what runs: ``"frozen"`` (TorchScript, CPU only), ``"folded"`` (BatchNorm folded,
    channels_last on CPU), or ``"plain"``. ``allow_frozen=False`` stops at ``"folded"``.
    """

    def __init__(self, net: nn.Module, allow_frozen: bool = True):
        self.net, self.allow_frozen = net, allow_frozen
        self.form, self._fn, self._signature, self._input = "plain", None, None, None
        self.builds = 0  # how many times a test-time copy was built (once per set of weights)
        self.checks = 0  # how many other batch sizes the built copy was checked on
        self._verified: set = set()

    def _channels_last(self, x: torch.Tensor) -> bool:
        return x.dim() == 4 and x.device.type == "cpu"

    def _build(self, x: torch.Tensor) -> None:
        self.net.eval()
        with torch.no_grad():
            ref = self.net(x)
            folded = fold_batchnorm(self.net)
            cl = self._channels_last(x)
            if cl:
                folded = folded.to(memory_format=torch.channels_last)
            candidates = []
            if self.allow_frozen and x.device.type == "cpu":
                candidates.append(("frozen", lambda: self._freeze(folded, x)))
            candidates.append(("folded", lambda: folded))
            self.form, self._fn = "plain", self.net
            for form, make in candidates:
                try:
                    fn = make()
                    ok = _agrees(fn(self._prepare(x, cl)), ref)
                except Exception:  # a form this backbone does not support: try the next one
                    ok = False
                if ok:
                    self.form, self._fn = form, fn
                    break
        self._cl = cl and self.form != "plain"
        self._signature = _weights_signature(self.net)
        self._verified = set()

    @staticmethod
    def _prepare(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    @staticmethod
    def _freeze(folded: nn.Module, x: torch.Tensor):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notices
            traced = torch.jit.trace(folded, x.contiguous(memory_format=torch.channels_last), check_trace=False)
            return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.net.training:
            self.net.eval()
        if x.device.type != "cpu":  # on a GPU the plain network runs: see the module docstring
            with torch.no_grad():
                return self.net(x)
        key = (tuple(x.shape), x.dtype)
        if self._fn is None or _weights_signature(self.net) != self._signature or key[0][1:] != self._input[0][1:] \
                or key[1] != self._input[1]:
            self._input = key
            self._build(x)
            self.builds += 1
        elif key != self._input and key not in self._verified:
            # another batch size (variable-size episodes): check the built form on it once
            self.checks += 1
            with torch.no_grad():
                ref = self.net(x)
                out = self._fn(self._prepare(x, self._cl))
            if _agrees(out, ref):
                self._verified.add(key)
                return out
            self._input = key
            self._build(x)
            self.builds += 1
        with torch.no_grad():
            return self._fn(self._prepare(x, self._cl))


def embed_episodes(embed, episodes) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Several episodes' support and query images through ``embed`` in one forward:
    ``episodes`` [(support_x [S_i, ...], support_y, query_x [Q_i, ...]), ...] -> [(support embeddings
    [S_i, D], query embeddings [Q_i, D]), ...] in episode order (for ``Learner.predict_batch``; with an
    eval-mode network each row is its image's embedding alone, as one episode per forward gives it
    up to float rounding)."""
    images = torch.cat([x for support_x, _, query_x in episodes for x in (support_x, query_x)])
    emb = embed(images)
    out, pos = [], 0
    for support_x, _, query_x in episodes:
        s, q = support_x.shape[0], query_x.shape[0]
        out.append((emb[pos:pos + s], emb[pos + s:pos + s + q]))
        pos += s + q
    return out
