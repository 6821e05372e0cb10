"""The frozen prefix of a network: the largest first part that depends on no selected parameter.

With ``params=["features.17.", "classifier."]`` on a torchvision MobileNetV2 every Jacobian product only
needs ``features.17`` onwards: the output h of ``features.16`` is the same for every θ. :func:`split_network`
finds that cut in a torch.fx graph of the module and returns two graph modules, ``prefix: x -> h`` and
``suffix: h -> f``, whose parameters and buffers keep the module's own names (so ``functional_call`` takes
the same dictionaries). Two tracings are tried: modules that hold no selected parameter are leaves (the finest
cut; the code of modules that hold selected parameters must be traceable), then every module but an
``nn.Sequential`` is a leaf (the cut by module structure; only Sequential containers are traced). When
neither tracing works, or the cut leaves nothing frozen, there is no split.

A graph does not say what a node's value is: a cut found here may carry a tuple (ShuffleNet V2 cuts at a stride-1
block's ``x.chunk(2, dim=1)``) or a tensor whose first dimension is not the batch. The first use of the split
(``FunctionalNetwork``) runs the prefix and, where its output is not one tensor of the inputs' rows, asks for the
next cut with that node ``refused``.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

__all__ = ["NetworkSplit", "split_network"]


@dataclass
class NetworkSplit:
    """``prefix(x) -> h`` (no selected parameter) and ``suffix(h) -> output``; ``cut``: the graph node whose
    output is h (a module name, or an operation); ``how``: ``"fx"`` or ``"structure"``; ``node``: that node's name in
    the graph (what :func:`split_network` takes in ``refused``)."""

    prefix: fx.GraphModule
    suffix: fx.GraphModule
    cut: str
    how: str
    node: str


def _holds_selected(qualified: str, selected: list[str]) -> bool:
    return any(name == qualified or name.startswith(qualified + ".") for name in selected)


class _Tracer(fx.Tracer):
    def __init__(self, selected: list[str], structure: bool):
        super().__init__()
        self.selected, self.structure = selected, structure

    def is_leaf_module(self, module: nn.Module, qualified: str) -> bool:
        if self.structure:
            return not isinstance(module, nn.Sequential)
        return super().is_leaf_module(module, qualified) or not _holds_selected(qualified, self.selected)


def _depends_on_selected(graph: fx.Graph, selected: list[str]) -> set[fx.Node]:
    """The nodes whose value changes with the selected parameters."""
    dependent: set[fx.Node] = set()
    for node in graph.nodes:
        direct = node.op in ("call_module", "get_attr") and _holds_selected(str(node.target), selected)
        if direct or any(arg in dependent for arg in node.all_input_nodes):
            dependent.add(node)
    return dependent


def _cut(nodes: list[fx.Node], dependent: set[fx.Node], refused: Set[str]) -> int | None:
    """The largest j such that nodes[:j] are frozen and exactly one of them, not named in ``refused``, is used from
    nodes[j:] (h); None when the only such cut is at the input itself."""
    first = next((i for i, node in enumerate(nodes) if node in dependent or node.op == "output"), len(nodes))
    for j in range(first, 1, -1):
        later = set(nodes[j:])
        frontier = {node for node in nodes[:j] if any(user in later for user in node.users)}
        if len(frontier) == 1:
            (h,) = frontier
            if h.op != "placeholder" and h.name not in refused:
                return j
    return None


def _split_graph(
    root: nn.Module, graph: fx.Graph, selected: list[str], refused: Set[str]
) -> tuple[fx.GraphModule, fx.GraphModule, str, str] | None:
    nodes = list(graph.nodes)
    if sum(node.op == "placeholder" for node in nodes) != 1:
        return None
    j = _cut(nodes, _depends_on_selected(graph, selected), refused)
    if j is None:
        return None
    later = set(nodes[j:])
    (h,) = [node for node in nodes[:j] if any(user in later for user in node.users)]
    prefix_graph, env = fx.Graph(), dict[fx.Node, fx.Node]()
    for node in nodes[:j]:
        env[node] = prefix_graph.node_copy(node, lambda n: env[n])
    prefix_graph.output(env[h])
    suffix_graph = fx.Graph()
    env = {h: suffix_graph.placeholder("h")}
    for node in nodes[j:]:
        env[node] = suffix_graph.node_copy(node, lambda n: env[n])
    cut = str(h.target) if h.op == "call_module" else h.name
    return fx.GraphModule(root, prefix_graph), fx.GraphModule(root, suffix_graph), cut, h.name


def split_network(module: nn.Module, selected: list[str], refused: Set[str] = frozenset()) -> NetworkSplit | None:
    """Split ``module`` at the end of its largest prefix free of the ``selected`` parameter names, never at a node
    named in ``refused``; or None."""
    for how, structure in (("fx", False), ("structure", True)):
        try:
            graph = _Tracer(selected, structure).trace(module)
        except Exception:  # noqa: BLE001 — any tracing failure (control flow on values, unsupported ops) means no fx
            continue
        parts = _split_graph(module, graph, selected, refused)
        if parts is not None:
            prefix, suffix, cut, node = parts
            return NetworkSplit(prefix, suffix, cut, how, node)
    return None
