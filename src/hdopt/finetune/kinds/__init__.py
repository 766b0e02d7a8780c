"""Method kinds: how a method trains (:class:`~.base.MethodKind`), by name.

``zo`` (:class:`~.zo.ZOKind`, forward passes only), ``fo`` (:class:`~.backprop.BackpropKind`), ``np``
(:class:`~.node_perturbation.NodePerturbationKind`, forward-only gradient estimates of the last block's
readout maps), ``np-read`` (:class:`~.read_adapters.ReadAdaptersKind`, the same for read-position
adapters) and ``lp`` (:class:`~.probe.ProbeKind`, the closed-form probe). A method names its kind, or
passes a kind class of its own (:class:`hdopt.finetune.methods.Method`).
"""

from hdopt.finetune.kinds.backprop import BackpropKind
from hdopt.finetune.kinds.base import MethodKind
from hdopt.finetune.kinds.node_perturbation import NodePerturbationKind
from hdopt.finetune.kinds.probe import ProbeKind
from hdopt.finetune.kinds.read_adapters import ReadAdaptersKind
from hdopt.finetune.kinds.zo import ZOKind
from hdopt.registry import Registry

KINDS: Registry[type[MethodKind]] = Registry("method kind", sort=False)
KINDS.register(ZOKind.name, ZOKind)
KINDS.register(BackpropKind.name, BackpropKind)
KINDS.register(NodePerturbationKind.name, NodePerturbationKind)
KINDS.register(ReadAdaptersKind.name, ReadAdaptersKind)
KINDS.register(ProbeKind.name, ProbeKind)

__all__ = ["KINDS", "BackpropKind", "MethodKind", "NodePerturbationKind", "ProbeKind", "ReadAdaptersKind",
           "ZOKind"]
