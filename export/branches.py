"""Each ``ChooseForm`` placeholder of an exported graph → one ONNX ``If`` that runs one form.

A site that runs prompts decompressed and one-token steps absorbed is exported with both forms
computed and joined by ``mla_pass::choose_form`` (``ops/choose_form.py``), written as a
placeholder node ``ChooseForm(one_token_step, one_token, prompt)``. Here each placeholder becomes
``If(one_token_step)``: the then-branch holds every node that only the one-token value needs,
the else-branch every node that only the prompt value needs, and what both need (the cache
write, the rotated query) stays outside, read by the branches from the outer scope. Node and value
names are kept (they are unique in the graph, so nothing is shadowed); a weight that only one
branch reads moves into that branch (onnxruntime prepacks it there; read from the outer scope,
a decode step measured 4.5 ms slower on SmolLM2).
"""
from __future__ import annotations

from collections import defaultdict

import onnx
from onnx import helper

from mla_pass.export.fusion.graph import subgraph_reads

CHOOSE_FORM = ("mla_pass", "ChooseForm")      # (domain, op type) of the placeholder


def branch_forms(graph: onnx.GraphProto) -> int:
    """Replace every ``ChooseForm`` node of ``graph`` by an If, in place → how many."""
    nodes = list(graph.node)
    placeholders = [i for i, n in enumerate(nodes) if (n.domain, n.op_type) == CHOOSE_FORM]
    if not placeholders:
        return 0
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    consumers: dict[str, set[int]] = defaultdict(set)
    for i, n in enumerate(nodes):
        for x in _reads(n):
            consumers[x].add(i)
    outputs = {o.name for o in graph.output}
    types = {v.name: v for v in [*graph.value_info, *graph.output]}
    weights = {t.name: t for t in graph.initializer}
    moved: set[int] = set()
    moved_weights: set[str] = set()
    replaced: dict[int, onnx.NodeProto] = {}
    for c in placeholders:
        choose = nodes[c]
        condition, one_token, prompt = choose.input
        branches = []
        for value, name in ((one_token, "one_token"), (prompt, "prompt")):
            region = _owned(value, c, nodes, producer, consumers, outputs)
            moved |= region
            body = [nodes[i] for i in sorted(region)]
            # a weight only this branch reads becomes the branch's own initializer: onnxruntime
            # prepacks a subgraph's constant weights, not outer-scope ones (each call would pack it)
            own = sorted(w for w in {x for n in body for x in _reads(n)} & weights.keys()
                         if consumers[w] <= region and w not in outputs)
            moved_weights |= set(own)
            info = [types[o] for n in body for o in n.output if o in types]
            out = types.get(value) or helper.make_tensor_value_info(value, _elem_type(types, choose.output[0]), None)
            branches.append(helper.make_graph(body, f"{choose.name or 'choose_form'}_{name}", [], [out],
                                              initializer=[weights[w] for w in own], value_info=info))
        replaced[c] = helper.make_node("If", [condition], list(choose.output), name=choose.name or None,
                                       then_branch=branches[0], else_branch=branches[1])
    kept = [replaced.get(i, n) for i, n in enumerate(nodes) if i not in moved]
    inner = {o for i in moved for o in nodes[i].output}
    del graph.node[:]
    graph.node.extend(kept)
    infos = [v for v in graph.value_info if v.name not in inner]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    left = [t for t in graph.initializer if t.name not in moved_weights]
    del graph.initializer[:]
    graph.initializer.extend(left)
    return len(placeholders)


def _owned(value: str, choose: int, nodes, producer: dict, consumers: dict, outputs: set) -> set[int]:
    """The nodes that only ``value`` needs: its ancestors whose every output is read by the
    placeholder ``choose`` or by another node of the set (and by no graph output)."""
    ancestors, todo = set(), [value]
    while todo:
        i = producer.get(todo.pop())
        if i is None or i in ancestors:
            continue
        ancestors.add(i)
        todo.extend(_reads(nodes[i]))
    region: set[int] = set()
    for i in sorted(ancestors, reverse=True):          # readers come later in a topological order
        outs = [o for o in nodes[i].output if o]
        if any(o in outputs for o in outs):
            continue
        readers = set().union(*(consumers.get(o, set()) for o in outs))
        if readers and readers <= region | {choose} and (choose not in readers or value in outs):
            region.add(i)
    return region


def _reads(node: onnx.NodeProto) -> list[str]:
    """The values ``node`` reads: its inputs and what its subgraphs read from the outer scope."""
    return [x for x in node.input if x] + sorted(subgraph_reads(node))


def _elem_type(types: dict, name: str) -> int:
    v = types.get(name)
    return v.type.tensor_type.elem_type if v is not None else onnx.TensorProto.FLOAT
