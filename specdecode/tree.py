"""Token trees as the models see them: a tree of T new tokens is a parents array (parents[i]
in [-1, i): the node it extends, -1 = the committed prefix), nodes in topological order.

A model's forward takes a tree as `positions` (prefix length + depth) and `attn_mask`
(each node sees its ancestors and itself); `parents_of` reads the tree back from that pair, so
that a model with a tree-aware kernel can take the fast path without a second interface.
A chain of k tokens is the path tree parents = [-1, 0, 1, ..., k-2].
"""

from __future__ import annotations

import torch


def _checked(parents: "torch.Tensor | list[int]") -> list[int]:
    """parents as a list of ints, checked (ValueError naming the first bad entry)."""
    if isinstance(parents, torch.Tensor):
        if parents.dim() != 1:
            raise ValueError(f"parents must be 1-D (one entry per node), got shape {list(parents.shape)}")
        parents = parents.tolist()
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError(f"parents[{i}] = {p}: each node extends -1 (the prefix) or an earlier node")
    return list(parents)


def _depth_list(parents: list[int]) -> list[int]:
    out: list[int] = []
    for p in parents:
        out.append(0 if p < 0 else out[p] + 1)
    return out


def depths(parents: torch.Tensor) -> torch.Tensor:
    """[T] depth of each node (0 for a child of the prefix)."""
    return torch.tensor(_depth_list(_checked(parents)), dtype=torch.long)


def _ancestor_rows(parents: list[int]) -> list[list[bool]]:
    rows: list[list[bool]] = []
    t = len(parents)
    for i, p in enumerate(parents):
        row = rows[p][:] if p >= 0 else [False] * t
        row[i] = True
        rows.append(row)
    return rows


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """[T, T] bool: row i is True at i and at each of its ancestors."""
    parents = _checked(parents)
    if not parents:
        return torch.zeros(0, 0, dtype=torch.bool)
    return torch.tensor(_ancestor_rows(parents), dtype=torch.bool)


def path(parents: torch.Tensor, node: int) -> list[int]:
    """The nodes from the root down to `node`, both included."""
    return _path(_checked(parents), node)


def _path(parents: list[int], node: int) -> list[int]:
    out = []
    while node >= 0:
        out.append(node)
        node = parents[node]
    return out[::-1]


def path_slots(parents: torch.Tensor, start: int) -> list[torch.Tensor]:
    """For each node (node i in cache slot start + i), the slots its path holds as a chain: the
    `start` cached ones, then its ancestors' and its own, root first (what a node attends to)."""
    values = _checked(parents)
    prefix = torch.arange(start)
    return [torch.cat((prefix, start + torch.tensor(_path(values, i), dtype=torch.long))) for i in range(len(values))]


def parents_of(attn_mask: torch.Tensor, positions: torch.Tensor, start: int) -> torch.Tensor | None:
    """The parents array of the tree that (attn_mask [T, T], positions [T]) describe after
    `start` cached tokens, or None if they are not a tree in topological order (a node that
    sees a later one, sees what its parent does not, or sits at another depth)."""
    t = attn_mask.shape[0]
    if attn_mask.shape != (t, t) or positions.shape != (t,):
        return None
    rows = attn_mask.to(torch.bool).tolist()
    parents = []
    for i, row in enumerate(rows):  # parent = the nearest earlier node the row sees; -1 where it sees none
        if not row[i] or any(row[i + 1 :]):
            return None
        parents.append(next((j for j in range(i - 1, -1, -1) if row[j]), -1))
    if _ancestor_rows(parents) != rows:
        return None
    if positions.tolist() != [start + d for d in _depth_list(parents)]:
        return None
    return torch.tensor(parents, dtype=torch.long)


def merge_branch(tokens: list[int], parents: list[int], branch: "list[int] | tuple[int, ...]", limit: int) -> tuple[list[int], bool]:
    """Merge `branch` (a token sequence under the root) into the trie (tokens, parents), in place,
    sharing the nodes it has in common with earlier branches, adding at most up to `limit` nodes
    in all. Returns the branch's nodes (as far as it got) and whether any was added."""
    node, path, added = -1, [], False
    for tok in branch:
        child = next((i for i, p in enumerate(parents) if p == node and tokens[i] == tok), None)
        if child is None:
            if len(tokens) >= limit:
                break
            tokens.append(tok)
            parents.append(node)
            child, added = len(tokens) - 1, True
        node = child
        path.append(child)
    return path, added
