"""The graph IR: types, immutable nodes, the op table (primitives and composites)."""
# Importing the IR fills the whole op table, gradient rules included, before anyone reads it.
# isort: off
from graphc.ir import primitives, composites, composites_conv, composites_layers, composites_losses  # noqa: F401,I001 (registration order)
from graphc.ir import composites_attention  # noqa: F401  (after the losses: it uses dropout's)
from graphc.ir import gradients  # noqa: F401  (rules for the ops above)
# isort: on
from graphc.ir.node import Graph, Node, topo_order
from graphc.ir.ops import OPS, Operand, TypeError_, apply, source
from graphc.ir.types import DType, TensorType

__all__ = ["Graph", "Node", "topo_order", "OPS", "Operand", "TypeError_", "apply", "source",
           "DType", "TensorType"]
