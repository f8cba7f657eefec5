"""UNICON's unsupervised contrastive term inside DivideMix-style training (``--contrastive-weight``).

UNICON (Karim et al., CVPR 2022; ``Train_cifar.py``) adds ``lambda_c x SupConLoss(features)`` to
each step's loss: ``features`` are the L2-normalised projections ``bnl(projection_head(f))`` of
the trained net's pooled features ``f`` on two strong views of the unlabeled batch, one forward
per view, before the MixUp forward; ``SupConLoss`` has temperature = base temperature = 0.05 (so
it is the plain NT-Xent). Here:

* the projection head is UNICON's (Linear d -> ``projection_dim``, BatchNorm1d), one per net,
  created only when the weight is > 0 (a default run's nets, optimizers and checkpoints are
  unchanged) and trained by that net's optimizer (an extra parameter group, so the lr schedule and
  the collapse guard's damping apply to it);
* ``f`` is the input of the net's classifier, read by a forward pre-hook that exists only during
  that forward (deep copies of the nets, such as the hybrid's teachers, never carry it);
* the two strong views are SimCLR views (``data.batches.simclr_views``: resized crop 0.2-1, flip,
  colour jitter, grayscale) from the step's ``aug_generator``: UNICON's are a padded crop, flip and
  AutoAugment's CIFAR-10 policy, which cdmix does not have;
* under torchrun the two views share the one forward DDP allows per backward with the method's
  own batch (so BatchNorm sees them together), and the negatives are this rank's only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cdmix import distributed
from cdmix import losses as L
from cdmix.data.batches import simclr_views
from cdmix.models.encoder import ProjectionHead, classifier_name, feature_dim


class ContrastiveTerm:
    """The projection heads of a method's nets and the term's forward (see the module docstring)."""

    def __init__(self, method):
        config = method.config
        self.config, self.train, self.dist = config, method.train, method.dist
        self.heads: list[torch.nn.Module] = []
        for net, optimizer in zip(method.nets, method.optimizers):
            head = ProjectionHead(feature_dim(net), config.projection_dim, "linear_bn").to(config.device)
            head = distributed.convert_sync_bn(head, self.dist, config.sync_bn)
            optimizer.add_param_group({"params": list(head.parameters())})
            self.heads.append(head)
        self.train_heads = [distributed.wrap(head, self.dist, config.device) for head in self.heads]
        self.classifiers = [net.get_submodule(classifier_name(net)) for net in method.nets]

    def forward(self, a: int, net: torch.nn.Module, inputs: torch.Tensor, idx_u: torch.Tensor, generator):
        """``(net(inputs), NT-Xent of the unlabeled batch's two strong views)`` for net ``a``
        (``net``: its training forward, DDP-wrapped under torchrun). Run under the method's autocast.
        The term is 0 (a constant) when ``idx_u`` is empty."""
        if len(idx_u) == 0:
            return net(inputs), torch.zeros((), device=inputs.device)
        views = simclr_views(self.train.images, idx_u, int(self.config.crop_size), generator)
        captured: list[torch.Tensor] = []
        handle = self.classifiers[a].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            if self.dist.enabled:  # one forward per backward under DDP: the views ride with the inputs
                outputs = net(torch.cat([inputs, views]))[:len(inputs)]
                features = captured[0][len(inputs):]
            else:  # UNICON's order: one forward per strong view, then the method's own forward
                n = len(idx_u)
                net(views[:n])
                net(views[n:])
                handle.remove()
                outputs = net(inputs)
                features = torch.cat(captured)
        finally:
            handle.remove()
        z = F.normalize(self.train_heads[a](features).float(), dim=1)
        n = len(z) // 2
        return outputs, L.nt_xent(z[:n], z[n:], self.config.contrastive_temperature)

    def state_dict(self) -> list[dict]:
        return [head.state_dict() for head in self.heads]

    def load_state_dict(self, states: list[dict]) -> None:
        for head, state in zip(self.heads, states):
            head.load_state_dict(state)


def with_contrastive(parts: tuple, term: torch.Tensor | None, weight: float) -> tuple:
    """A method's per-step losses ``(total, *others)`` with the contrastive term: ``(total +
    weight x term, *others, term)``; unchanged when ``term`` is None (the term is off)."""
    if term is None:
        return parts
    return (parts[0] + weight * term, *parts[1:], term)
