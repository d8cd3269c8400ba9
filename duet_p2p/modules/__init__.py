"""Torch modules as data: a model travels as a declarative spec, never as pickle or code.

A spec is a tree of plain values and tensors::

    {"type": "Linear", "args": {"in_features": 64, "out_features": 10, "bias": True},
     "state": {"weight": <tensor>, "bias": <tensor>}, "training": True}

Containers (Sequential, ModuleList, ModuleDict) add ``"children": {name: spec}``; an
optional ``"requires_grad": {param: bool}`` lists the parameters that differ from the
default (True). Loss class weights travel in "state", their shape as a ``weight_shape``
(``pos_weight_shape``) argument. Only the layer types of a fixed registry are accepted.
"""

from duet_p2p.modules.registry import SUPPORTED_MODULE_TYPES
from duet_p2p.modules.spec import (
    ModuleLimits,
    module_to_spec,
    parameter_count_of_spec,
    spec_to_module,
)

__all__ = [
    "SUPPORTED_MODULE_TYPES",
    "ModuleLimits",
    "module_to_spec",
    "parameter_count_of_spec",
    "spec_to_module",
]
