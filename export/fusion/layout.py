"""Layout round trips (Reshape / Identity / inverse Transpose pairs back to the same shape) → nothing."""
from __future__ import annotations

from .graph import Graph, attr


def drop_round_trips(g: Graph) -> int:
    """``z = Reshape(… y)`` through Reshape / Identity / adjacent inverse Transpose pairs, with
    z of y's shape (equal sizes or the same symbols): z is y, so its readers read y."""
    dropped = 0
    for z in [n for n in g.nodes if n is not None and n.op_type == "Reshape" and n.domain == ""]:
        if not g.live(z) or z.output[0] in g.outputs:
            continue
        y, chain = z.input[0], [z]
        while True:
            p = g.node(y)
            if p is None or not g.private(y, chain[-1]):
                break
            if p.op_type in ("Reshape", "Identity") and p.domain == "":
                y, chain = p.input[0], chain + [p]
                continue
            q = g.node(p.input[0], "Transpose") if p.op_type == "Transpose" and p.domain == "" else None
            if q is not None and g.private(q.output[0], p) and _inverse(attr(q, "perm"), attr(p, "perm")):
                y, chain = q.input[0], chain + [p, q]
                continue
            break
        shape = g.shape(z.output[0])
        if len(chain) < 2 or not shape or None in shape or g.shape(y) != shape:
            continue
        for reader in g.uses(z.output[0]):
            reader.input[:] = [y if x == z.output[0] else x for x in reader.input]
        g.remove(chain)
        g.drop_dead([x for n in chain for x in n.input[1:] if x])
        dropped += 1
    return dropped


def _inverse(p: list | None, q: list | None) -> bool:
    return p is not None and q is not None and len(p) == len(q) and [p[i] for i in q] == list(range(len(p)))
